"""Datasette plugin: the call page, links to it, and the calls page's search forms.

- ``render_cell``: a ``voice_id`` anywhere (the timeline view, the forwarding tables,
  canned query results) links to that call's row page, ``/<db>/calls/<voice_id>``;
  plays, recordings, dtmf and speech get the same link from their foreign keys.
- ``extra_template_vars``: the row page of ``calls`` (template
  ``analytics/templates/row-callgate-calls.html``) gets the call's timeline, plays,
  digits, speech results, recordings and bridge legs, and, for visitors who may read the
  forwarding tables, its deliveries and their attempts. Every block is read only when
  the visitor may view that table (Datasette's own ``view-table`` check, so
  metadata.yml's ``allow`` blocks decide), with the same read-only connection Datasette
  uses for its pages. Where a ``<table>_private`` table holds the cleartext of a public
  table, visitors allowed to read it see the cleartext, everyone else the public form.
- ``prepare_jinja2_environment``: the templates are named for a database called
  ``callgate``; a database file with another name gets the same templates.
"""

from __future__ import annotations

import re
from typing import Any

from datasette import hookimpl
from datasette.utils import tilde_encode, to_css_class, urlsafe_components
from jinja2 import BaseLoader, ChoiceLoader, Environment, TemplateNotFound
from markupsafe import Markup, escape

from analytics import call_page

TEMPLATE_DB = "callgate"
_OWN_TEMPLATE = re.compile(r"(row|table)-(.+)-calls\.html")
# Canned query behind the calls page's "find by number" form (operator only).
FIND_QUERY = "find_calls"
# Who counts as an operator on the page: whoever may read the raw event log.
OPERATOR_TABLE = "events"


@hookimpl
def render_cell(value: Any, column: str, table: str | None, database: str,
                datasette: Any) -> Markup | None:
    """A voice_id links to its call's page (a call's own row page links elsewhere already)."""
    if column != "voice_id" or table == "calls" or not isinstance(value, str) or not value:
        return None
    href = datasette.urls.row(database, "calls", tilde_encode(value))
    return Markup(f'<a class="callgate-call-link" href="{escape(href)}">{escape(value)}</a>')


async def _may_view(datasette: Any, actor: Any, database: str, table: str) -> bool:
    db = datasette.get_database(database)
    if not await db.table_exists(table) and table not in await db.view_names():
        return False
    visible, _ = await datasette.check_visibility(
        actor,
        permissions=[("view-table", (database, table)), ("view-database", database),
                     "view-instance"],
    )  # fmt: skip
    return bool(visible)


async def _rows(datasette: Any, database: str, sql: str, voice_id: str) -> list[dict[str, Any]]:
    result = await datasette.get_database(database).execute(sql, {"voice_id": voice_id})
    return [dict(row) for row in result.rows]


async def _readable(datasette: Any, actor: Any, database: str, table: str, sql: str,
                    key: tuple[str, ...], voice_id: str) -> list[dict[str, Any]] | None:
    """Rows of one block, the cleartext laid over them when the visitor may read the
    private table; None when the visitor may not view the block's table at all."""
    if not await _may_view(datasette, actor, database, table):
        return None
    rows = await _rows(datasette, database, sql, voice_id)
    private = call_page.private_table(table)
    if rows and await _may_view(datasette, actor, database, private):
        column = "seq" if table == "timeline" else "voice_id"
        values = [row[column] for row in rows] if column == "seq" else [voice_id]
        marks = ", ".join(f":k{n}" for n in range(len(values)))
        clear = await datasette.get_database(database).execute(
            f'SELECT * FROM "{private}" WHERE "{column}" IN ({marks})',
            {f"k{n}": v for n, v in enumerate(values)},
        )
        rows = call_page.overlay(rows, [dict(r) for r in clear.rows], key)
    return rows


async def call_story(datasette: Any, database: str, request: Any) -> dict[str, Any]:
    """Template variables of the calls row page: `call_page` with one entry per block."""
    actor = request.actor
    voice_id = urlsafe_components(request.url_vars["pks"])[0]
    blocks: dict[str, Any] = {}
    for section in call_page.SECTIONS:
        blocks[section.table] = await _readable(
            datasette, actor, database, section.table, section.sql, section.key, voice_id
        )
    call = await _readable(
        datasette, actor, database, "calls", "SELECT * FROM calls WHERE voice_id = :voice_id",
        call_page.CALL_KEY, voice_id,
    )
    operator = await _may_view(datasette, actor, database, OPERATOR_TABLE)
    clear_recordings = await _may_view(
        datasette, actor, database, call_page.private_table("recordings")
    )
    # A link to the recording file for those who may read its real address: the operator,
    # or whoever may read recordings_private where that table exists.
    link_recordings = clear_recordings or (
        operator and not await datasette.get_database(database).table_exists(
            call_page.private_table("recordings"))
    )
    for recording in blocks["recordings"] or []:
        recording["href"] = call_page.openable(recording.get("recording_url")) \
            if link_recordings else None
    deliveries = attempts = None
    if await _may_view(datasette, actor, database, "deliveries"):
        deliveries = await _rows(datasette, database, call_page.DELIVERIES_SQL, voice_id)
        if await _may_view(datasette, actor, database, "delivery_attempts"):
            attempts = call_page.attempts_by_delivery(
                await _rows(datasette, database, call_page.ATTEMPTS_SQL, voice_id)
            )
    # Datasette's "Links from other tables" list, cut to the tables this visitor may view.
    incoming = (await datasette.get_database(database).get_all_foreign_keys())["calls"]
    linked = []
    for table in sorted({fk["other_table"] for fk in incoming["incoming"]}):
        if await _may_view(datasette, actor, database, table):
            linked.append(table)
    return {
        "call_page": {
            "voice_id": voice_id,
            "call": (call or [None])[0],
            **blocks,
            "bridge_legs": call_page.bridge_legs(blocks["timeline"] or []),
            "deliveries": deliveries,
            "attempts": attempts,
            "operator": operator,
            "linked_tables": linked,
        }
    }


async def find_form(datasette: Any, database: str, request: Any) -> dict[str, Any]:
    """Template variables of the calls table page: may this visitor search by number?"""
    allowed = await datasette.permission_allowed(
        request.actor, "view-query", resource=(database, FIND_QUERY), default=True
    )
    return {"callgate_find": {"allowed": bool(allowed), "query": FIND_QUERY}}


@hookimpl
def extra_template_vars(template: str, database: str | None, table: str | None,
                        view_name: str, request: Any, datasette: Any) -> Any:
    if table != "calls" or database is None or request is None:
        return None
    if view_name == "row":
        async def row_vars() -> dict[str, Any]:
            return await call_story(datasette, database, request)

        return row_vars
    if view_name == "table":
        async def table_vars() -> dict[str, Any]:
            return await find_form(datasette, database, request)

        return table_vars
    return None


class _SameTemplates(BaseLoader):
    """`row-<db>-calls.html` / `table-<db>-calls.html` for a database not called callgate:
    the callgate templates (looked up through the environment's own loader)."""

    def __init__(self, inner: BaseLoader, databases: Any) -> None:
        self.inner = inner
        self.databases = databases

    def get_source(self, environment: Environment, template: str) -> Any:
        match = _OWN_TEMPLATE.fullmatch(template)
        if match is None or match.group(2) == TEMPLATE_DB:
            raise TemplateNotFound(template)
        if match.group(2) not in {to_css_class(name) for name in self.databases()}:
            raise TemplateNotFound(template)
        return self.inner.get_source(environment, f"{match.group(1)}-{TEMPLATE_DB}-calls.html")

    def list_templates(self) -> list[str]:
        return []  # aliases only: nothing of its own to list


@hookimpl
def prepare_jinja2_environment(env: Environment, datasette: Any) -> None:
    inner = env.loader
    if inner is not None:
        env.loader = ChoiceLoader([inner, _SameTemplates(inner, lambda: list(datasette.databases))])
