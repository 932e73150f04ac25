"""`postbackd explain` and `test`: the rules repository's tools, no daemon needed (validate is
in validate.py)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from daemon.cli.common import (
    config_option,
    conversion_of,
    load_or_exit,
    read_json_object,
    rules_dir_from,
    rules_option,
)
from daemon.cli.pii import mask, mask_text, personal_values, show_pii_option
from daemon.cli.ruletests import load_cases, run_case
from daemon.errors import RulesError
from daemon.explain import Evaluation, evaluate
from daemon.models import Status

FORMAT = click.Choice(["text", "json"])


@click.command(name="explain")
@click.argument("conversion_file", metavar="CONVERSION.json", type=click.Path(dir_okay=False))
@rules_option
@click.option(
    "--previous-status",
    type=click.Choice([s.value for s in Status]),
    help="The status already stored (default: none, the conversion is new).",
)
@click.option("--format", "fmt", type=FORMAT, default="text", show_default=True)
@show_pii_option
@config_option
def explain_cmd(
    conversion_file: str,
    rules: str | None,
    previous_status: str | None,
    fmt: str,
    show_pii: bool,
    config: str | None,
) -> None:
    """Dry-run one conversion: which postbacks of its offer fire, and why the others do not.

    CONVERSION.json is an object of canonical fields (conversion_id, offer, affiliate, status,
    payout, click_id, ...), optionally `source` and an `extra` object. For each postback that
    fires it prints the exact request, secrets shown as ****, personal data (email, phone,
    IP...) as *** unless --show-pii. Nothing is sent or stored.
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
    own = personal_values({**conversion.canonical(), "extra": dict(conversion.extra)})
    if fmt == "json":
        click.echo(json.dumps(mask(_explain_json(ev), show=show_pii, values=own), indent=2))
        return
    text = _explain_text(ev)
    click.echo(text if show_pii else mask_text(text, own))


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
