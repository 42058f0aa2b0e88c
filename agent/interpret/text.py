"""The fallback: anything not recognised is valid text, or a URL."""

from __future__ import annotations

from agent.interpret._common import Interpretation, result


def parse_text(text: str) -> Interpretation:
    """`url` (with scheme and host) for an http(s) URL, otherwise `text`."""
    head = text[:8].lower()
    if head.startswith("http://") or head.startswith("https://"):
        scheme, _, rest = text.partition("://")
        return result("url", {"scheme": scheme.lower(), "host": url_host(rest)})
    return result("text", {})


def url_host(rest: str) -> str:
    """The host of `rest` (the URL after `scheme://`), lower case, as `urlsplit().hostname`.

    Hand-rolled because urlsplit costs ~15 µs and this is on the scan path.
    """
    end = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        if i != -1 and i < end:
            end = i
    hostinfo = rest[:end].rpartition("@")[2]
    _, bracket, bracketed = hostinfo.partition("[")
    host = bracketed.partition("]")[0] if bracket else hostinfo.partition(":")[0]
    name, percent, zone = host.partition("%")  # an IPv6 zone keeps its case
    return name.lower() + percent + zone
