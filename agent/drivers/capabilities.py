"""What a driver can do besides yielding reads, found at run time with isinstance.

The local API (agent/api.py) looks up the running driver of a device and uses
it when it has one of these capabilities; a driver gains one by defining the
method, without importing this module. (Photos go through the station instead,
`Station.capture_photo(device)`, because a photo is a sealed blob plus a record.)
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class CardInfoProvider(Protocol):
    """A card reader that can read the card's 4 attributes with the resident's PIN.

    `read_card_info` follows the PIN rules of FORMATS.md: read the retry counter
    without spending a try, refuse when fewer than 2 tries are left, VERIFY once,
    never retry. It raises `PinRefused(device, reason, tries_left)` when the PIN
    was wrong or not tried, `CardError` when there is no card or it failed, and
    returns `{"name", "address", "birth_date", "sex"}`. The PIN is never logged.
    """

    async def read_card_info(self, reader: str, pin: str) -> dict[str, Any]: ...
