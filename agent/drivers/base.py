"""The seam every driver implements.

A driver is built from its validated device config (no I/O in the
constructor), opened with `async with`, and read by iterating `reads()`.
It knows no MQTT and no SQLite: the supervisor takes each read, stores it,
and calls `feedback()` once the record is durable (or could not be stored).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Self

from agent.contract.records import Read, ReadFault

if TYPE_CHECKING:
    from agent.config import DeviceConfig


class Driver(abc.ABC):
    """One device. Open it with `async with`, then iterate `reads()`."""

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.name = config.name

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Open the device; raise `DeviceUnavailable` when it is not there."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the device. Must not raise."""

    @abc.abstractmethod
    def reads(self) -> AsyncIterator[Read | ReadFault]:
        """Yield reads until the device goes away (then raise `DeviceUnavailable`)."""

    async def feedback(  # noqa: B027
        self, event: Read | ReadFault, accepted: bool, *, alarm: bool = False
    ) -> None:
        """Tell the operator: `accepted` after the commit, or not (NAK); `alarm`: the read
        was stored but a reference dataset says already used / recalled (issue #20).
        Default: no channel."""
