"""The registry's own MQTT 5 connection: receive, settle, publish, nothing else (issue #18).

Why not aiomqtt on this path: a one-record message cost the registry ~240-540 µs of
CPU, two thirds of it in paho and aiomqtt (several `recv()` calls per packet, five
objects and a `threading.Condition` per message, a hand-off per publish). This client
parses whatever one read brought, in one pass, hands the consumer `Received`s, and
writes the PUBACKs of a whole batch in one write. The other central parts (dashboard,
fleet, signer) keep aiomqtt: they carry a few messages a minute.

Its promise:
- a received QoS 1 message is PUBACKed only when the consumer `settle()`s it, which the
  registry does once the batch is committed, before its acks go out: a registry that
  dies before leaves the message with the broker (a persistent session gets it
  again; for a shared group the agents' re-send covers it);
- it asks the broker for at most `receive_maximum` unsettled messages (MQTT 5 flow
  control), so a burst waits at the broker, not in the registry's memory (mosquitto 2.0
  keeps to it for what it has to send at once, not for what it queued behind that:
  tests/central/test_mqtt_lean.py);
- `publish(qos=1)` returns when the broker's PUBACK is in; at most the broker's Receive
  Maximum of them are in flight, the rest wait their turn;
- every failure (CONNECT or SUBSCRIBE refused, connection lost or silent past the
  keepalive, a packet that breaks the protocol) is one `BrokerLinkError` naming the
  broker; the connection is then closed and every waiter wakes with that error.

The packet codec is pure (`split`, `decode_*`, `encode_*`): tests feed it hostile bytes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import socket
import ssl
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from agent.errors import BrokerLinkError

log = logging.getLogger(__name__)

# packet types (the high nibble of the first byte)
CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"  # reason 0, normal: the broker does not send the will
MAX_REMAINING = 268_435_455  # the largest remaining length MQTT can express

#: reason codes a person reads in a one-line error (MQTT 5, 2.4)
REASONS = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8C: "bad authentication method",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x93: "receive maximum exceeded",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
    0x9A: "retain not supported",
    0x9B: "QoS not supported",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded",
    0xA2: "wildcard subscriptions not supported",
}

# property identifier -> how its value is laid out (MQTT 5, 2.2.2.2)
_BYTE, _TWO, _FOUR, _VARINT, _STR, _BIN, _PAIR = range(7)
PROPERTY_KINDS = {
    0x01: _BYTE, 0x02: _FOUR, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT,
    0x11: _FOUR, 0x12: _STR, 0x13: _TWO, 0x15: _STR, 0x16: _BIN, 0x17: _BYTE,
    0x18: _FOUR, 0x19: _BYTE, 0x1A: _STR, 0x1C: _STR, 0x1F: _STR, 0x21: _TWO,
    0x22: _TWO, 0x23: _TWO, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _FOUR,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip
_FIXED_SIZES = {_BYTE: 1, _TWO: 2, _FOUR: 4}
RECEIVE_MAXIMUM, MAXIMUM_PACKET_SIZE, SERVER_KEEP_ALIVE, REASON_STRING = 0x21, 0x27, 0x13, 0x1F


def reason(code: int) -> str:
    return f"{REASONS.get(code, 'reason')} (0x{code:02X})"


def _why(e: OSError) -> str:
    """What a person reads of a failed connect: "Connection refused", not asyncio's
    "Connect call failed ('127.0.0.1', 1883)"; a TLS error as OpenSSL words it."""
    if isinstance(e, ssl.SSLError):
        return str(getattr(e, "verify_message", None) or e.reason or e)
    return os.strerror(e.errno) if e.errno else str(e)


class ProtocolError(BrokerLinkError):
    """What the broker sent breaks MQTT 5: the connection is closed."""


# -- the codec ----------------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, b = divmod(n, 128)
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _varint_at(data: bytes | bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """(value, position after it) of the variable byte integer at `pos`; None if it
    runs past `end` (its next byte has not arrived, or the field is cut short)."""
    value, shift = 0, 0
    while pos < end:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ProtocolError("variable byte integer longer than 4 bytes")
    return None


def read_varint(data: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the variable byte integer at `pos`."""
    found = _varint_at(data, pos, end)
    if found is None:
        raise ProtocolError("truncated variable byte integer")
    return found


def _utf8(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise BrokerLinkError(f"MQTT string of {len(raw)} bytes (at most 65535)")
    return struct.pack("!H", len(raw)) + raw


def _binary(raw: bytes) -> bytes:
    if len(raw) > 0xFFFF:
        raise BrokerLinkError(f"MQTT binary field of {len(raw)} bytes (at most 65535)")
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes (QoS 1) when we vanish without a DISCONNECT."""

    topic: str
    payload: bytes
    retain: bool = True
    expiry_s: int | None = None  # MQTT 5 message expiry of the will


def encode_connect(
    client_id: str,
    *,
    keepalive: int,
    clean_start: bool,
    session_expiry_s: int,
    receive_maximum: int,
    username: str | None = None,
    password: str | None = None,
    will: Will | None = None,
) -> bytes:
    flags = 0x02 if clean_start else 0
    payload = _utf8(client_id)
    if will is not None:
        flags |= 0x04 | 0x08 | (0x20 if will.retain else 0)  # will, QoS 1, retain
        props = b"" if will.expiry_s is None else b"\x02" + struct.pack("!I", will.expiry_s)
        payload += varint(len(props)) + props + _utf8(will.topic) + _binary(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
    if password is not None:
        flags |= 0x40
        payload += _binary(password.encode())
    props = b"\x11" + struct.pack("!I", session_expiry_s)
    props += b"\x21" + struct.pack("!H", receive_maximum)
    body = _utf8("MQTT") + bytes((5, flags)) + struct.pack("!H", keepalive)
    return _packet(0x10, body + varint(len(props)) + props + payload)


def encode_publish(topic: str, payload: bytes, packet_id: int, *, qos: int, retain: bool) -> bytes:
    head = _utf8(topic) + (struct.pack("!H", packet_id) if qos else b"") + b"\x00"
    first = 0x30 | qos << 1 | int(retain)
    return bytes((first,)) + varint(len(head) + len(payload)) + head + payload


def encode_subscribe(packet_id: int, topic_filter: str, qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + b"\x00" + _utf8(topic_filter) + bytes((qos,))
    return _packet(0x82, body)


def encode_pubacks(packet_ids: Iterable[int]) -> bytes:
    """Success PUBACKs (MQTT 5 allows leaving out reason 0 and the properties)."""
    return b"".join(b"\x40\x02" + struct.pack("!H", i) for i in packet_ids)


def split(data: bytes | bytearray, pos: int = 0) -> tuple[list[tuple[int, int, int]], int]:
    """The whole packets in `data` from `pos`, as (first byte, body start, body end), and
    where the first incomplete one starts."""
    out = []
    n = len(data)
    while pos + 2 <= n:
        first = data[pos]
        if first >> 4 == 0:
            raise ProtocolError("packet type 0 (reserved)")
        found = _varint_at(data, pos + 1, n)
        if found is None:
            break  # the length's next byte has not arrived yet
        length, i = found
        if i + length > n:
            break
        out.append((first, i, i + length))
        pos = i + length
    return out, pos


def decode_properties(data: bytes | bytearray, pos: int, end: int) -> tuple[dict[int, Any], int]:
    """The properties at `pos` (their length first): id -> value (user properties left
    out), and the position after them."""
    length, pos = read_varint(data, pos, end)
    stop = pos + length
    if stop > end:
        raise ProtocolError("properties run past the packet")
    props: dict[int, Any] = {}
    while pos < stop:
        ident, pos = read_varint(data, pos, stop)
        kind = PROPERTY_KINDS.get(ident)
        if kind is None:
            raise ProtocolError(f"unknown property 0x{ident:02X}")
        if kind == _VARINT:
            props[ident], pos = read_varint(data, pos, stop)
            continue
        size = _FIXED_SIZES.get(kind)
        if size is not None:
            if pos + size > stop:
                raise ProtocolError(f"property 0x{ident:02X} runs past its packet")
            props[ident] = int.from_bytes(data[pos : pos + size], "big")
            pos += size
            continue
        fields = 2 if kind == _PAIR else 1
        values = []
        for _ in range(fields):
            if pos + 2 > stop:
                raise ProtocolError(f"property 0x{ident:02X} runs past its packet")
            size = data[pos] << 8 | data[pos + 1]
            pos += 2
            if pos + size > stop:
                raise ProtocolError(f"property 0x{ident:02X} runs past its packet")
            values.append(bytes(data[pos : pos + size]))
            pos += size
        if kind == _STR:
            props[ident] = values[0].decode("utf-8", "replace")
        elif kind == _BIN:
            props[ident] = values[0]
    return props, stop


@dataclass(frozen=True, slots=True)
class Received:
    """One PUBLISH from the broker: its topic, payload and packet id (0: QoS 0)."""

    topic: str
    payload: bytes
    packet_id: int
    retain: bool = False


def decode_publish(first: int, data: bytes | bytearray, pos: int, end: int) -> Received:
    qos = (first >> 1) & 3
    if qos > 1:
        raise ProtocolError(f"PUBLISH at QoS {qos} on a QoS 1 subscription")
    if pos + 2 > end:
        raise ProtocolError("PUBLISH without a topic")
    size = data[pos] << 8 | data[pos + 1]
    pos += 2
    if pos + size > end:
        raise ProtocolError("PUBLISH topic runs past the packet")
    try:
        topic = bytes(data[pos : pos + size]).decode()
    except UnicodeDecodeError:
        raise ProtocolError("PUBLISH topic is not UTF-8") from None
    if not topic:
        raise ProtocolError("PUBLISH with an empty topic (no topic alias was agreed)")
    pos += size
    packet_id = 0
    if qos:
        if pos + 2 > end:
            raise ProtocolError("PUBLISH without its packet identifier")
        packet_id = data[pos] << 8 | data[pos + 1]
        if packet_id == 0:
            raise ProtocolError("PUBLISH with packet identifier 0")
        pos += 2
    length, pos = read_varint(data, pos, end)
    pos += length
    if pos > end:
        raise ProtocolError("PUBLISH properties run past the packet")
    return Received(topic, bytes(data[pos:end]), packet_id, bool(first & 1))


def decode_ack(data: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    """(packet id, reason code) of a PUBACK."""
    if end - pos < 2:
        raise ProtocolError("PUBACK without its packet identifier")
    code = data[pos + 2] if end - pos > 2 else 0
    return data[pos] << 8 | data[pos + 1], code


def decode_suback(data: bytes | bytearray, pos: int, end: int) -> tuple[int, list[int]]:
    """(packet id, reason code per topic filter) of a SUBACK."""
    if end - pos < 2:
        raise ProtocolError("SUBACK without its packet identifier")
    packet_id = data[pos] << 8 | data[pos + 1]
    _, pos = decode_properties(data, pos + 2, end)
    return packet_id, list(data[pos:end])


def decode_connack(data: bytes | bytearray, pos: int, end: int) -> tuple[int, dict[int, Any]]:
    """(reason code, properties) of a CONNACK."""
    if end - pos < 2:
        raise ProtocolError("CONNACK shorter than 2 bytes")
    code = data[pos + 1]
    props, _ = decode_properties(data, pos + 2, end) if end - pos > 2 else ({}, end)
    return code, props


def decode_disconnect(data: bytes | bytearray, pos: int, end: int) -> tuple[int, str]:
    """(reason code, the broker's reason string or "") of a DISCONNECT."""
    if end == pos:
        return 0, ""
    code = data[pos]
    props, _ = decode_properties(data, pos + 1, end) if end - pos > 1 else ({}, end)
    return code, str(props.get(REASON_STRING, ""))


# -- the connection -----------------------------------------------------------------------


class _Link(asyncio.Protocol):
    """Bytes in and out of one connection; every packet goes to the client at once."""

    def __init__(self, client: LeanClient) -> None:
        self.client = client
        self.rest = b""  # the start of a packet whose end has not arrived

    def data_received(self, data: bytes) -> None:
        if self.rest:
            data = self.rest + data
        try:
            packets, used = split(data)
            self.client._packets(data, packets)
        except ProtocolError as e:  # from the codec, which knows no broker
            self.client._fail(ProtocolError(f"broker {self.client.where}: {e}"))
            return
        except BrokerLinkError as e:
            self.client._fail(e)
            return
        self.rest = data[used:]

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc else ""
        self.client._fail(BrokerLinkError(f"broker {self.client.where}: connection lost{why}"))


class LeanClient:
    """One MQTT 5 connection of the registry. Constructing it stores; `async with`
    connects (CONNECT -> CONNACK) and, at the end, says DISCONNECT and closes."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        clean_start: bool = True,
        session_expiry_s: int = 0,
        keepalive: int = 30,
        receive_maximum: int = 1024,
        tls_context: Any = None,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.where = f"{host}:{port}"
        self.client_id = client_id
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        self.keepalive = keepalive
        self.receive_maximum = receive_maximum
        self.tls_context = tls_context
        self.username = username
        self.password = password
        self.will = will
        self.connect_timeout_s = connect_timeout_s
        #: messages received, not yet taken by `batch()`
        self.queue: collections.deque[Received] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._error: BrokerLinkError | None = None
        self._connack: asyncio.Future[tuple[int, dict[int, Any]]] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._waiting: dict[int, asyncio.Future[Any]] = {}  # packet id -> PUBACK / SUBACK
        self._window: collections.deque[asyncio.Future[None]] = collections.deque()
        self._send_maximum = 65535
        self._max_packet = MAX_REMAINING
        self._next_id = 0
        self._heard = False  # something came from the broker since the last PINGREQ
        self._keepalive_task: asyncio.Task[None] | None = None

    # -- lifecycle

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                transport, _ = await loop.create_connection(
                    lambda: _Link(self),
                    self.host,
                    self.port,
                    ssl=self.tls_context,
                    server_hostname=self.host if self.tls_context is not None else None,
                )
                self._transport = transport
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                transport.write(
                    encode_connect(
                        self.client_id,
                        keepalive=self.keepalive,
                        clean_start=self.clean_start,
                        session_expiry_s=self.session_expiry_s,
                        receive_maximum=self.receive_maximum,
                        username=self.username,
                        password=self.password,
                        will=self.will,
                    )
                )
                code, props = await self._connack
        except TimeoutError:
            self._close()
            raise BrokerLinkError(
                f"broker {self.where}: no CONNACK within {self.connect_timeout_s:.0f} s"
            ) from None
        except OSError as e:
            self._close()
            raise BrokerLinkError(f"broker {self.where}: {_why(e)}") from None
        except BrokerLinkError:
            self._close()
            raise
        if code >= 0x80:
            self._close()
            said = props.get(REASON_STRING)
            raise BrokerLinkError(
                f"broker {self.where} refused the connection of {self.client_id}: "
                f"{reason(code)}" + (f": {said}" if said else "")
            )
        self._send_maximum = props.get(RECEIVE_MAXIMUM, 65535) or 65535
        self._max_packet = props.get(MAXIMUM_PACKET_SIZE, MAX_REMAINING) or MAX_REMAINING
        self.keepalive = props.get(SERVER_KEEP_ALIVE, self.keepalive)
        if self.keepalive:
            self._keepalive_task = asyncio.create_task(
                self._keep_alive(), name="registry-mqtt-keepalive"
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._transport is not None and self._error is None:
            self._transport.write(DISCONNECT_PACKET)
        self._fail(BrokerLinkError(f"broker {self.where}: connection closed"), clean=True)
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            try:
                await self._keepalive_task
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
            self._keepalive_task = None

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _fail(self, error: BrokerLinkError, *, clean: bool = False) -> None:
        """The connection is over: close it, wake every waiter with `error`."""
        if self._error is None:
            self._error = error
            if not clean:
                log.debug("%s", error)
        if self._transport is not None:
            if clean:
                self._transport.close()  # after the DISCONNECT already written
            else:
                self._transport.abort()
            self._transport = None
        err = self._error
        for fut in (self._connack, self._waiter, *self._waiting.values(), *self._window):
            if fut is not None and not fut.done():
                fut.set_exception(err)
                fut.exception()  # a waiter that gave up never reads it: no "never retrieved"
        self._waiting.clear()
        self._window.clear()

    def _check(self) -> asyncio.Transport:
        if self._error is not None:
            raise self._error
        if self._transport is None:
            raise BrokerLinkError(f"broker {self.where}: not connected")
        return self._transport

    async def _keep_alive(self) -> None:
        """A PINGREQ every `keepalive` seconds; nothing at all from the broker in the
        interval after one means it is gone (frozen, cut off) though TCP says nothing."""
        pinged = False
        while True:
            await asyncio.sleep(self.keepalive)
            transport = self._transport
            if self._error is not None or transport is None:
                return
            if pinged and not self._heard:
                self._fail(
                    BrokerLinkError(
                        f"broker {self.where}: no answer to PINGREQ within {self.keepalive} s"
                    )
                )
                return
            self._heard = False
            pinged = True
            transport.write(PINGREQ_PACKET)

    # -- what arrives

    def _packets(self, data: bytes, packets: list[tuple[int, int, int]]) -> None:
        if not packets:
            return
        self._heard = True
        queue = self.queue
        for first, start, end in packets:
            kind = first >> 4
            if kind == PUBLISH:
                queue.append(decode_publish(first, data, start, end))
            elif kind == PUBACK:
                packet_id, code = decode_ack(data, start, end)
                fut = self._waiting.pop(packet_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(code)
                window = self._window
                while window:  # the next publish waiting for room, if still waiting
                    turn = window.popleft()
                    if not turn.done():
                        turn.set_result(None)
                        break
            elif kind == SUBACK:
                packet_id, codes = decode_suback(data, start, end)
                fut = self._waiting.pop(packet_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(codes)
            elif kind == CONNACK:
                if self._connack is None or self._connack.done():
                    raise ProtocolError("a second CONNACK")
                self._connack.set_result(decode_connack(data, start, end))
            elif kind == PINGRESP:
                pass
            elif kind == DISCONNECT:
                code, said = decode_disconnect(data, start, end)
                raise BrokerLinkError(
                    f"broker {self.where} disconnected us: {reason(code)}"
                    + (f": {said}" if said else "")
                )
            else:
                raise ProtocolError(f"unexpected packet type {kind} from the broker")
        if queue and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def batch(self, most: int, max_bytes: int = MAX_REMAINING) -> list[Received]:
        """At least one message (waiting for it), at most `most` and (past the first) at
        most `max_bytes` of payload: the first and what has arrived behind it. Raises
        BrokerLinkError once the connection is over."""
        queue = self.queue
        while not queue:
            self._check()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        taken = [queue.popleft()]
        size = len(taken[0].payload)
        while queue and len(taken) < most:
            size += len(queue[0].payload)
            if size > max_bytes:
                break
            taken.append(queue.popleft())
        return taken

    def settle(self, messages: Iterable[Received]) -> None:
        """PUBACK these: the broker may forget them (call after their commit)."""
        transport = self._check()
        ids = [m.packet_id for m in messages if m.packet_id]
        if ids:
            transport.write(encode_pubacks(ids))

    # -- what we send

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._waiting:
                return self._next_id
        raise BrokerLinkError(f"broker {self.where}: 65535 packets unanswered")

    async def subscribe(self, topic_filter: str, qos: int = 1, wait_s: float = 10.0) -> None:
        transport = self._check()
        packet_id = self._packet_id()
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._waiting[packet_id] = fut
        transport.write(encode_subscribe(packet_id, topic_filter, qos))
        try:
            async with asyncio.timeout(wait_s):
                codes = await fut
        except TimeoutError:
            raise BrokerLinkError(
                f"broker {self.where}: no SUBACK for {topic_filter} within {wait_s:.0f} s"
            ) from None
        if not codes or codes[0] >= 0x80:
            raise BrokerLinkError(
                f"broker {self.where} refused the subscription to {topic_filter}: "
                + (reason(codes[0]) if codes else "no reason code")
            )

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        wait_s: float = 10.0,
    ) -> None:
        """QoS 0: written. QoS 1: returns when the broker's PUBACK is in, within `wait_s`
        (math.inf: no deadline of its own, the caller keeps one)."""
        transport = self._check()
        if qos == 0:
            packet = encode_publish(topic, payload, 0, qos=0, retain=retain)
            self._fits(packet, topic)
            transport.write(packet)
            return
        waiting = await self._send([(topic, payload)], retain)
        if wait_s == math.inf:
            await self._confirmed(waiting)
            return
        try:
            async with asyncio.timeout(wait_s):
                await self._confirmed(waiting)
        except TimeoutError:
            raise BrokerLinkError(
                f"broker {self.where}: no PUBACK for {topic} within {wait_s:.0f} s"
            ) from None

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish these (QoS 1, not retained) in as few writes as the broker's Receive
        Maximum allows; return when the broker has PUBACKed every one. No deadline of
        its own: the caller keeps one (and calls `fail()` past it)."""
        await self._confirmed(await self._send(messages, False))

    async def _send(
        self, messages: Sequence[tuple[str, bytes]], retain: bool
    ) -> list[tuple[asyncio.Future[int], str]]:
        """Write these at QoS 1, as many per write as the broker's Receive Maximum has
        room for (waiting for room); their PUBACKs to come, with their topics."""
        loop = asyncio.get_running_loop()
        waiting: list[tuple[asyncio.Future[int], str]] = []
        i = 0
        while i < len(messages):
            transport = self._check()
            room = self._send_maximum - len(self._waiting)
            if room <= 0:
                turn: asyncio.Future[None] = loop.create_future()
                self._window.append(turn)
                await turn
                continue
            packets = []
            for topic, payload in messages[i : i + room]:
                packet_id = self._packet_id()
                packet = encode_publish(topic, payload, packet_id, qos=1, retain=retain)
                self._fits(packet, topic)
                fut: asyncio.Future[int] = loop.create_future()
                self._waiting[packet_id] = fut
                waiting.append((fut, topic))
                packets.append(packet)
            i += len(packets)
            transport.write(b"".join(packets))
        return waiting

    async def _confirmed(self, waiting: list[tuple[asyncio.Future[int], str]]) -> None:
        """Until every PUBACK is in; a refusal is logged (the message is not resent)."""
        for fut, topic in waiting:
            if (code := await fut) >= 0x80:
                log.warning(
                    "broker %s refused a message on %s: %s", self.where, topic, reason(code)
                )

    def fail(self, error: BrokerLinkError) -> None:
        """Count the connection as lost (a deadline of the caller's passed): close it,
        wake every waiter with `error`."""
        self._fail(error)

    def _fits(self, packet: bytes, topic: str) -> None:
        if len(packet) > self._max_packet:
            raise BrokerLinkError(
                f"broker {self.where}: a message of {len(packet)} bytes on {topic} is over"
                f" the broker's maximum packet size ({self._max_packet})"
            )
