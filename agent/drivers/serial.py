"""Serial barcode scanners (USB-COM, RS-232) through pyserial-asyncio-fast.

Framing by the profile's terminator; a line longer than `max_line_bytes` or
one that is not text is an error event, and the driver resyncs at the next
terminator. The port is opened exclusively. `host_ack` / `host_nak` are
written back by `feedback()`, which the supervisor calls only after the
record is durable (or could not be stored).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from agent.contract.records import Read, ReadFault
from agent.contract.text import forbidden_controls
from agent.drivers.base import Driver
from agent.errors import DeviceUnavailable, DriverMissing

if TYPE_CHECKING:
    from agent.config import SerialDevice

log = logging.getLogger(__name__)


def _to_bytes(s: str) -> bytes:
    """Profile strings like "\\u0006" are single bytes (latin-1), not UTF-8."""
    return s.encode("latin-1")


class LineFramer:
    """Bytes from the port -> lines without their terminator, in bounded memory.

    `feed()` yields each complete line, or None for a line that grew past `max_line_bytes`
    (dropped; framing resyncs at the next terminator). Any bytes at all: it raises nothing.
    """

    def __init__(self, terminator: bytes, max_line_bytes: int) -> None:
        if not terminator:
            raise ValueError("terminator must not be empty")
        self.terminator = terminator
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._overlong = False

    def feed(self, chunk: bytes) -> Iterator[bytes | None]:
        buf, term = self._buf, self.terminator
        buf += chunk
        while True:
            end = buf.find(term)
            if end < 0:
                if len(buf) > self.max_line_bytes + len(term):
                    self._overlong = True
                    # keep a tail that may be the start of a multi-byte terminator
                    del buf[: len(buf) - (len(term) - 1)]
                break
            line = bytes(buf[:end])
            del buf[: end + len(term)]
            if self._overlong or len(line) > self.max_line_bytes:
                self._overlong = False
                yield None
                continue
            yield line


class SerialDriver(Driver):
    """A scanner on a serial port."""

    config: SerialDevice

    def __init__(self, config: SerialDevice) -> None:
        super().__init__(config)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        cfg = self.config
        try:
            import serial
            import serial_asyncio_fast
        except ImportError:
            raise DriverMissing(
                self.name,
                "pyserial-asyncio-fast is not installed (pip install 'madoguchi[serial]')",
            ) from None
        try:
            self._reader, self._writer = await serial_asyncio_fast.open_serial_connection(
                url=cfg.port,
                baudrate=cfg.baudrate,
                bytesize=cfg.bytesize,
                parity=cfg.parity,
                stopbits=cfg.stopbits,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as e:
            raise DeviceUnavailable(self.name, f"cannot open {cfg.port}: {_why(e)}") from None

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            try:
                writer.close()
            except Exception as e:  # already gone
                log.debug("%s: close: %s", self.name, e)

    async def reads(self) -> AsyncIterator[Read | ReadFault]:
        cfg = self.config
        reader = self._reader
        if reader is None:
            raise DeviceUnavailable(self.name, "not open")
        framer = LineFramer(_to_bytes(cfg.terminator), cfg.max_line_bytes)
        while True:
            try:
                chunk = await reader.read(4096)
            except Exception as e:  # pyserial, OSError: the port went away
                raise DeviceUnavailable(self.name, f"{cfg.port}: {_why(e)}") from None
            if not chunk:
                raise DeviceUnavailable(self.name, f"{cfg.port}: port closed (unplugged?)")
            for line in framer.feed(chunk):
                if line is None:
                    yield ReadFault(
                        self.name,
                        f"line longer than max_line_bytes={cfg.max_line_bytes}: dropped",
                    )
                    continue
                event = self._decode(line)
                if event is not None:
                    yield event

    def _decode(self, line: bytes) -> Read | ReadFault | None:
        if self.config.terminator in ("\r", "\n"):
            line = line.strip(b"\r\n")  # CR LF pairs from scanners set to CRLF
        if not line:
            return None
        try:
            text = line.decode(self.config.encoding)
        except (UnicodeError, ValueError):  # UnicodeDecodeError, and idna & co's UnicodeError
            return ReadFault(
                self.name, f"{len(line)} bytes that are not {self.config.encoding} text"
            )
        if forbidden_controls(text):
            return ReadFault(self.name, f"{len(line)} bytes with binary control characters")
        return Read(device=self.name, kind="barcode", data={"text": text})

    async def feedback(
        self, event: Read | ReadFault, accepted: bool, *, alarm: bool = False
    ) -> None:
        reply = self.config.host_ack if accepted else self.config.host_nak
        if alarm and self.config.host_alarm:  # the profile's own pattern for an alarm
            reply = self.config.host_alarm
        writer = self._writer
        if not reply or writer is None:
            return
        try:
            writer.write(_to_bytes(reply))
            await writer.drain()
        except Exception as e:
            log.warning(
                "%s: could not write %s to the scanner: %s",
                self.name,
                "ACK" if accepted else "NAK",
                _why(e),
            )


def _why(e: Any) -> str:
    text = str(e) or type(e).__name__
    return text.replace("[Errno ", "[errno ")
