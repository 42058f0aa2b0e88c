"""The fallback: anything not recognised is valid text, or a URL."""

from __future__ import annotations

from urllib.parse import urlsplit

from agent.interpret._common import Interpretation, result

_URL_PREFIXES = ("http://", "https://", "HTTP://", "HTTPS://")


def parse_text(text: str) -> Interpretation:
    """`url` (with scheme and host) for an http(s) URL, otherwise `text`."""
    if text.startswith(_URL_PREFIXES) or text[:8].lower().startswith(("http://", "https://")):
        try:
            parts = urlsplit(text)
            scheme, host = parts.scheme.lower(), parts.hostname or ""
        except ValueError:  # e.g. a broken IPv6 literal: still a URL the operator scanned
            scheme, host = text.split(":", 1)[0].lower(), ""
        return result("url", {"scheme": scheme, "host": host})
    return result("text", {})
