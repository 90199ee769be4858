"""Canned-query benchmark: every query Datasette offers, timed on a 100,000-call history.

Builds (or reuses) a log of about 1,000,000 events / 100,000 calls with bench/replay.py's
generator, rebuilds the projections with `analytics.projector.rebuild`, then runs every
canned query of metadata.yml (`databases.*.queries`, plus the SQL of datasette-dashboards
charts) the way Datasette would: a read-only connection with default cache, parameters
passed as strings. It prints, per query, the median of 3 runs in ms, the row count and the
EXPLAIN QUERY PLAN lines that scan a whole table or sort through a temporary B-tree, and
flags every query over the budget (200 ms). It says what it ran on (nproc, CPU, SQLite)
and the load average when timing starts and ends: other work on the machine inflates
every figure. Figures only: nothing is asserted.

    .venv/bin/python bench/queries.py [--db bench/out/queries.db] [--events 1000000]
                                      [--no-rebuild] [--time-limit 5]
                                      [--param name=value ...]
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.db import connect

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

# One description of the machine for every benchmark.
from ingest import load_average, machine  # noqa: E402

BUDGET_MS = 200.0
RUNS = 3
# `:name` parameters as Datasette finds them (not `::casts`, not inside identifiers).
PARAM_RE = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
# datasette-dashboards' optional filter blocks: dropped when their parameters are empty.
OPTIONAL_RE = re.compile(r"\[\[(.*?)\]\]", re.S)


@dataclass
class Query:
    """One canned query: where it came from, its SQL, and whether it is a dashboard chart."""

    name: str
    sql: str
    source: str


# --------------------------------------------------------------------------- the database


def ensure_log(db: Path, events: int) -> str:
    """Reuse `db` if it holds `events` events, else generate it with bench/replay.py."""
    existing = 0
    if db.exists():
        try:
            probe = sqlite3.connect(db)
            existing = probe.execute("SELECT count(*) FROM events").fetchone()[0]
            probe.close()
        except sqlite3.Error:
            existing = 0
    if existing == events:
        return f"reused {db} ({existing:,} events)"
    try:
        import replay  # bench/replay.py: the shared realistic-log generator
    except ImportError as exc:  # pragma: no cover - depends on the other benchmark existing
        raise SystemExit(f"bench/replay.py is needed to generate the log ({exc})") from exc
    started = time.perf_counter()
    written = replay.generate(str(db), events)
    return f"generated {written:,} events in {time.perf_counter() - started:.1f} s -> {db}"


def rebuild(db: Path) -> str:
    """Full projection rebuild, so the timed tables are exactly what the product builds."""
    try:
        from analytics import projector
    except ImportError as exc:  # pragma: no cover
        return f"analytics.projector not importable ({exc}): projections NOT rebuilt"

    conn = connect(str(db))
    try:
        started = time.perf_counter()
        n = projector.rebuild(conn)
        took = time.perf_counter() - started
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except Exception as exc:  # noqa: BLE001 - the projector may be mid-change: report, go on
        return f"projector.rebuild FAILED ({type(exc).__name__}: {exc}): tables timed as found"
    finally:
        conn.close()
    return f"rebuilt projections from {n:,} events in {took:.1f} s ({n / took:,.0f} events/s)"


def prepare(db: Path) -> str:
    """Every table Datasette would see (forwarding ones too), as `callgate datasette` makes."""
    try:
        from gateway.cli.datasette import prepare_database

        prepare_database(db)
    except Exception as exc:  # noqa: BLE001 - report and time whatever tables exist
        return f"prepare_database FAILED ({type(exc).__name__}: {exc})"
    return "tables ensured with gateway.cli.datasette.prepare_database"


# --------------------------------------------------------------------------- the queries


def load_queries(path: Path) -> list[Query]:
    """Canned queries and dashboard chart SQL from a Datasette metadata file."""
    meta = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    found: list[Query] = []
    for db_name, db_meta in (meta.get("databases") or {}).items():
        for name, spec in ((db_meta or {}).get("queries") or {}).items():
            sql = spec.get("sql") if isinstance(spec, dict) else spec
            if isinstance(sql, str) and sql.strip():
                found.append(Query(name, sql, f"{db_name} query"))
    dashboards = (meta.get("plugins") or {}).get("datasette-dashboards") or {}
    for dash_name, dash in dashboards.items():
        for chart_name, chart in ((dash or {}).get("charts") or {}).items():
            sql = (chart or {}).get("query")
            if isinstance(sql, str) and sql.strip():
                found.append(Query(f"{dash_name}/{chart_name}", sql, "dashboard chart"))
    return found


def variants(query: Query) -> Iterator[tuple[str, str]]:
    """(label, sql): a dashboard chart is timed unfiltered (its default view) and filtered."""
    if not OPTIONAL_RE.search(query.sql):
        yield query.name, query.sql
        return
    yield f"{query.name} [unfiltered]", OPTIONAL_RE.sub(" ", query.sql)
    yield f"{query.name} [filtered]", OPTIONAL_RE.sub(lambda m: f" {m.group(1)} ", query.sql)


class ParamValues:
    """Sensible values for a query's parameters, taken from the data itself.

    Datasette hands parameters to SQLite as text, so every value here is a string too.
    """

    def __init__(self, conn: sqlite3.Connection, overrides: dict[str, str]) -> None:
        self.conn = conn
        self.overrides = overrides
        self.unknown: set[str] = set()
        self._columns = self._projection_columns()
        self._cache: dict[str, str] = {}
        first, last = self._one("SELECT min(occurred_at), max(occurred_at) FROM events")
        self.first_day = (first or "2024-01-01")[:10]
        self.last_day = (last or "2024-01-01")[:10]
        self.voice_id = self._one(
            "SELECT voice_id FROM events WHERE voice_id IS NOT NULL "
            "GROUP BY voice_id ORDER BY count(*) DESC LIMIT 1"
        )[0]
        self.broadcast_id = self._one(
            "SELECT broadcast_id FROM events WHERE broadcast_id IS NOT NULL LIMIT 1"
        )[0]

    def _one(self, sql: str) -> tuple[Any, ...]:
        try:
            row = self.conn.execute(sql).fetchone()
        except sqlite3.Error:
            return (None, None)
        return tuple(row) if row else (None, None)

    def _projection_columns(self) -> dict[str, str]:
        """column name -> first table holding it (projections first, then the log)."""
        tables = [r[0] for r in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name = 'events', name"
        )]  # fmt: skip
        columns: dict[str, str] = {}
        for table in tables:
            for col in self.conn.execute(f'PRAGMA table_info("{table}")'):
                columns.setdefault(col[1], table)
        return columns

    def _most_common(self, column: str) -> str | None:
        table = self._columns[column]
        value = self._one(
            f'SELECT "{column}" FROM "{table}" WHERE "{column}" IS NOT NULL '
            f'GROUP BY 1 ORDER BY count(*) DESC LIMIT 1'
        )[0]
        return None if value is None else str(value)

    def value(self, name: str) -> str:
        if name in self.overrides:
            return self.overrides[name]
        if name not in self._cache:
            self._cache[name] = self._guess(name)
        return self._cache[name]

    def _guess(self, name: str) -> str:
        low = name.lower()
        if "voice" in low and self.voice_id:
            return str(self.voice_id)
        if "broadcast" in low and self.broadcast_id:
            return str(self.broadcast_id)
        if low in self._columns and not any(w in low for w in ("_at", "date", "time")):
            common = self._most_common(low)
            if common is not None:
                return common
        if any(w in low for w in ("number", "phone", "caller", "msisdn")):
            return self._most_common("from_number") or ""
        if any(w in low for w in ("limit", "top", "size", "rows")) or low == "n":
            return "100"
        if any(w in low for w in ("hours", "hour")):
            return "24"
        if "days" in low:
            return "7"
        if any(w in low for w in ("seconds", "secs", "minute", "mins", "min_", "threshold")):
            return "30"
        if any(w in low for w in ("start", "since", "after", "begin", "from", "first")):
            return self.first_day
        if any(w in low for w in ("end", "until", "before", "to", "last")):
            return self.last_day + "T23:59:59.999Z"
        if any(w in low for w in ("day", "date")):
            return self.last_day
        if low == "q" or any(w in low for w in ("text", "search", "term", "phrase")):
            return "yes"
        if "digit" in low:
            return "1"
        self.unknown.add(name)
        return ""


# --------------------------------------------------------------------------- timing


def plan_lines(conn: sqlite3.Connection, sql: str, params: dict[str, str]) -> list[str]:
    """EXPLAIN QUERY PLAN details that read a whole table/index or sort in a temp B-tree."""
    try:
        rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
    except sqlite3.Error as exc:
        return [f"(no plan: {exc})"]
    shown = []
    for row in rows:
        detail = str(row[-1])
        if detail.startswith("SCAN") and "CONSTANT ROW" not in detail:
            kind = "full index scan" if "INDEX" in detail else "FULL TABLE SCAN"
            shown.append(f"{kind}: {detail}")
        elif "TEMP B-TREE" in detail:
            shown.append(f"sort: {detail}")
    return shown


def _past(deadline: float) -> Callable[[], int]:
    """A progress handler that asks SQLite to abort once `deadline` has passed."""
    return lambda: int(time.perf_counter() > deadline)


class QueryTimeout(Exception):
    """A run exceeded the time limit (Datasette would cancel it the same way)."""


def time_query(
    conn: sqlite3.Connection, sql: str, params: dict[str, str], limit_s: float
) -> tuple[float, int]:
    """Median ms over RUNS complete executions (all rows fetched) and the row count.

    A progress handler aborts a run after `limit_s`, as Datasette's sql_time_limit_ms
    does, so one pathological query cannot stall the whole benchmark.
    """
    timings = []
    rows = 0
    for _ in range(RUNS):
        started = time.perf_counter()
        deadline = started + limit_s
        conn.set_progress_handler(_past(deadline), 10_000)
        try:
            rows = len(conn.execute(sql, params).fetchall())
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc):
                raise QueryTimeout(f"over {limit_s:g} s, cancelled") from None
            raise
        finally:
            conn.set_progress_handler(None, 0)
        timings.append((time.perf_counter() - started) * 1e3)
    return statistics.median(timings), rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", default=str(BENCH / "out" / "queries.db"),
                   help="database to build or reuse (git-ignored bench/out/ by default)")
    p.add_argument("--events", type=int, default=1_000_000, help="log size to generate")
    p.add_argument("--metadata", default=str(ROOT / "metadata.yml"))
    p.add_argument("--no-rebuild", action="store_true",
                   help="time the projections as they are (skip the full rebuild)")
    p.add_argument("--time-limit", type=float, default=5.0, metavar="SECONDS",
                   help="cancel a run after this long (Datasette's sql_time_limit_ms: 5 s)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override a parameter value (repeatable)")
    args = p.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.param)
    db = Path(args.db)
    db.parent.mkdir(parents=True, exist_ok=True)

    print(f"{machine()} sqlite={sqlite3.sqlite_version}")
    print(ensure_log(db, args.events))
    print(prepare(db))
    print("projections kept as they are" if args.no_rebuild else rebuild(db))

    metadata = Path(args.metadata)
    if not metadata.exists():
        print(f"{metadata} does not exist yet: no canned queries to time")
        return 0
    queries = load_queries(metadata)
    if not queries:
        print(f"{metadata} defines no canned queries or dashboard charts")
        return 0

    # Datasette reads a mutable database through a read-only connection, default cache.
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    calls = conn.execute("SELECT count(*) FROM calls").fetchone()[0] if _has(conn, "calls") else 0
    events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    print(f"database: {events:,} events, {calls:,} calls; {len(queries)} queries from {metadata}")
    print(f"timing starts: {load_average()}")
    values = ParamValues(conn, overrides)
    slow: list[str] = []
    failed: list[str] = []
    slowest = (0.0, "")
    for query in queries:
        for label, sql in variants(query):
            names = sorted(set(PARAM_RE.findall(sql)))
            params = {name: values.value(name) for name in names}
            try:
                ms, rows = time_query(conn, sql, params, args.time_limit)
            except QueryTimeout as exc:
                slow.append(f"{label} >{args.time_limit:g} s")
                print(f"\n{label} ({query.source}): TIMED OUT ({exc})  ** OVER 200 ms **")
                for line in plan_lines(conn, sql, params):
                    print(f"    {line}")
                continue
            except sqlite3.Error as exc:
                failed.append(label)
                print(f"\n{label} ({query.source}): ERROR {exc}")
                continue
            slowest = max(slowest, (ms, label))
            flag = "  ** OVER 200 ms **" if ms > BUDGET_MS else ""
            if flag:
                slow.append(f"{label} {ms:.0f} ms")
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            print(f"\n{label} ({query.source}): {ms:8.1f} ms  {rows} rows{flag}")
            if shown:
                print(f"    params: {shown}")
            for line in plan_lines(conn, sql, params):
                print(f"    {line}")
    conn.close()
    print()
    print(f"timing ends: {load_average()}")
    if values.unknown:
        print(f"no sensible value known for: {', '.join(sorted(values.unknown))} (sent '';"
              " use --param)")  # fmt: skip
    print(f"slowest: {slowest[1]} {slowest[0]:.1f} ms")
    print(f"over {BUDGET_MS:.0f} ms: {len(slow)}" + (f" ({'; '.join(slow)})" if slow else ""))
    if failed:
        print(f"failed: {len(failed)} ({', '.join(failed)})")
    return 0


def _has(conn: sqlite3.Connection, table: str) -> bool:
    return conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)
    ).fetchone() is not None


if __name__ == "__main__":
    raise SystemExit(main())
