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
- Datasette raises its ``DatasetteError`` for requests it cannot serve (``_sort`` by a
  column that does not exist, ``_sort`` with ``_sort_desc``) and answers it 500 unless
  told otherwise: those are the client's errors, answered 400; a row page with too few
  key values (``/callgate/plays/a``) was a 500 from SQLite's binding check, now a 404.
- A POST to a (read-only) canned query failed inside Datasette (500). Nothing outside
  ``/-/`` takes anything but GET, HEAD or OPTIONS: 405.
- ``/-/threads`` (a thread dump naming the interpreter's install path) is 404.
- The access log (uvicorn's, on stdout) wrote every request's query string, so an
  operator's ``find_calls?number=…`` put a caller's number in the log. It keeps
  the path only, and says ``?…`` where a query string was.

Loaded with ``datasette --plugins-dir analytics/datasette_plugins`` (see
``analytics.datasette_app``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import datasette.handle_exception as default_handler
from datasette import hookimpl
from datasette.utils.asgi import Response
from datasette.views.base import DatasetteError

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
_HIDDEN_DATABASE_KEYS = frozenset({"path"})
BAD_AUTHORIZATION = {
    "error": "bad_authorization",
    "detail": "the Authorization and Cookie headers must be ASCII text",
}


NOT_FOUND = {"error": "not_found", "detail": "no such page"}
READ_ONLY = {"error": "method_not_allowed", "detail": "this page is read-only: use GET"}
# callgate's Datasette only reads (no writable canned queries; 0.65 has no write API).
# Its own forms (/-/logout, /-/messages, /-/permissions) post to /-/ paths.
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Datasette's thread dump names the interpreter's install path, for anyone.
_DEBUG_PAGES = frozenset({"/-/threads", "/-/threads.json"})
_ASCII_ONLY_HEADERS = (b"authorization", b"cookie")


def _non_ascii_credentials(scope: dict[str, Any]) -> bool:
    return any(
        name.lower() in _ASCII_ONLY_HEADERS and not value.isascii()
        for name, value in scope.get("headers") or ()
    )


def _redirectable_elsewhere(scope: dict[str, Any]) -> bool:
    """A path Datasette's trailing-slash redirect would turn into another site's URL,
    including an absolute-form request target (`GET http://evil.com/a/`) a proxy passed on."""
    path = scope.get("path") or ""
    raw = scope.get("raw_path") or b"/"
    return "\\" in path or path.startswith("//") or not raw.startswith(b"/")


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


async def _send_json(
    send: Any, status: int, document: dict[str, str], *extra: tuple[bytes, bytes]
) -> None:
    body = json.dumps(document).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *extra,
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
                if _redirectable_elsewhere(scope) or scope.get("path") in _DEBUG_PAGES:
                    await _send_json(send, 404, NOT_FOUND)
                    return
                if scope.get("method") not in _READ_METHODS and not (
                    scope.get("path") or ""
                ).startswith("/-/"):
                    await _send_json(send, 405, READ_ONLY, (b"allow", b"GET, HEAD, OPTIONS"))
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


@hookimpl
def handle_exception(datasette: Any, request: Any, exception: Exception) -> Any:
    """Answer requests Datasette cannot serve as the client's errors, rendered by
    Datasette's own handler (HTML or JSON as asked): its `DatasetteError`s as 400, and a
    row page whose URL names fewer key values than the table has key columns (SQLite
    refuses the missing binding) as 404, where both were 500s. Other errors stay 500."""
    if isinstance(exception, DatasetteError) and exception.status == 500:
        exception.status = 400
        return None
    if (
        isinstance(exception, sqlite3.ProgrammingError)
        and "pks" in (getattr(request, "url_vars", None) or {})
        and "binding" in str(exception)
    ):
        return default_handler.handle_exception(
            datasette, request, DatasetteError("No such page", status=404)
        )
    return None
