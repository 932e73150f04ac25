"""What every command of the command line shares: the -c and --rules options, settings, rules
and conversion files read with one clear error line each."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from daemon.errors import ConfigError, InputError, RulesError
from daemon.loader import RuleSet, load_rules
from daemon.models import Conversion, conversion_from_mapping
from daemon.settings import Settings, config_path, load_settings
from daemon.userjson import json_value


def settings_from(config: str | None) -> Settings:
    """The settings for a command: -c, else $POSTBACKD_CONFIG, else config/postbackd.yaml."""
    try:
        return load_settings(config_path(config, os.environ), os.environ)
    except ConfigError as err:
        raise click.ClickException(str(err)) from err


def rules_dir_from(rules: str | None, config: str | None) -> Path:
    """--rules DIR, else rules_dir of the settings given with -c, else ./rules.d; a clear
    error saying what was looked for when that directory does not exist."""
    if rules:
        return require_rules_dir(Path(rules), rules, config)
    if config or os.environ.get("POSTBACKD_CONFIG"):
        return require_rules_dir(settings_from(config).rules_path, rules, config)
    return require_rules_dir(Path("rules.d"), rules, config)


def require_rules_dir(path: Path, rules: str | None, config: str | None) -> Path:
    """`path` when it is a directory; else one line saying where it came from and how to point
    the command at the right place."""
    if path.is_dir():
        return path
    if rules:
        raise click.ClickException(f"{path}: no such rules directory (given on the command line)")
    if config or os.environ.get("POSTBACKD_CONFIG"):
        where = config or f"$POSTBACKD_CONFIG={os.environ.get('POSTBACKD_CONFIG')}"
        raise click.ClickException(
            f"{path}: no such rules directory (rules_dir of the settings {where}); "
            "fix rules_dir there, or give --rules DIR"
        )
    raise click.ClickException(
        f"no rules directory here: looked for ./rules.d in {Path.cwd()} (no --rules, no -c, "
        "no $POSTBACKD_CONFIG); run this at the top of the rules repository, or point at it "
        "with --rules DIR or -c SETTINGS.yaml (its rules_dir)"
    )


def read_json_object(path: str) -> dict[str, Any]:
    """A JSON file holding one object (a conversion for explain or send-test); one clear
    error line otherwise."""
    try:
        obj = json_value(Path(path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise click.ClickException(f"{path}: cannot read JSON: {err}") from err
    if not isinstance(obj, dict):
        raise click.ClickException(f"{path}: must hold a JSON object")
    return obj


def conversion_of(obj: Mapping[str, Any], where: str) -> tuple[Conversion, str]:
    """The conversion (and its source) a JSON object describes; one clear error line if not."""
    try:
        return conversion_from_mapping(obj)
    except InputError as err:
        raise click.ClickException(f"{where}: {err.field}: {err.message}") from err


def load_or_exit(root: Path) -> RuleSet:
    try:
        return load_rules(root)
    except RulesError as err:
        for issue in err.issues:
            click.echo(str(issue), err=True)
        raise click.ClickException(
            f"the rules in {root} do not load ({len(err.issues)} error(s))"
        ) from err


config_option = click.option(
    "-c",
    "--config",
    metavar="FILE",
    help="Settings file (default: $POSTBACKD_CONFIG, else config/postbackd.yaml).",
)
rules_option = click.option(
    "--rules", metavar="DIR", help="Rules directory (default: rules_dir of -c, else ./rules.d)."
)
