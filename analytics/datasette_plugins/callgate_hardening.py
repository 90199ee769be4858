"""Datasette plugin: what Datasette itself would reveal or trip over, closed off.

- ``/-/databases`` (and ``.json``) lists every database with its absolute file path,
  for anyone: the route is replaced by one that leaves the path out.
- A bearer token with non-ASCII bytes made datasette-auth-tokens'
  ``secrets.compare_digest`` raise (500). No real token is non-ASCII
  (callgate refuses to start with one), so such a request is answered 400 with
  ``{"error", "detail"}`` before any hook sees it; so is a non-ASCII cookie, on
  which the CSRF middleware raised (500).
- A path with a backslash or starting with ``//`` (``/\\evil.com/``) made Datasette's
  trailing-slash redirect point at another site (an open redirect): such paths
  are answered 404.
- The access log (uvicorn's, on stdout) wrote every request's query string, so an
  operator's ``find_calls?number=…`` put a caller's number in the log. It keeps
  the path only, and says ``?…`` where a query string was.

Loaded with ``datasette --plugins-dir analytics/datasette_plugins`` (see
``analytics.datasette_app``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from datasette import hookimpl
from datasette.utils.asgi import Response

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
_HIDDEN_DATABASE_KEYS = frozenset({"path"})
BAD_AUTHORIZATION = {
    "error": "bad_authorization",
    "detail": "the Authorization and Cookie headers must be ASCII text",
}


NOT_FOUND = {"error": "not_found", "detail": "no such page"}
_ASCII_ONLY_HEADERS = (b"authorization", b"cookie")


def _non_ascii_credentials(scope: dict[str, Any]) -> bool:
    return any(
        name.lower() in _ASCII_ONLY_HEADERS and not value.isascii()
        for name, value in scope.get("headers") or ()
    )


def _redirectable_elsewhere(scope: dict[str, Any]) -> bool:
    """A path Datasette's trailing-slash redirect would turn into another site's URL."""
    path = scope.get("path") or ""
    return "\\" in path or path.startswith("//")


class QueryStringRedactor(logging.Filter):
    """Drops the query string from uvicorn's access-log lines (path only, then ``?…``).

    uvicorn logs ``'%s - "%s %s HTTP/%s" %d'`` with (client, method, path and query,
    version, status); its logging set-up keeps filters added to the logger before it."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path, mark, _ = args[2].partition("?")
            record.args = (args[0], args[1], path + ("?…" if mark else ""), args[3], args[4])
        return True


_ACCESS_LOG = logging.getLogger("uvicorn.access")
if not any(isinstance(f, QueryStringRedactor) for f in _ACCESS_LOG.filters):
    _ACCESS_LOG.addFilter(QueryStringRedactor())


async def _send_json(send: Any, status: int, document: dict[str, str]) -> None:
    body = json.dumps(document).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@hookimpl
def asgi_wrapper(datasette: Any) -> Callable[[ASGIApp], ASGIApp]:
    def wrap(app: ASGIApp) -> ASGIApp:
        async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope.get("type") == "http":
                if _non_ascii_credentials(scope):
                    await _send_json(send, 400, BAD_AUTHORIZATION)
                    return
                if _redirectable_elsewhere(scope):
                    await _send_json(send, 404, NOT_FOUND)
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
