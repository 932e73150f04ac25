"""`postbackd diff`: what a rules change does to a sample of real conversions (for review)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from daemon.cli.common import config_option, load_or_exit, rules_dir_from, rules_option
from daemon.cli.diffing import SampleError, diff, read_samples, report_json, report_text
from daemon.cli.history import load_base
from daemon.errors import RulesError
from daemon.gitutil import GitError


@click.command(name="diff")
@click.option("--base", required=True, metavar="GIT_REF", help="The commit to compare with.")
@click.option(
    "--conversions",
    "conversions",
    required=True,
    metavar="FILE.jsonl",
    type=click.Path(dir_okay=False),
    help="One conversion per line (the explain format, optional previous_status).",
)
@rules_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@config_option
def diff_cmd(base: str, conversions: str, rules: str | None, fmt: str, config: str | None) -> None:
    """Show which deliveries a rules change adds, removes or changes (method, URL, headers,
    body) for a sample of conversions, comparing the rules at GIT_REF with the files now.

    It informs and does not judge: exit 0 whatever changed, 1 only when an input is bad.
    Nothing is sent; secrets show as ****.
    """
    root = rules_dir_from(rules, config)
    try:
        samples = read_samples(Path(conversions))
    except SampleError as err:
        raise click.ClickException(str(err)) from err
    head = load_or_exit(root)
    try:
        before = load_base(root, base)
    except GitError as err:
        raise click.ClickException(f"--base {base}: {err}") from err
    except RulesError as err:
        raise click.ClickException(
            f"the rules at {base} do not load ({len(err.issues)} error(s)); nothing to compare"
        ) from err
    report = diff(before, head, samples, base)
    if fmt == "json":
        click.echo(json.dumps(report_json(report), indent=2, default=str))
    else:
        click.echo(report_text(report))
