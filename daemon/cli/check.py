"""`postbackd validate`, `explain` and `test`: the rules repository's tools, no daemon needed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from daemon.cli.common import (
    config_option,
    conversion_of,
    load_or_exit,
    read_json_object,
    rules_dir_from,
    rules_option,
    settings_from,
)
from daemon.cli.history import compare, load_base
from daemon.cli.ruletests import load_cases, run_case
from daemon.errors import Issue, RulesError
from daemon.explain import Evaluation, evaluate
from daemon.gitutil import GitError
from daemon.loader import RuleSet, load_rules
from daemon.models import Status
from daemon.secrets import SecretResolver
from daemon.sources import Source, load_sources

FORMAT = click.Choice(["text", "json"])


def _resolver(config: str | None) -> SecretResolver:
    settings = settings_from(config) if config or os.environ.get("POSTBACKD_CONFIG") else None
    return SecretResolver(
        credentials_dir=os.environ.get("CREDENTIALS_DIRECTORY"),
        secrets_dir=settings.secrets_path if settings else None,
        environ=os.environ,
    )


@click.command()
@click.argument("rules_dir", required=False, metavar="[RULES_DIR]")
@click.option("--base", metavar="GIT_REF", help="Also check what may not change since this commit.")
@click.option(
    "--webhooks",
    "webhooks",
    metavar="DIR",
    help="Also check the source definitions in DIR (default: webhooks_dir of -c, if any).",
)
@click.option("--format", "fmt", type=FORMAT, default="text", show_default=True)
@config_option
def validate(
    rules_dir: str | None, base: str | None, webhooks: str | None, fmt: str, config: str | None
) -> None:
    """Check every rule file (and source file); exit 0 when valid, 1 with one line per error.

    Lines read `file:line: postback N: message`. With --base, an existing postback may not
    change its action type, offer, created_at or author since GIT_REF. With --webhooks (or -c),
    the sources of webhooks/ are checked too, with the same rigour.
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
    base_note = None
    if base and rules is not None:
        try:
            issues.extend(compare(rules, load_base(root, base), base))
        except GitError as err:
            raise click.ClickException(f"--base {base}: {err}") from err
        except RulesError:
            base_note = f"the rules at {base} do not load; nothing to compare against"
    resolver = _resolver(config)
    secrets = sorted(
        set(rules.secrets if rules else ())
        | {n for s in (sources or {}).values() for n in s.secrets}
    )
    if fmt == "json":
        result = _validate_json(root, rules, issues, secrets, resolver)
        result["webhooks_dir"] = str(hooks) if hooks else None
        result["sources"] = sorted(sources) if sources is not None else []
        click.echo(json.dumps(result, indent=2))
    else:
        for issue in sorted(issues):
            click.echo(str(issue))
        if base_note:
            click.echo(f"note: {base_note}", err=True)
        if rules is not None and not issues:
            click.echo(
                f"ok: {len(rules.postbacks)} postbacks for {len(rules.offers)} offers "
                f"in {len(rules.files)} files, version {rules.version}"
            )
            if hooks is not None and sources is not None:
                names = ", ".join(sorted(sources)) or "none"
                click.echo(f"ok: {len(sources)} sources in {hooks} ({names})")
            for name in secrets:
                where = resolver.where(name)
                click.echo(f"secret {name}: " + (f"found in {where}" if where else "not set here"))
    sys.exit(1 if issues else 0)


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
        "errors": [
            {"file": i.file, "line": i.line, "postback": i.postback_id, "message": i.message}
            for i in sorted(issues)
        ],
        "version": str(rules.version) if rules else None,
        "postbacks": len(rules.postbacks) if rules else 0,
        "files": list(rules.files) if rules else [],
        "secrets": [{"name": n, "found_in": resolver.where(n)} for n in secrets],
    }


@click.command(name="explain")
@click.argument("conversion_file", metavar="CONVERSION.json", type=click.Path(dir_okay=False))
@rules_option
@click.option(
    "--previous-status",
    type=click.Choice([s.value for s in Status]),
    help="The status already stored (default: none, the conversion is new).",
)
@click.option("--format", "fmt", type=FORMAT, default="text", show_default=True)
@config_option
def explain_cmd(
    conversion_file: str,
    rules: str | None,
    previous_status: str | None,
    fmt: str,
    config: str | None,
) -> None:
    """Dry-run one conversion: which postbacks of its offer fire, and why the others do not.

    CONVERSION.json is an object of canonical fields (conversion_id, offer, affiliate, status,
    payout, click_id, ...), optionally `source` and an `extra` object. For each postback that
    fires it prints the exact request, secrets shown as ****. Nothing is sent or stored.
    """
    conversion, source = conversion_of(read_json_object(conversion_file), conversion_file)
    rule_set = load_or_exit(rules_dir_from(rules, config))
    from daemon.outbound import Guard

    ev = evaluate(
        rule_set,
        conversion,
        source=source,
        previous_status=Status(previous_status) if previous_status else None,
        guard=Guard(),
    )
    click.echo(json.dumps(_explain_json(ev), indent=2) if fmt == "json" else _explain_text(ev))


def _explain_text(ev: Evaluation) -> str:
    c = ev.conversion
    lines = [
        f"conversion {c.conversion_id} from {ev.source}: offer {c.offer}, affiliate "
        f"{c.affiliate}, status {c.status.value}; transition {ev.transition.value}"
    ]
    if not ev.planned:
        lines.append(f"offer {c.offer} has no postbacks")
    for p in ev.planned:
        lp = p.verdict.postback
        head = f"postback {lp.id} ({lp.file}:{lp.line}, {lp.postback.action.type})"
        if not p.verdict.fires:
            lines.append(f"{head}: does not fire: {p.verdict.reason}")
            continue
        if p.request is None:
            lines.append(f"{head}: FIRES, but cannot render: {p.error}")
            continue
        lines.append(f"{head}: FIRES")
        lines.append(f"  {p.request.method} {p.request.url}")
        lines.extend(f"  {k}: {v}" for k, v in p.request.headers.items())
        if p.request.body is not None:
            lines.append(f"  body: {p.request.body}")
        if p.guard_note:
            lines.append(f"  warning: {p.guard_note}")
    return "\n".join(lines)


def _explain_json(ev: Evaluation) -> dict[str, Any]:
    return {
        "conversion_id": ev.conversion.conversion_id,
        "source": ev.source,
        "transition": ev.transition.value,
        "postbacks": [
            {
                "id": p.verdict.postback.id,
                "file": f"{p.verdict.postback.file}:{p.verdict.postback.line}",
                "action": p.verdict.postback.postback.action.type,
                "fires": p.verdict.fires,
                "reason": p.verdict.reason,
                "request": p.request.as_dict() if p.request else None,
                "error": p.error,
                "warning": p.guard_note,
            }
            for p in ev.planned
        ],
    }


@click.command(name="test")
@click.argument("rules_dir", required=False, metavar="[RULES_DIR]")
@config_option
@click.option("-v", "--verbose", is_flag=True, help="Also list the cases that pass.")
def test_cmd(rules_dir: str | None, config: str | None, verbose: bool) -> None:
    """Run the rule test cases in RULES_DIR/tests/*.yaml, like unit tests.

    Each case gives a conversion, the postback ids expected to fire, and optionally the
    expected request of a fired postback. Exit 0 when every case passes.
    """
    root = rules_dir_from(rules_dir, config)
    rule_set = load_or_exit(root)
    try:
        cases = load_cases(root)
    except RulesError as err:
        for issue in err.issues:
            click.echo(str(issue), err=True)
        sys.exit(1)
    if not cases:
        raise click.ClickException(f"no test cases in {root / 'tests'}")
    failed = 0
    for file, line, case in cases:
        result = run_case(rule_set, file, line, case)
        if result.passed:
            if verbose:
                click.echo(f"PASS {file}:{line}: {case.name}")
            continue
        failed += 1
        click.echo(f"FAIL {file}:{line}: {case.name}")
        for failure in result.failures:
            click.echo(f"  {failure}")
    click.echo(f"{len(cases) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
