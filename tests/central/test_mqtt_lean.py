"""The registry's own MQTT 5 connection (agent/central/mqtt_lean.py): its codec against
hostile bytes, and its promises against a real mosquitto — settle after commit, flow
control both ways, a frozen or vanished broker, refusals named in one line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.central.mqtt_lean import (
    LeanClient,
    ProtocolError,
    Received,
    Will,
    _Link,
    decode_ack,
    decode_connack,
    decode_disconnect,
    decode_properties,
    decode_publish,
    decode_suback,
    encode_publish,
    split,
    varint,
)
from agent.errors import BrokerLinkError
from agent.testing import Broker, free_port

TOPIC = "madoguchi/v1/site1/a/records"


# -- the codec ----------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_hostile_bytes_raise_only_protocol_errors(data: bytes) -> None:
    """Whatever the bytes, the codec answers packets or a ProtocolError, nothing else."""
    try:
        packets, used = split(data)
    except ProtocolError:
        return
    assert 0 <= used <= len(data)
    for first, start, end in packets:
        assert start <= end <= used
        for decode in (decode_ack, decode_suback, decode_connack, decode_disconnect):
            with contextlib.suppress(ProtocolError):
                decode(data, start, end)
        with contextlib.suppress(ProtocolError):
            decode_properties(data, start, end)
        with contextlib.suppress(ProtocolError):
            m = decode_publish(first, data, start, end)
            assert m.topic and isinstance(m.payload, bytes)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=40),
            st.binary(max_size=3000),
            st.integers(1, 65535),
        ),
        min_size=1,
        max_size=8,
    ),
    st.lists(st.integers(1, 4000), max_size=12),
)
def test_publishes_cut_anywhere_arrive_whole_and_in_order(
    messages: list[tuple[str, bytes, int]], cuts: list[int]
) -> None:
    """TCP delivers bytes, not packets: however the stream is cut into reads, every
    PUBLISH comes out once, whole, in order."""
    stream = b"".join(encode_publish(t, p, i, qos=1, retain=False) for t, p, i in messages)
    client = LeanClient("127.0.0.1", 1, client_id="codec")
    link = _Link(client)
    pos = 0
    for cut in sorted(set(cuts)):
        if cut < len(stream):
            link.data_received(stream[pos:cut])
            pos = cut
    link.data_received(stream[pos:])
    assert list(client.queue) == [Received(t, p, i) for t, p, i in messages]
    assert link.rest == b""


def test_the_codec_refuses_what_breaks_mqtt() -> None:
    publish = encode_publish("a/b", b"x", 7, qos=1, retain=False)
    cases = {
        b"\x00\x00": "reserved",  # packet type 0
        b"\x30\xff\xff\xff\xff\x01": "longer than 4 bytes",
        b"\x34" + publish[1:]: "QoS 2",
        b"\x32\x04\x00\x05ab": "topic runs past",
        b"\x32\x06\x00\x02\xff\xfe\x00\x01": "not UTF-8",
        b"\x32\x05\x00\x00\x00\x01\x00": "empty topic",
        b"\x32\x06\x00\x01a\x00\x00\x00": "identifier 0",
    }
    for data, why in cases.items():
        with pytest.raises(ProtocolError, match=why):
            packets, _ = split(data)
            for first, start, end in packets:
                decode_publish(first, data, start, end)
    with pytest.raises(ProtocolError, match="unknown property"):
        decode_properties(b"\x02\x7f\x00", 0, 3)
    assert varint(268_435_455) == b"\xff\xff\xff\x7f"


# -- against mosquitto --------------------------------------------------------------------


async def _publish(broker: Broker, n: int, topic: str = TOPIC) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, max_inflight_messages=n) as pub:
        await asyncio.gather(*(pub.publish(topic, f"m{k}".encode(), qos=1) for k in range(n)))


def _session(broker: Broker, **kw: object) -> LeanClient:
    return LeanClient(
        "127.0.0.1",
        broker.port,
        client_id="lean-test",
        clean_start=False,
        session_expiry_s=300,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.broker
async def test_a_message_not_settled_is_handed_over_again_a_settled_one_never(
    broker: Broker,
) -> None:
    """The registry PUBACKs after its commit: a registry gone before that gets the
    message again from its session; one that settled never does."""
    async with _session(broker) as c:
        await c.subscribe(TOPIC)
    await _publish(broker, 2)
    async with _session(broker) as c:
        first = await c.batch(1)
        assert [m.payload for m in first] == [b"m0"]
        async with asyncio.timeout(10):
            while len(c.queue) < 1:
                await asyncio.sleep(0.01)
        c.settle(first)  # m0 committed; m1 taken into memory only
        await c.publish("lean/flush", b"", qos=1)  # the PUBACK is in before we leave
    async with _session(broker) as c:
        again = await asyncio.wait_for(c.batch(10), 10)
        assert [m.payload for m in again] == [b"m1"]
        c.settle(again)
        await c.publish("lean/flush", b"", qos=1)
    async with _session(broker) as c:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.batch(10), 1.0)


@pytest.mark.broker
async def test_the_first_burst_waits_at_the_broker_past_receive_maximum(broker: Broker) -> None:
    """Receive Maximum 10: of 50 queued messages, 10 come before anything is settled (a
    burst waits at the broker, not in the registry's memory); after that mosquitto 2.0
    sends the rest at once (its quota is not kept for the queued ones). All 50 arrive,
    once each, in order."""
    async with _session(broker, receive_maximum=10) as c:
        await c.subscribe(TOPIC)
        await _publish(broker, 50)
        first = await asyncio.wait_for(c.batch(100), 10)
        await asyncio.sleep(0.3)  # time for more to arrive, were the broker to send it
        first += await c.batch(100) if c.queue else []
        assert len(first) == 10
        got = list(first)
        c.settle(first)
        while len(got) < 50:
            batch = await asyncio.wait_for(c.batch(100), 10)
            got += batch
            c.settle(batch)
    assert [m.payload for m in got] == [f"m{k}".encode() for k in range(50)]


@pytest.mark.broker
async def test_publish_many_past_the_brokers_receive_maximum_is_all_confirmed(
    broker: Broker,
) -> None:
    """mosquitto takes 20 unconfirmed QoS 1 messages at a time (its Receive Maximum):
    300 acks of one commit go out in turns, every one confirmed, none dropped."""
    async with (
        aiomqtt.Client("127.0.0.1", broker.port) as spy,
        LeanClient("127.0.0.1", broker.port, client_id="lean-acks") as c,
    ):
        await spy.subscribe("lean/acks/#", qos=1)
        assert c._send_maximum == 20
        await asyncio.wait_for(
            c.publish_many([(f"lean/acks/{k}", str(k).encode()) for k in range(300)]), 20
        )
        assert not c._waiting
        seen = set()
        async with asyncio.timeout(10):
            async for m in spy.messages:
                assert isinstance(m.payload, bytes)
                seen.add(int(m.payload))
                if len(seen) == 300:
                    break


@pytest.mark.broker
async def test_a_frozen_broker_is_a_lost_connection_within_two_keepalives(
    broker: Broker,
) -> None:
    assert broker.proc is not None
    async with LeanClient("127.0.0.1", broker.port, client_id="lean-ka", keepalive=1) as c:
        await c.subscribe(TOPIC)
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(BrokerLinkError, match=r"127\.0\.0\.1:\d+: no answer to PINGREQ"):
                await asyncio.wait_for(c.batch(1), 5)
            with pytest.raises(BrokerLinkError):
                await c.publish("lean/x", b"")
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)


@pytest.mark.broker
async def test_a_killed_broker_wakes_every_waiter(broker: Broker) -> None:
    async with LeanClient("127.0.0.1", broker.port, client_id="lean-kill") as c:
        await c.subscribe(TOPIC)
        waiting = asyncio.create_task(c.batch(1))
        await asyncio.sleep(0.1)
        broker.kill()
        with pytest.raises(BrokerLinkError, match="connection lost"):
            await asyncio.wait_for(waiting, 5)


@pytest.mark.broker
async def test_the_will_is_published_when_we_vanish_not_when_we_leave(broker: Broker) -> None:
    will = Will("lean/status", b"offline", retain=False)
    async with aiomqtt.Client("127.0.0.1", broker.port) as spy:
        await spy.subscribe("lean/status", qos=1)
        async with LeanClient("127.0.0.1", broker.port, client_id="lean-w1", will=will):
            pass  # a clean leave: DISCONNECT, no will
        c = LeanClient("127.0.0.1", broker.port, client_id="lean-w2", will=will)
        await c.__aenter__()
        assert c._transport is not None
        c._transport.abort()  # vanished
        async with asyncio.timeout(10):
            async for m in spy.messages:
                assert m.payload == b"offline"
                break
        await c.__aexit__(None, None, None)


async def test_refusals_and_absences_are_one_line_naming_the_broker() -> None:
    port = free_port()
    with pytest.raises(BrokerLinkError, match=rf"^broker 127\.0\.0\.1:{port}: Connection refused$"):
        async with LeanClient("127.0.0.1", port, client_id="lean-none"):
            pass

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # the CONNECT
        props = b"\x1f" + struct.pack("!H", 7) + b"go away"
        writer.write(b"\x20" + varint(3 + len(props)) + b"\x00\x87" + varint(len(props)) + props)
        await writer.drain()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    fake = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(
            BrokerLinkError,
            match=rf"^broker 127\.0\.0\.1:{fake} refused the connection of lean-refused:"
            r" not authorized \(0x87\): go away$",
        ):
            async with LeanClient("127.0.0.1", fake, client_id="lean-refused"):
                pass


@settings(max_examples=20, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_hostile_bytes_from_a_broker_end_the_connection_in_one_error(junk: bytes) -> None:
    """A peer that sends garbage after a good CONNACK: one BrokerLinkError, no other
    exception, no hang."""

    async def scenario() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1024)
            writer.write(b"\x20\x03\x00\x00\x00" + junk)
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            try:
                async with LeanClient("127.0.0.1", port, client_id="lean-junk") as c:
                    await asyncio.wait_for(c.batch(10), 5)
                    while True:
                        await asyncio.wait_for(c.batch(10), 5)
            except BrokerLinkError:
                pass

    asyncio.run(scenario())


def test_a_batch_stops_at_its_byte_bound_but_always_holds_one() -> None:
    client = LeanClient("127.0.0.1", 1, client_id="bytes")
    for k in range(5):
        client.queue.append(Received(TOPIC, bytes(100 * (k + 1)), k + 1))
    got = asyncio.run(client.batch(10, max_bytes=350))
    assert [len(m.payload) for m in got] == [100, 200]  # 300, a third would make 600
    got = asyncio.run(client.batch(10, max_bytes=10))
    assert [len(m.payload) for m in got] == [300]  # over the bound alone: still taken
    got = asyncio.run(client.batch(1))
    assert [len(m.payload) for m in got] == [400]
