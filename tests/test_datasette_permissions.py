"""Who may see what, against a real Datasette: anonymous visitors get calls, the
projections, the aggregate queries and the dashboards; raw payloads, rejections,
forwarding tables and arbitrary SQL are refused (403) unless the operator token is sent."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from analytics import tables
from analytics.datasette_app import TOKEN_ENV, load_metadata, rendered_metadata_path
from gateway.db import connect, utc_now
from tests.conftest import CALLGATE
from tests.servers import Subprocess, free_port, wait_http
from tests.test_datasette_helpers import (
    OPERATOR_TOKEN,
    Built,
    Datasette,
)

OPERATOR_ONLY_TABLES = (
    "events",
    "rejections",
    "key_store",
    "subscriptions",
    "deliveries",
    "delivery_attempts",
    "subscription_health",
    *tables.OPERATOR_ONLY,  # the cleartext personal data
)
PUBLIC_TABLES = (
    "calls", "plays", "recordings", "dtmf", "speech", "broadcasts", "timeline", "timeline_marks",
    "hourly_concurrency", "lateness_histogram", "checkpoints",
)
OPERATOR_ONLY_QUERIES = ("rejections_by_error", "forwarding_failures", "find_calls")


def metadata() -> dict:  # type: ignore[type-arg]
    return load_metadata()


def test_every_table_has_a_decided_audience(built: Built) -> None:
    """Datasette shows everything not denied: a new table must be classified here first."""
    import sqlite3

    conn = sqlite3.connect(built.db)
    try:
        names = {
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                "AND name NOT LIKE 'sqlite_%'"
            )
        }
    finally:
        conn.close()
    assert names == set(OPERATOR_ONLY_TABLES) | set(PUBLIC_TABLES)
    tables = metadata()["databases"]["callgate"]["tables"]
    for table in OPERATOR_ONLY_TABLES:
        assert tables[table]["allow"] == {"id": "operator"}, table
    for table in PUBLIC_TABLES:
        assert "allow" not in tables[table], table


@pytest.mark.parametrize("table", OPERATOR_ONLY_TABLES)
def test_anonymous_refused_operator_tables(ds: Datasette, table: str) -> None:
    for suffix in ("", ".json", ".csv"):
        assert ds.get(f"/{ds.name}/{table}{suffix}").status_code == 403, (table, suffix)
    assert ds.get(f"/{ds.name}/{table}.json", token=OPERATOR_TOKEN).status_code == 200


def test_raw_payloads_refused_everywhere(ds: Datasette) -> None:
    """events.raw/payload: not the table, not a row, not a column selection."""
    for path in (
        f"/{ds.name}/events/1.json",
        f"/{ds.name}/events/1",
        f"/{ds.name}/events.json?_col=raw",
        f"/{ds.name}/events.json?_col=payload&_shape=array",
        f"/{ds.name}/rejections/1.json",
    ):
        assert ds.get(path).status_code == 403, path
    listed = ds.get(f"/{ds.name}.json").json()
    names = {t["name"] for t in listed["tables"]} | {v["name"] for v in listed.get("views", [])}
    assert names.isdisjoint(OPERATOR_ONLY_TABLES), names
    assert set(PUBLIC_TABLES) <= names
    # The operator does get the payloads.
    row = ds.get(f"/{ds.name}/events/1.json", token=OPERATOR_TOKEN, _shape="array").json()
    assert row[0]["raw"] and row[0]["payload"]


def test_arbitrary_sql_refused(ds: Datasette) -> None:
    for path, params in (
        (f"/{ds.name}.json", {"sql": "select raw from events limit 1"}),
        (f"/{ds.name}", {"sql": "select 1"}),
        (f"/{ds.name}.csv", {"sql": "select 1"}),
        (f"/{ds.name}/calls.json", {"_where": "1 = 1"}),
    ):
        assert ds.get(path, **params).status_code == 403, (path, params)
    ok = ds.get(f"/{ds.name}.json", token=OPERATOR_TOKEN, sql="select count(*) as n from events")
    assert ok.status_code == 200 and ok.json()["rows"][0][0] > 0


def test_wrong_token_is_anonymous(ds: Datasette) -> None:
    assert ds.get(f"/{ds.name}/events.json", token="not-the-token").status_code == 403
    response = httpx.get(f"{ds.url}/{ds.name}/events.json", headers={"authorization": "Basic x"})
    assert response.status_code == 403


def test_calls_and_projections_served(ds: Datasette, built: Built) -> None:
    calls = ds.get(f"/{ds.name}/calls.json", _shape="array", _size="max").json()
    assert {c["voice_id"] for c in calls} == set(built.reference.calls)
    for table in PUBLIC_TABLES:
        assert ds.get(f"/{ds.name}/{table}.json").status_code == 200, table
    facets = ds.get(f"/{ds.name}/calls.json", _facet="final_state").json()
    assert "final_state" in facets["facet_results"]


def test_aggregate_queries_public_operator_ones_not(ds: Datasette) -> None:
    queries = metadata()["databases"]["callgate"]["queries"]
    for name, query in queries.items():
        anonymous = ds.get(f"/{ds.name}/{name}.json", voice_id="x").status_code
        operator = ds.get(f"/{ds.name}/{name}.json", token=OPERATOR_TOKEN, voice_id="x")
        assert operator.status_code == 200, name
        if name in OPERATOR_ONLY_QUERIES:
            assert query["allow"] == {"id": "operator"}
            assert anonymous == 403, name
        else:
            assert anonymous == 200, name


def test_dashboard_runs_only_its_own_sql(ds: Datasette) -> None:
    """Anonymous dashboards fetch their chart SQL; one changed character is arbitrary SQL."""
    dashboards = metadata()["plugins"]["datasette-dashboards"]
    assert ds.get("/-/dashboards/calls-overview").status_code == 200
    for dashboard in dashboards.values():
        for chart in dashboard["charts"].values():
            sql = chart["query"]
            ok = ds.get(f"/{ds.name}.json", sql=sql, _shape="objects")
            assert ok.status_code == 200, sql
            assert ok.json()["rows"]
            assert ds.get(f"/{ds.name}.json", sql=sql + " ", _shape="objects").status_code == 403
            assert ds.get(f"/{ds.name}", sql=sql).status_code == 403  # only the JSON fetch
            extra = ds.get(f"/{ds.name}.json", sql=sql, _shape="objects", _timelimit="1")
            assert extra.status_code == 403


def test_no_downloads_and_token_never_shown(ds: Datasette) -> None:
    assert ds.get(f"/{ds.name}.db").status_code == 403
    assert ds.get(f"/{ds.name}.db", token=OPERATOR_TOKEN).status_code == 403
    shown = ds.get("/-/metadata.json").text + ds.get("/-/metadata.json", token=OPERATOR_TOKEN).text
    assert OPERATOR_TOKEN not in shown
    assert OPERATOR_TOKEN not in rendered_metadata_path(ds.db).read_text()
    assert '"$env": "CALLGATE_DATASETTE_TOKEN"' in rendered_metadata_path(ds.db).read_text()


def test_other_database_name_keeps_permissions(tmp_path: Path, built: Built) -> None:
    """--db prod.db: metadata is keyed by name, so it is re-rendered for that name."""
    other = tmp_path / "prod.db"
    shutil.copy(built.db, other)
    for suffix in ("-wal", "-shm"):
        if Path(built.db + suffix).exists():
            shutil.copy(built.db + suffix, str(other) + suffix)
    instance = Datasette(str(other)).start()
    try:
        assert instance.name == "prod"
        assert instance.get("/prod/events.json").status_code == 403
        assert instance.get("/prod.json", sql="select 1").status_code == 403
        assert instance.get("/prod/calls.json").status_code == 200
        assert instance.get("/prod/events.json", token=OPERATOR_TOKEN).status_code == 200
        described = instance.get("/prod/calls.json").json()
        assert "description" in str(instance.get("/-/metadata.json").json()["databases"]["prod"])
        assert described["rows"]
        assert instance.get("/-/dashboards/calls-overview").status_code == 200
        chart = metadata()["plugins"]["datasette-dashboards"]["calls-overview"]["charts"]
        sql = chart["total-calls"]["query"]
        assert instance.get("/prod.json", sql=sql, _shape="objects").status_code == 200
    finally:
        instance.stop()


def test_without_token_operator_access_is_off_not_broken(built: Built) -> None:
    """No $CALLGATE_DATASETTE_TOKEN: bearer requests are anonymous (no 500), public pages work."""
    instance = Datasette(built.db, token=None).start()
    try:
        assert instance.get(f"/{instance.name}/calls.json").status_code == 200
        for token in (OPERATOR_TOKEN, "anything"):
            response = instance.get(f"/{instance.name}/events.json", token=token)
            assert response.status_code == 403
    finally:
        instance.stop()


def test_callgate_datasette_command_serves_mutable_db(tmp_path: Path) -> None:
    """The real CLI: creates the schema, serves it mutable (WAL), sees new rows live."""
    from analytics import projector
    from gateway.config import Config
    from gateway.log import eventlog, intake
    from gateway.wire import ingest
    from tests.corpus import APP_ID, flows

    db = str(tmp_path / "fresh" / "callgate.db")
    port = free_port()
    env = {TOKEN_ENV: OPERATOR_TOKEN, "PATH": "/usr/bin:/bin"}
    url = f"http://127.0.0.1:{port}"
    server = Subprocess(tmp_path / "datasette.log", env)
    try:
        server.launch(
            [CALLGATE, "datasette", "--db", db, "--port", str(port)],
            lambda: wait_http(url + "/-/versions.json", timeout=30, proc=server.proc),
        )
        databases = httpx.get(url + "/-/databases.json").json()
        assert [(d["name"], d["is_mutable"]) for d in databases] == [("callgate", True)]
        assert httpx.get(url + "/callgate/calls.json?_shape=array").json() == []
        # Every canned query also works on an empty database.
        auth = {"authorization": f"Bearer {OPERATOR_TOKEN}"}
        for name in metadata()["databases"]["callgate"]["queries"]:
            response = httpx.get(f"{url}/callgate/{name}.json?_shape=array", headers=auth)
            assert response.status_code == 200, (name, response.text[:300])
        # Write through the real path while Datasette runs: it must see the WAL.
        conn = connect(db)
        config = Config(db_path=db, app_ids=(APP_ID,))
        flow = flows()[0]
        for request in flow.wire:
            verdict = ingest.interpret(
                ingest.Headers.of(request.headers), request.body, config, utc_now()
            )
            assert isinstance(verdict, ingest.Accepted)
            eventlog.append(conn, intake.to_new_event(conn, verdict, utc_now()))
        projector.project_all(conn)
        conn.close()
        calls = httpx.get(url + "/callgate/calls.json?_shape=array").json()
        assert [c["voice_id"] for c in calls] == [flow.expect["voice_id"]]
        assert calls[0]["duration_s"] == flow.expect["duration_s"]
        assert httpx.get(url + "/callgate/events.json").status_code == 403
        events = httpx.get(
            url + "/callgate/events.json", headers={"authorization": f"Bearer {OPERATOR_TOKEN}"}
        )
        assert events.status_code == 200
    finally:
        server.stop()
    assert server.proc is not None and server.proc.returncode is not None
    output = server.log_path.read_text(errors="replace")
    assert "Traceback" not in output, output
