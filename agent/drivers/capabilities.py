"""What a driver can do besides yielding reads: one Protocol per capability.

The local API and the station find a capability on a running driver with
`isinstance` (the Protocols are runtime-checkable) and call it through the
Protocol, so mypy checks the call site against the declaration. Each driver
module that offers one says so with an assignment such as
`_offers_card_info: type[CardInfoProvider] = PcscDriver`, and agent/testing.py
does the same for its fakes: when the real driver, the fake or the declaration
drift apart, `mypy --strict` fails (the kiosk's PIN read once failed on every
real reader while the suite stayed green, because the fake followed a
declaration the driver did not). tests/drivers/test_capabilities.py checks the
same by signature at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # the driver modules import this one to declare what they offer
    from agent.drivers.camera import Still
    from agent.drivers.card import CardInfo


@runtime_checkable
class CardInfoProvider(Protocol):
    """A card reader that reads the card's 4 attributes with the resident's PIN.

    `read_card_info` follows the PIN rules of FORMATS.md on the card in this
    reader: read the retry counter without spending a try, refuse when fewer
    than 2 tries are left, VERIFY once, never retry. It raises
    `PinRefused(device, reason, tries_left)` when the PIN was wrong or not
    tried, `CardError` when there is no card or it failed, `DeviceUnavailable`
    when pcscd went away. The PIN is never logged.
    """

    async def read_card_info(self, pin: str) -> CardInfo: ...


@runtime_checkable
class PossessionProver(Protocol):
    """A card reader that proves the card holds the key of its auth certificate.

    `prove_possession` checks the chain, then with the resident's 4-digit auth
    PIN (same PIN rules as `read_card_info`) has the card sign a fresh nonce and
    verifies it. Returns the `card_auth` result (docs/CONTRACT.md); raises
    `PinRefused`, `CardError`, `DeviceUnavailable` like `read_card_info`.
    """

    async def prove_possession(self, pin: str) -> dict[str, Any]: ...


@runtime_checkable
class TrustAnchorTaker(Protocol):
    """A card reader whose chain check also trusts anchors from elsewhere than its config.

    The station hands it the `jpki_anchors` reference dataset (agent/station/datasets.py)
    as a callable the reader's thread can call at each card: it returns an immutable
    set that is swapped whole when a new version is applied, so no lock is needed.
    """

    def add_anchor_source(self, source: Callable[[], frozenset[str]]) -> None: ...


@runtime_checkable
class PhotoCamera(Protocol):
    """A camera that takes an ID photo on demand (agent/station/photos.py seals and stores it)."""

    name: str

    async def capture_photo(self) -> Still: ...


@runtime_checkable
class DriverStats(Protocol):
    """A driver with counters for telemetry (`Station.describe()` merges them per device)."""

    def stats(self) -> dict[str, int]: ...
