"""The `callgate` command line: one module per area, all registered on this group.

Nothing imports this package; it imports every feature it offers.
"""

from __future__ import annotations

import click

from gateway.cli import (
    archive,
    backup,
    datasette,
    erase,
    forward,
    log,
    project,
    serve,
    simulate,
    up,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="callgate")
def main() -> None:
    """callgate: receiver, event log, call history and forwarder for EnableX Voice webhooks."""
    from gateway.config import Config

    try:  # a misspelt setting (CALLGATE_PUBLIC_PII=mask) stops every command up front
        Config.from_env()
    except ValueError as exc:
        raise click.ClickException(f"bad configuration: {exc}") from None


for _command in (
    serve.serve,
    *archive.COMMANDS,
    *log.COMMANDS,
    up.up,
    simulate.simulate_command,
    *forward.COMMANDS,
    datasette.datasette,
    *project.COMMANDS,
    *backup.COMMANDS,
    erase.erase,
):
    main.add_command(_command)
