"""A command's output is stdout's alone: what it logs goes to stderr, warnings and up, whatever
structlog was set to before (a new process has structlog's defaults: every level, on stdout)."""

from __future__ import annotations

import click
import structlog

from daemon.cli import cli
from tests.test_cli_ops_kit import run


def test_a_commands_log_lines_go_to_stderr_from_warning_up() -> None:
    structlog.reset_defaults()

    @cli.command("log-probe", hidden=True)
    def probe() -> None:
        log = structlog.get_logger("postbackd.probe")
        log.debug("probe_debug")
        log.info("probe_info")
        log.warning("probe_warning", detail="x")
        click.echo('{"output": true}')

    try:
        result = run("log-probe")
    finally:
        cli.commands.pop("log-probe", None)
    assert result.code == 0, result.err
    assert result.out == '{"output": true}\n'
    assert "probe_warning" in result.err
    assert "probe_info" not in result.err
    assert "probe_debug" not in result.err


def test_lines_logged_after_a_command_go_to_the_stderr_of_their_time() -> None:
    """The command's runner swapped stderr and closed it afterwards: a line logged later (an
    in-process daemon's, in the tests) goes to the stderr in place then, not to the closed one."""
    import io
    import sys

    result = run("validate", "--help")
    assert result.code == 0
    err = io.StringIO()
    saved, sys.stderr = sys.stderr, err
    try:
        structlog.get_logger("postbackd.later").warning("after_the_command")
    finally:
        sys.stderr = saved
    assert "after_the_command" in err.getvalue()
