"""Datasette plugin: public dashboards without public arbitrary SQL.

datasette-dashboards fetches each chart's data from ``/<db>.json?sql=…`` and
refuses the page unless the visitor has ``execute-sql``. callgate denies
``execute-sql`` to anonymous visitors, so this hook gives anonymous requests a
narrow actor (``callgate-dashboard``) only when they open a dashboard page or
run *exactly* one of the SQL statements configured as a dashboard chart in
metadata.yml. metadata.yml grants ``execute-sql`` to that actor and nothing
else, so any other SQL text is still refused with 403.

Loaded with ``datasette --plugins-dir analytics/datasette_plugins`` (see
``analytics.datasette_app``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from datasette import hookimpl

DASHBOARD_ACTOR_ID = "callgate-dashboard"
# The only query-string keys datasette-dashboards' JavaScript sends with a chart query.
_CHART_ARGS = {"sql", "_shape"}


def _chart_queries(datasette: Any) -> set[tuple[str, str]]:
    """(database, sql) of every chart in the datasette-dashboards configuration."""
    config = datasette.plugin_config("datasette-dashboards") or {}
    allowed: set[tuple[str, str]] = set()
    for dashboard in config.values():
        if not isinstance(dashboard, dict):
            continue
        for chart in (dashboard.get("charts") or {}).values():
            if isinstance(chart, dict) and chart.get("db") and chart.get("query"):
                allowed.add((str(chart["db"]), str(chart["query"])))
    return allowed


def dashboard_actor(datasette: Any, path: str, args: dict[str, list[str]]) -> dict[str, str] | None:
    """The dashboard actor for a dashboard page or an allow-listed chart query, else None."""
    if path == "/-/dashboards" or path.startswith("/-/dashboards/"):
        return {"id": DASHBOARD_ACTOR_ID, "display": "public dashboards"}
    if not path.endswith(".json") or path.count("/") != 1:
        return None
    if set(args) - _CHART_ARGS or len(args.get("sql", [])) != 1:
        return None
    database = unquote(path[1 : -len(".json")])
    if (database, args["sql"][0]) in _chart_queries(datasette):
        return {"id": DASHBOARD_ACTOR_ID, "display": "public dashboards"}
    return None


@hookimpl
def actor_from_request(datasette: Any, request: Any) -> dict[str, str] | None:
    """Anonymous visitors only: tokens and signed-in actors are left to other hooks."""
    if request.headers.get("authorization") or request.cookies.get("ds_actor"):
        return None
    args = {key: request.args.getlist(key) for key in request.args}
    return dashboard_actor(datasette, request.path, args)
