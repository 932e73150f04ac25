"""`postbackd validate`: every rule file, the catalogue and the retired ids kept with them, and
the source files; errors and warnings one line each, counted on the last line."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from daemon.affiliates.policy import file_id_issues, load_policy
from daemon.catalogue import Catalogue, load_catalogue, load_retired
from daemon.cli.common import config_option, rules_dir_from, settings_from
from daemon.cli.history import base_at, compare, new_without_origin
from daemon.errors import Issue, RulesError
from daemon.gitutil import GitError
from daemon.loader import RuleSet, load_rules
from daemon.rulelint import lint
from daemon.secrets import SecretResolver
from daemon.sources import Source, exposure_warnings, load_sources

FORMAT = click.Choice(["text", "json"])


def _resolver(config: str | None) -> SecretResolver:
    settings = settings_from(config) if config or os.environ.get("POSTBACKD_CONFIG") else None
    return SecretResolver(
        credentials_dir=os.environ.get("CREDENTIALS_DIRECTORY"),
        secrets_dir=settings.secrets_path if settings else None,
        environ=os.environ,
    )


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@click.command()
@click.argument("rules_dir", required=False, metavar="[RULES_DIR]")
@click.option("--base", metavar="GIT_REF", help="Also check what may not change since this commit.")
@click.option(
    "--webhooks",
    "webhooks",
    metavar="DIR",
    help="Also check the source definitions in DIR (default: webhooks_dir of -c, if any).",
)
@click.option("--strict", is_flag=True, help="Warnings are errors (for CI).")
@click.option("--format", "fmt", type=FORMAT, default="text", show_default=True)
@config_option
def validate(
    rules_dir: str | None,
    base: str | None,
    webhooks: str | None,
    strict: bool,
    fmt: str,
    config: str | None,
) -> None:
    """Check every rule file (and source file); exit 0 when valid, 1 with one line per error.

    Lines read `file:line: postback N: message`; warnings (a secret not set on this machine, a
    condition reading a field no source provides) read `warning: ...` and are counted on the
    last line (on stderr when it fails); --strict makes them errors. With a catalogue
    (rules.d/catalogue.yaml), unknown offers, goals and affiliates are errors; ids listed in
    rules.d/retired-ids.yaml can never come back. With --base, an existing postback may not
    change its action type, offer, created_at or author since GIT_REF, and a new one must
    carry created_at and author. With --webhooks (or -c), the sources of webhooks/ are
    checked too, with the same rigour.
    """
    root = rules_dir_from(rules_dir, config)
    issues: list[Issue] = []
    hooks = _webhooks_dir(webhooks, config)
    sources = _check_sources(hooks, issues)
    rules: RuleSet | None = None
    try:
        rules = load_rules(root)
    except RulesError as err:
        issues.extend(err.issues)
    catalogue = _guarded(lambda: load_catalogue(root), issues)
    retired = _guarded(lambda: load_retired(root), issues) or {}
    _guarded(lambda: load_policy(root), issues)  # rules.d/affiliates.yaml (issue 15)
    if rules is not None:
        issues.extend(file_id_issues(rules.postbacks.values()))
    base_note = None
    base_retired: dict[int, int] = {}
    if base and rules is not None:
        try:
            with base_at(root, base) as (base_rules, base_dir):  # one archive for both
                issues.extend(compare(rules, base_rules, base))
                issues.extend(new_without_origin(rules, base_rules, base))
                base_retired = load_retired(base_dir) if base_dir.is_dir() else {}
        except GitError as err:
            raise click.ClickException(f"--base {base}: {err}") from err
        except RulesError:
            base_note = f"the rules at {base} do not load; nothing to compare against"
    warnings: list[Issue] = []
    if rules is not None:
        found = lint(
            rules,
            catalogue=catalogue,
            retired=retired,
            base_retired=base_retired,
            params=_params(sources),
        )
        issues.extend(found.errors)
        warnings.extend(found.warnings)
    if hooks is not None:  # a door left open: said first, in the words of docs/sources.md
        warnings.extend(
            Issue(source.file, 1, f"source {source.name} {why}")
            for source, why in exposure_warnings(sources or {})
        )
    resolver = _resolver(config)
    secrets = sorted(
        set(rules.secrets if rules else ())
        | {n for s in (sources or {}).values() for n in s.secrets}
    )
    unset = [name for name in secrets if not resolver.where(name)]
    count = len(warnings) + len(unset)
    failed = bool(issues) or (strict and count > 0)
    if fmt == "json":
        result = _validate_json(root, rules, issues, secrets, resolver)
        result["valid"] = not failed
        result["warnings"] = [_issue_json(w) for w in sorted(warnings)] + [
            {"file": None, "line": None, "postback": None, "message": f"secret {n!r} is not set"}
            for n in unset
        ]
        result["webhooks_dir"] = str(hooks) if hooks else None
        result["sources"] = sorted(sources) if sources is not None else []
        click.echo(json.dumps(result, indent=2))
        sys.exit(1 if failed else 0)
    for issue in sorted(issues):
        click.echo(str(issue))
    tag = "error" if strict else "warning"
    for warning in sorted(warnings):
        click.echo(f"{tag}: {warning}")
    if base_note:
        click.echo(f"note: {base_note}", err=True)
    if rules is not None and not failed:
        click.echo(
            f"ok: {len(rules.postbacks)} postbacks for {len(rules.offers)} offers "
            f"in {len(rules.files)} files, version {rules.version}"
        )
        if catalogue is not None:
            click.echo(
                f"ok: catalogue of {plural(len(catalogue.offers), 'offer')} and "
                f"{plural(len(catalogue.affiliates), 'affiliate')}"
            )
        if hooks is not None and sources is not None:
            names = ", ".join(sorted(sources)) or "none"
            click.echo(f"ok: {len(sources)} sources in {hooks} ({names})")
    for name in secrets:  # on failure, stdout holds only the problems (one per line)
        where = resolver.where(name)
        if where and not failed:
            click.echo(f"secret {name}: found in {where}")
        elif not where and (strict or not failed):
            click.echo(f"{tag}: secret {name}: not set here")
    if failed:
        errors = len(issues) + (count if strict else 0)
        summary = f"invalid: {plural(errors, 'error')}"
        click.echo(summary + ("" if strict else f", {plural(count, 'warning')}"), err=True)
        sys.exit(1)
    postbacks = len(rules.postbacks) if rules else 0
    click.echo(f"ok: {plural(postbacks, 'postback')}, {plural(count, 'warning')}")


def _guarded(load: Any, issues: list[Issue]) -> Any:
    try:
        return load()
    except RulesError as err:
        issues.extend(err.issues)
        return None


def _params(sources: Mapping[str, Source] | None) -> dict[str, str]:
    """Inbound parameter -> canonical field, for every source that renames one."""
    found: dict[str, str] = {}
    for source in (sources or {}).values():
        for canonical, param in source.fields.items():
            if param and param != canonical:
                found.setdefault(param, canonical)
    return found


def _webhooks_dir(option: str | None, config: str | None) -> Path | None:
    """--webhooks DIR (which must exist), else webhooks_dir of the settings if it exists."""
    if option:
        path = Path(option)
        if not path.is_dir():
            raise click.ClickException(f"--webhooks {option}: not a directory")
        return path
    if config or os.environ.get("POSTBACKD_CONFIG"):
        path = settings_from(config).webhooks_path
        return path if path.is_dir() else None
    return None


def _check_sources(hooks: Path | None, issues: list[Issue]) -> dict[str, Source] | None:
    if hooks is None:
        return None
    try:
        return load_sources(hooks)
    except RulesError as err:
        issues.extend(err.issues)
        return None


def _issue_json(issue: Issue) -> dict[str, Any]:
    return {
        "file": issue.file,
        "line": issue.line,
        "postback": issue.postback_id,
        "message": issue.message,
    }


def _validate_json(
    root: Path,
    rules: RuleSet | None,
    issues: list[Issue],
    secrets: list[str],
    resolver: SecretResolver,
) -> dict[str, Any]:
    return {
        "valid": not issues,
        "rules_dir": str(root),
        "errors": [_issue_json(i) for i in sorted(issues)],
        "version": str(rules.version) if rules else None,
        "postbacks": len(rules.postbacks) if rules else 0,
        "files": list(rules.files) if rules else [],
        "secrets": [{"name": n, "found_in": resolver.where(n)} for n in secrets],
    }


def catalogue_of(root: Path) -> Catalogue | None:
    """The catalogue for listings: None when absent or invalid (validate reports it)."""
    try:
        return load_catalogue(root)
    except RulesError:
        return None
