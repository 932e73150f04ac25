"""The `postbackd` command line: one group, and the commands of each family registered here,
explicitly (daemon/cli/<family>.py defines them; none of them imports this module).

Errors are one clear line on stderr and a non-zero exit (1 for a failed check, 2 for a usage
error), whatever click would print by default.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO, cast

import click

from daemon import __version__
from daemon.cli import (
    affiliates,
    check,
    diff,
    log,
    replay,
    rules,
    rules_add,
    rules_bulk,
    rules_show,
    run,
    send_test,
    store,
    validate,
)
from daemon.log import configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="postbackd")
def cli() -> None:
    """postbackd delivers affiliate-marketing postbacks from rules kept in git.

    Trackers post conversions to /webhooks/{source}; on every new conversion and status change
    the rules in rules.d/ decide which postbacks fire, and each is delivered at least once.
    """
    # A command's output is stdout's alone (JSON for scripts): its log lines, warnings and up,
    # go to stderr. `run` sets the daemon's own logging from its settings.
    configure_logging("auto", "warning", stream=cast(TextIO, _Stderr()))


class _Stderr:
    """sys.stderr as it is when a line is written (not when logging was set up: a caller that
    swaps it, as click's test runner does, may close the one it swapped in)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def _register() -> None:
    for command in (
        run.run,
        run.migrate,
        validate.validate,
        check.explain_cmd,
        check.test_cmd,
        diff.diff_cmd,
        send_test.send_test,
        rules.rules,
        store.deliveries,
        store.conversions,
        replay.backfill_cmd,
    ):
        cli.add_command(command)
    store.deliveries.add_command(replay.resend_cmd)
    store.deliveries.add_command(log.deliveries_list)
    store.conversions.add_command(replay.replay_cmd)
    store.conversions.add_command(log.conversions_list)
    for sub in (
        rules_add.add_cmd,
        rules_add.duplicate_cmd,
        rules_bulk.enable_cmd,
        rules_bulk.disable_cmd,
        rules_bulk.delete_cmd,
        rules_bulk.goals,
        rules_show.show_cmd,
        affiliates.history_cmd,
        affiliates.export_cmd,
    ):
        rules.rules.add_command(sub)


_register()


def main(args: Sequence[str] | None = None) -> None:
    """Entry point: one clear line on stderr for every error, whatever click would print."""
    try:
        cli.main(args, prog_name="postbackd", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as err:
        click.echo(err.ctx.get_help() if err.ctx else "", err=True)
        sys.exit(2)
    except click.UsageError as err:
        cmd = err.ctx.command_path if err.ctx else "postbackd"
        click.echo(f"{cmd}: error: {err.format_message()} (see {cmd} --help)", err=True)
        sys.exit(2)
    except click.ClickException as err:
        click.echo(f"postbackd: error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("postbackd: aborted", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
