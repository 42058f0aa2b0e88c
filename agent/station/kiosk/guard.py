"""The kiosk API's guard: every request passes here before any route.

Browser rules: loopback only (config), an exact `Origin` match, no CORS
wildcard, a `Host` check against DNS rebinding, and a bearer token on every
`/v1/` call. The page itself is public and carries no secret: the kiosk
launcher hands the token to it in the URL fragment, which never travels in
an HTTP request (docs/kiosk.md).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from pathlib import Path
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.config import ApiSection
from agent.errors import ApiError, MadoguchiError

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 32


def error_response(error: ApiError) -> JSONResponse:
    """An `ApiError` as the page reads it: `{"error": code, "detail", ...}`."""
    return JSONResponse(
        {"error": error.code, "detail": error.detail, **error.extra}, status_code=error.status
    )


def is_public(path: str) -> bool:
    """The page and its files; everything else needs the token (deny by default)."""
    return path == "/" or (path.startswith("/kiosk/") and ".." not in path)


class Guard:
    """Which Host, Origin and token this API answers, and the headers every answer gets."""

    def __init__(self, config: ApiSection) -> None:
        self.config = config
        self.token = ""  # set once the token file is read: until then nothing is authorized
        host = config.host.strip("[]")
        self.url_host = f"[{host}]" if ":" in host else host
        self.origin = config.allowed_origin or f"http://{self.url_host}:{config.port}"
        self._hosts = {
            f"{h}:{config.port}" for h in ("127.0.0.1", "localhost", "[::1]", self.url_host)
        }
        self._hosts.add(urlsplit(self.origin).netloc.lower())

    def host_allowed(self, host: str | None) -> bool:
        if self.config.allow_remote:
            return True
        return host is not None and host.lower() in self._hosts

    def authorized(self, header: str | None) -> bool:
        if header is None or not self.token:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self.token.encode())

    def response_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        out = [
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
            (b"cache-control", b"no-store"),
            (
                b"content-security-policy",
                f"default-src 'self'; connect-src 'self' {self.origin}; img-src 'self' data:; "
                "frame-ancestors 'none'; base-uri 'none'; form-action 'none'".encode(),
            ),
        ]
        if origin is not None and origin == self.origin:
            out += [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
        return out


class GuardMiddleware:
    """Pure ASGI middleware applying a `Guard`: refusals never reach a route."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets, lifespan is off
        guard = self.guard
        headers = Headers(scope=scope)
        server = scope.get("server")
        via_unix = server is not None and server[1] is None
        origin = headers.get("origin")
        answer: Response | None = None
        if not via_unix and not guard.host_allowed(headers.get("host")):
            answer = error_response(ApiError(421, "wrong_host", "Host is not this agent"))
        elif origin is not None and origin != guard.origin:
            answer = error_response(
                ApiError(403, "origin_not_allowed", "requests from this origin are refused")
            )
        elif scope["method"] == "OPTIONS":
            answer = Response(status_code=204)
            answer.headers["Access-Control-Allow-Methods"] = "GET, POST"
            answer.headers["Access-Control-Allow-Headers"] = (
                "Authorization, Content-Type, Last-Event-ID"
            )
            answer.headers["Access-Control-Max-Age"] = "600"
        elif not is_public(scope["path"]) and not guard.authorized(headers.get("authorization")):
            answer = error_response(
                ApiError(401, "unauthorized", "a valid bearer token is required")
            )
            answer.headers["WWW-Authenticate"] = 'Bearer realm="madoguchi"'

        extra = guard.response_headers(origin)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                names = {k.lower() for k, _ in message["headers"]}
                message["headers"] += [(k, v) for k, v in extra if k not in names]
            await send(message)

        if answer is not None:
            await answer(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)


def load_token(path: Path) -> str:
    """The bearer token; a missing file is created with a random one, mode 0600."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise MadoguchiError(f"{path}: api.token_file: cannot create: {e.strerror}") from e
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        log.info("api: created a new token in %s", path)
    try:
        mode = path.stat().st_mode
        lines = path.read_text().strip().splitlines()
    except OSError as e:
        raise MadoguchiError(f"{path}: api.token_file: {e.strerror}") from e
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN_CHARS:
        raise MadoguchiError(f"{path}: api.token_file: token shorter than {MIN_TOKEN_CHARS}")
    if mode & stat.S_IROTH:
        log.warning("api: %s is readable by every user; chmod o-r it", path)
    return token
