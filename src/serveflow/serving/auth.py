"""Bearer-token check for every path but the health checks (pure ASGI middleware).

The dashboard page `/` is static and holds no data, so it is served without a token
(a browser cannot attach one to a navigation); its script reads the token from the
URL fragment (`/#token=...`, never sent to the server) and sends it as a Bearer
header on the data requests, which all need it.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from serveflow.serving.codecs import encode_json

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})


def token_matches(authorization: bytes, token: str) -> bool:
    """Whether an Authorization header value is `Bearer <token>`: the scheme in any
    case (RFC 9110, 11.1), the token compared in constant time."""
    scheme, _, credentials = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials, token.encode())


def unauthorized(headers: Iterable[tuple[bytes, bytes]], token: str) -> str | None:
    """Why a request with these (lowercased) headers is unauthorized, or None when it
    carries exactly one Authorization header and that is `Bearer <token>`. Two are
    refused whatever they say: fronts that read the first and the last would disagree."""
    given = [value for key, value in headers if key == b"authorization"]
    if len(given) == 1 and token_matches(given[0], token):
        return None
    if len(given) > 1:
        return f"unauthorized: {len(given)} Authorization headers (send one)"
    return f"unauthorized: {'wrong' if given else 'missing'} 'Authorization: Bearer' token"


class BearerAuth:
    """Answers 401 unless the request carries `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        reason = unauthorized(scope["headers"], self._token)
        if reason is None:
            await self.app(scope, receive, send)
            return
        body = encode_json({"error": reason})
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="serveflow"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
