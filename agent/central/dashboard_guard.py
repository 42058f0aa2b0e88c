"""The dashboard's guard: who is asking, from which Host and Origin, before any route.

As the kiosk API's guard (agent/station/kiosk/guard.py): an exact `Host` allowlist
(421 otherwise: a DNS-rebinding page names its own host), an exact `Origin` match
(403), and a credential on every `/api/` call (401). The page `/` is public and
holds no data; it gets its token in the URL fragment (never sent in a request)
and sends it as `Authorization: Bearer`. A city's authenticating reverse proxy
may instead name the user in `trusted_header`, believed only from
`trusted_proxies`. The name found is who the audit log records.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.errors import DashboardAuthError

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 32
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def load_tokens(path: Path) -> dict[str, str]:
    """token -> user name, from lines `name token` or `token` (name 'token')."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as e:
        raise DashboardAuthError(f"{path}: dashboard.token_file: {e.strerror}") from e
    tokens: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, token = line.rpartition(" ")
        name = name.strip() or "token"
        if len(token) < MIN_TOKEN_CHARS:
            raise DashboardAuthError(
                f"{path}: dashboard.token_file: line {n}: token shorter than {MIN_TOKEN_CHARS}"
            )
        tokens[token] = name
    if not tokens:
        raise DashboardAuthError(f"{path}: dashboard.token_file: no token in it")
    if mode & stat.S_IROTH:
        log.warning("dashboard: %s is readable by every user; chmod o-r it", path)
    return tokens


class DashboardGuard:
    """Which Hosts, Origin and credentials the dashboard answers. `bind(port)` once listening."""

    def __init__(
        self,
        *,
        listen_host: str = "127.0.0.1",
        tokens: dict[str, str] | None = None,
        trusted_header: str | None = None,
        trusted_proxies: Iterable[str] = ("127.0.0.1", "::1"),
        allowed_hosts: Iterable[str] = (),
        allowed_origin: str | None = None,
    ) -> None:
        self.tokens = dict(tokens or {})
        self.trusted_header = trusted_header.lower() if trusted_header else None
        self.trusted_proxies = {ipaddress.ip_address(p) for p in trusted_proxies}
        host = listen_host.strip("[]")
        self.url_host = f"[{host}]" if ":" in host else host
        self.extra_hosts = {h.lower() for h in allowed_hosts}
        self.allowed_origin = allowed_origin
        self.port = 0
        self.origin = allowed_origin or ""
        self._hosts: set[str] = set()

    def bind(self, port: int) -> None:
        """The port is known only once the socket is bound (port 0 in tests)."""
        self.port = port
        self.origin = self.allowed_origin or f"http://{self.url_host}:{port}"
        self._hosts = {f"{h}:{port}" for h in (*LOOPBACK_NAMES, self.url_host)} | self.extra_hosts

    def host_allowed(self, host: str | None) -> bool:
        return host is not None and host.lower() in self._hosts

    def who(self, headers: Headers, peer: str | None) -> str | None:
        """The user name behind this request, or None."""
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value:
            given = value.strip().encode()
            for token, name in self.tokens.items():
                if hmac.compare_digest(given, token.encode()):
                    return name
            return None
        if self.trusted_header is not None and peer is not None:
            try:
                trusted = ipaddress.ip_address(peer) in self.trusted_proxies
            except ValueError:
                trusted = False
            user = headers.get(self.trusted_header)
            if trusted and user and user.isprintable() and len(user) <= 128:
                return f"proxy:{user}"
        return None


def _refuse(status: int, code: str, detail: str) -> Response:
    return JSONResponse({"ok": False, "error": code, "detail": detail}, status_code=status)


PUBLIC_PATHS = frozenset({"/", "/favicon.svg"})


def is_public(path: str) -> bool:
    """The page and its icon only (no data in either); everything else needs a credential."""
    return path in PUBLIC_PATHS


class DashboardGuardMiddleware:
    """Pure ASGI: refusals never reach a route; `scope["state"]["user"]` names the caller."""

    def __init__(self, app: ASGIApp, guard: DashboardGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        guard = self.guard
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        client = scope.get("client")
        peer = client[0] if client else None
        answer: Response | None = None
        user = None
        if not guard.host_allowed(headers.get("host")):
            answer = _refuse(421, "wrong_host", "Host is not this dashboard")
        elif origin is not None and origin != guard.origin:
            answer = _refuse(403, "origin_not_allowed", "requests from this origin are refused")
        elif not is_public(scope["path"]):
            user = guard.who(headers, peer)
            if user is None:
                answer = _refuse(401, "unauthorized", "a valid bearer token is required")
                answer.headers["WWW-Authenticate"] = 'Bearer realm="madoguchi-dashboard"'
        scope.setdefault("state", {})["user"] = user

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] += [
                    (b"cache-control", b"no-store"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                ]
            await send(message)

        if answer is not None:
            await answer(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)


def ensure_token_file(path: Path) -> bool:
    """The quick path: a missing token file is created with a random token, mode 0600.
    True if it was created. (central.toml's token_file must exist: no surprise tokens.)"""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"operator {secrets.token_urlsafe(32)}\n")
    return True
