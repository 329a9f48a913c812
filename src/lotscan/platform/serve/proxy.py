"""JSON errors from Serve's HTTP proxy itself.

Some answers never come from the lotscan app: the ingress replica died with
the request in flight (the proxy sends nothing and uvicorn answers a plain
``500 Internal Server Error``), the ingress queue is full or the deployment is
unavailable (plain-text 503), the proxy's own timeout (408), a path outside
every route prefix (404). :class:`JsonProxyErrors` is an ASGI middleware that
Serve runs inside each HTTP proxy when ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
names :func:`proxy_middlewares` in the environment of the Ray node; it turns
those into the API's ``{"error": {"status", "code", "message"}}`` shape, and
the nothing-sent case into ``503 unavailable`` with ``Retry-After`` (the
request may be retried: another ingress replica, or the replacement, answers).

What it cannot change: uvicorn answers malformed HTTP framing (a bad request
line, bad header bytes, a bad ``Content-Length``) with a plain-text 400 before
any ASGI code runs, and a dead proxy refuses connections (docs/serving.md).
"""

import json
import os
from collections.abc import MutableMapping

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lotscan.platform.serve.errors import error_body

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "lotscan.platform.serve.proxy:proxy_middlewares"
PROXY_RETRY_AFTER_S = 1
"""``Retry-After`` of the proxy's own 503s. The proxy is shared by every Serve
application on the node, so it cannot use one app's ``serve.retry_after_s``;
1 s is the default of that field."""
_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed",
          408: "timeout", 413: "payload_too_large", 500: "internal_error", 503: "unavailable",
          504: "timeout"}
_MAX_MESSAGE = 300


def proxy_middlewares() -> list[Middleware]:
    """The callback Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(JsonProxyErrors)]


def install_proxy_errors(environ: MutableMapping[str, str] | None = None) -> bool:
    """Name :func:`proxy_middlewares` in ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
    unless something else is set there; True when ours is in effect. It acts
    only on a Ray started by this process afterwards (its nodes inherit this
    environment); on a cluster, set the variable in the pods' environment."""
    environ = os.environ if environ is None else environ
    environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    return environ[PROXY_CALLBACK_ENV] == PROXY_CALLBACK


def _json_message(status: int, message: str, headers: list[tuple[bytes, bytes]]) -> tuple[Message, Message]:
    body = json.dumps(error_body(status, _CODES.get(status, "http_error"), message)).encode()
    kept = [(k, v) for k, v in headers
            if k.lower() not in (b"content-type", b"content-length")]
    if status == 503 and not any(k.lower() == b"retry-after" for k, _ in kept):
        kept.append((b"retry-after", str(PROXY_RETRY_AFTER_S).encode()))
    kept += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return ({"type": "http.response.start", "status": status, "headers": kept},
            {"type": "http.response.body", "body": body, "more_body": False})


class JsonProxyErrors:
    """Pure ASGI middleware: a non-JSON error answer of the proxy becomes the
    API's JSON shape (same status and headers, the text as ``message``); no
    answer at all becomes ``503 unavailable`` with ``Retry-After``. JSON
    answers and every success pass through untouched."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        held: Message | None = None
        text = bytearray()

        async def guarded_send(message: Message) -> None:
            nonlocal started, held
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
                ctype = dict((k.lower(), v) for k, v in message.get("headers", [])).get(
                    b"content-type", b"")
                if status >= 400 and not ctype.startswith(b"application/json"):
                    held = message
                    return
                started = True
                await send(message)
            elif kind == "http.response.body" and held is not None:
                text.extend(message.get("body", b"")[: _MAX_MESSAGE - len(text)])
                if not message.get("more_body", False):
                    await self._send_held(send, held, text)
                    held, started = None, True
            else:
                await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception:
            if started:
                raise
            held = None
        if held is not None:
            await self._send_held(send, held, text)
        elif not started:
            for message in _json_message(
                    503, f"{scope.get('method', '')} {scope.get('path', '')}: the request "
                         f"failed before the application answered (its replica may have "
                         f"died); retry", []):
                await send(message)

    @staticmethod
    async def _send_held(send: Send, held: Message, text: bytearray) -> None:
        message = bytes(text).decode("utf-8", "replace").strip() or "error"
        for part in _json_message(int(held["status"]), message[:_MAX_MESSAGE],
                                  list(held.get("headers", []))):
            await send(part)
