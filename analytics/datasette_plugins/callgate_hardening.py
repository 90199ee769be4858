"""Datasette plugin: what Datasette itself would reveal or trip over, closed off.

- ``/-/databases`` (and ``.json``) lists every database with its absolute file path,
  for anyone: the route is replaced by one that leaves the path out.
- A bearer token with non-ASCII bytes made datasette-auth-tokens'
  ``secrets.compare_digest`` raise (500). No real token is non-ASCII
  (callgate refuses to start with one), so such a request is answered 400 with
  ``{"error", "detail"}`` before any hook sees it.

Loaded with ``datasette --plugins-dir analytics/datasette_plugins`` (see
``analytics.datasette_app``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from datasette import hookimpl
from datasette.utils.asgi import Response

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
_HIDDEN_DATABASE_KEYS = frozenset({"path"})
BAD_AUTHORIZATION = {
    "error": "bad_authorization",
    "detail": "the Authorization header must be ASCII text",
}


def _non_ascii_authorization(scope: dict[str, Any]) -> bool:
    return any(
        name.lower() == b"authorization" and not value.isascii()
        for name, value in scope.get("headers") or ()
    )


@hookimpl
def asgi_wrapper(datasette: Any) -> Callable[[ASGIApp], ASGIApp]:
    def wrap(app: ASGIApp) -> ASGIApp:
        async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope.get("type") == "http" and _non_ascii_authorization(scope):
                body = json.dumps(BAD_AUTHORIZATION).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 400,
                        "headers": [
                            (b"content-type", b"application/json; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
            await app(scope, receive, send)

        return guarded

    return wrap


async def _databases(datasette: Any) -> Response:
    """Datasette's own list of connected databases, minus where their files are."""
    listed = [
        {key: value for key, value in entry.items() if key not in _HIDDEN_DATABASE_KEYS}
        for entry in datasette._connected_databases()
    ]
    return Response.json(listed)


@hookimpl
def register_routes() -> list[tuple[str, Any]]:
    # Plugin routes are matched before Datasette's own, so this one wins.
    return [(r"^/-/databases(\.(?P<format>json))?$", _databases)]
