"""How callgate runs Datasette: one command line, shared by `callgate datasette` and `callgate up`.

Datasette keys metadata by database name (the file's stem), so metadata.yml is
written for a database called ``callgate``. A database file with another name
would silently lose every permission in it (the event log would become
public), so the metadata is always rendered for the real name into a file next
to the database before Datasette starts. The database is served mutable: ``-i``
(immutable) would ignore the WAL and show stale or torn data.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gateway.config import DATASETTE_TOKEN_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
# A symlink to the repository's metadata.yml, so a wheel ships the same file.
METADATA_PATH = Path(__file__).resolve().parent / "metadata.yml"
PLUGINS_DIR = Path(__file__).resolve().parent / "datasette_plugins"
# The call page and the calls page (row-/table-callgate-calls.html).
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
METADATA_DB_NAME = "callgate"
TOKEN_ENV = DATASETTE_TOKEN_ENV
OPERATOR_ID = "operator"
MIN_TOKEN_LENGTH = 16
METADATA_MODE = 0o640
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001
# Settings passed on every start: no downloads of the whole file (it holds raw
# payloads), enough time for the analytics queries on a large history, and no facet
# suggestions (a trial query per column: over a second per page on 100,000 calls).
SETTINGS = {
    "allow_download": "off",
    "default_allow_sql": "off",
    "sql_time_limit_ms": "5000",
    "facet_time_limit_ms": "500",
    "suggest_facets": "off",
    "max_returned_rows": "5000",
}


def database_name(db: str | os.PathLike[str]) -> str:
    """The name Datasette gives a database file: its stem."""
    return Path(db).stem


def load_metadata(path: Path = METADATA_PATH) -> dict[str, Any]:
    """metadata.yml as a dict (YAML anchors resolved)."""
    with open(path, encoding="utf-8") as handle:
        loaded = yaml.safe_load(handle)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} is not a YAML mapping")
    return loaded


def render_metadata(
    metadata: Mapping[str, Any], db_name: str, token_configured: bool
) -> dict[str, Any]:
    """metadata.yml re-keyed for `db_name`; the operator token only when it is configured.

    The token stays an ``{"$env": …}`` reference (resolved by Datasette), so the
    rendered file and /-/metadata never contain it. Without the variable the
    token list is emptied: datasette-auth-tokens would otherwise compare against
    None and fail every request that carries a bearer token.
    """
    rendered: dict[str, Any] = json.loads(json.dumps(metadata))
    databases = rendered.get("databases") or {}
    if METADATA_DB_NAME in databases and db_name != METADATA_DB_NAME:
        databases[db_name] = databases.pop(METADATA_DB_NAME)
    plugins = rendered.setdefault("plugins", {})
    for dashboard in (plugins.get("datasette-dashboards") or {}).values():
        for chart in (dashboard.get("charts") or {}).values():
            if chart.get("db") == METADATA_DB_NAME:
                chart["db"] = db_name
    tokens_config = plugins.setdefault("datasette-auth-tokens", {})
    if not token_configured:
        tokens_config["tokens"] = []
    return rendered


def operator_token_problem(token: str | None) -> str | None:
    """A human-readable warning when operator access is off or weak, else None."""
    token = token or ""
    if not token:
        return f"{TOKEN_ENV} is not set: operator access is disabled (anonymous view only)"
    if len(token) < MIN_TOKEN_LENGTH:
        return f"{TOKEN_ENV} is shorter than {MIN_TOKEN_LENGTH} characters: use a long random token"
    return None


def rendered_metadata_path(db: str | os.PathLike[str]) -> Path:
    """Where the per-database metadata goes: beside the database, hidden."""
    path = Path(db)
    return path.with_name(f".{path.stem}.datasette-metadata.json")


def write_metadata(
    db: str | os.PathLike[str],
    token_configured: bool,
    source: Path = METADATA_PATH,
) -> Path:
    """Render metadata.yml for this database file and write it atomically; returns its path."""
    target = rendered_metadata_path(db)
    target.parent.mkdir(parents=True, exist_ok=True)
    rendered = render_metadata(load_metadata(source), database_name(db), token_configured)
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    # Created readable by owner and group only, whatever the umask allows.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, METADATA_MODE)
    os.fchmod(fd, METADATA_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(rendered, indent=2, sort_keys=False))
    os.replace(tmp, target)
    return target


def datasette_argv(
    db: str | os.PathLike[str],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token_configured: bool = False,
) -> list[str]:
    """The full `datasette serve` command line for this database (writes the rendered metadata).

    Run it with the caller's environment: the operator token is read from
    $CALLGATE_DATASETTE_TOKEN by the Datasette process itself.
    """
    metadata = write_metadata(db, token_configured)
    argv = [
        sys.executable,
        "-m",
        "datasette",
        "serve",
        str(db),
        "--host",
        host,
        "--port",
        str(port),
        "--metadata",
        str(metadata),
        "--plugins-dir",
        str(PLUGINS_DIR),
        "--template-dir",
        str(TEMPLATES_DIR),
    ]
    for name, value in SETTINGS.items():
        argv += ["--setting", name, value]
    return argv
