"""`callgate backup`, `restore` and `replicate`: copies of the log that are checked first."""

from __future__ import annotations

import sys

import click

from gateway.cli.options import db_option
from gateway.config import Config
from gateway.log.backup import BackupError
from gateway.log.litestream import RESTORE_TIMEOUT

SYNC_INTERVAL = 1.0


def _config(db: str) -> Config:
    """The environment's Config; a mistyped variable becomes a refusal, not a traceback."""
    try:
        return Config.from_env(db_path=db)
    except ValueError as exc:
        raise BackupError(str(exc)) from None


def companions(db: str) -> dict[str, str]:
    """The other files an installation needs back after a disaster, by replica name: the
    forwarding secrets and the key store (without it every sealed field is unreadable)."""
    from gateway.forward.subscriptions import secrets_path
    from gateway.log.keystore import keys_path

    config = _config(db)
    return {
        "secrets": secrets_path(db, config.secrets_db),
        "keys": keys_path(db, config.keys_db),
    }


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    raise SystemExit(1)


@click.command("backup")
@db_option
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing DEST.")
def backup_command(db: str, dest: str, force: bool) -> None:
    """Copy the live log to DEST while the gateway keeps ingesting; verified before success.

    The forwarding secrets and the key store are copied beside it as
    DEST-stem.secrets.db (.keys.db).
    """
    from gateway.log.backup import backup

    try:
        checked = backup(db, dest, force=force, companions=companions(db))
    except BackupError as exc:
        _fail(exc)
    click.echo(
        f"ok: {checked.path}: {checked.events} events, head seq {checked.head_seq} "
        f"{checked.head_hash} (copied: {', '.join(checked.files)})"
    )


@click.command("restore")
@db_option
@click.argument("src")
@click.option("--force", is_flag=True, help="Replace a database that already holds events.")
@click.option(
    "--timeout",
    default=RESTORE_TIMEOUT,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds to wait for Litestream to fetch a replica.",
)
def restore_command(db: str, src: str, force: bool, timeout: float) -> None:
    """Put a backup file or a replica URL (file://, s3://, ...) in place of the database.

    Every copy is checked (integrity_check, hash chain) before it replaces anything.
    """
    from pathlib import Path

    from gateway.log import litestream
    from gateway.log.backup import Source, companion_file, from_file, restore

    def from_replica(url: str, name: str):  # type: ignore[no-untyped-def]
        return lambda temp: litestream.restore(
            url, temp, timeout, if_exists=name != "log"
        )

    try:
        files = {"log": db, **companions(db)}
        if "://" in src:
            sources = [
                Source(name, path, from_replica(litestream.replica_url(src, name), name))
                for name, path in files.items()
            ]
        else:
            if not Path(src).is_file():
                raise BackupError(f"{src}: no such file")
            sources = [
                Source(name, path, from_file(src if name == "log" else companion_file(src, name)))
                for name, path in files.items()
            ]
        checked = restore(sources, force=force)
    except BackupError as exc:
        _fail(exc)
    click.echo(
        f"ok: restored {checked.events} events into {checked.path}, head seq "
        f"{checked.head_seq} {checked.head_hash} (restored: {', '.join(checked.files)})"
    )
    for name in files.keys() - set(checked.files):
        click.echo(f"note: {src} holds no copy of the {name} file; {files[name]} left as it is",
                   err=True)


@click.command("replicate")
@db_option
@click.argument("url")
@click.option(
    "--sync-interval",
    default=SYNC_INTERVAL,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="Seconds between uploads: at most this much acknowledged data can be lost.",
)
def replicate_command(db: str, url: str, sync_interval: float) -> None:
    """Stream the log (and secrets, key store) to URL with Litestream until stopped.

    Run it beside `callgate serve` (or use `callgate up --replicate URL`); the
    gateway's checkpointer must not be in `truncate` mode meanwhile.
    """
    from gateway.cli.log import _open
    from gateway.log import litestream

    try:
        from gateway.forward.subscriptions import SecretStore

        # Litestream watches only files that exist: create the log and the secrets file.
        _open(db).close()
        files = {"log": db, **companions(db)}
        SecretStore(files["secrets"]).close()
        text = litestream.config(files, url, sync_interval)
        litestream.prepare_file_replica(url)
        path = litestream.write_config(db, text)
        if _config(db).checkpoint == "truncate":
            click.echo(
                "warning: CALLGATE_CHECKPOINT=truncate fights Litestream's read lock and "
                "stalls commits; run the gateway with CALLGATE_CHECKPOINT=passive",
                err=True,
            )
        click.echo(
            f"callgate replicate: {', '.join(files)} -> {url} every {sync_interval:g} s",
            err=True,
        )
        sys.stderr.flush()
        litestream.exec_replicate(path)
    except BackupError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(BackupError(f"cannot start litestream: {exc}"))


COMMANDS = (backup_command, restore_command, replicate_command)
