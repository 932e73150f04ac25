"""`postbackd send-test`: send one postback for real, once, and show what happened."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
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
from daemon.cli.pii import mask_text, personal_values, show_pii_option
from daemon.errors import RetryableError
from daemon.loader import LoadedPostback
from daemon.models import Conversion
from daemon.sendtest import SendResult, sample_conversion, send_once, would_fire


@click.command("send-test")
@click.argument("postback_id", metavar="POSTBACK_ID", type=int)
@click.option(
    "--conversion",
    "conversion_file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="A conversion JSON object (the explain format); default: a sample that matches.",
)
@rules_option
@show_pii_option
@config_option
def send_test(
    postback_id: int,
    conversion_file: str | None,
    rules: str | None,
    show_pii: bool,
    config: str | None,
) -> None:
    """Really send postback POSTBACK_ID once, through its action and the outbound guard of the
    settings, and show the request (secrets ****), the answer and the outcome. Nothing is
    stored. Personal data (email, phone, IP...) shows as *** unless --show-pii. Exit 0 when the
    attempt succeeds, 1 otherwise."""
    settings = settings_from(config)
    rule_set = load_or_exit(rules_dir_from(rules, config))
    lp = rule_set.postbacks.get(postback_id)
    if lp is None:
        raise click.ClickException(f"no postback with id {postback_id} in the rules")
    conversion = _conversion(conversion_file, lp)
    if not lp.postback.active:
        click.echo(f"note: postback {postback_id} is disabled; sending anyway", err=True)
    why_not = would_fire(rule_set, lp, conversion)
    if why_not:
        click.echo(f"note: this conversion would not fire it ({why_not}); sending anyway", err=True)
    click.echo(
        f"postback {postback_id} ({lp.postback.action.type}, offer {lp.offer}) with conversion "
        f"{conversion.conversion_id} ({conversion.status.value}, affiliate {conversion.affiliate})"
    )
    result = asyncio.run(send_once(settings, lp, conversion, os.environ))
    own = personal_values({**conversion.canonical(), "extra": dict(conversion.extra)})
    text = send_text(result)
    click.echo(text if show_pii else mask_text(text, own))
    sys.exit(0 if result.ok else 1)


def _conversion(path: str | None, lp: LoadedPostback) -> Conversion:
    if path is None:
        obj: Any = sample_conversion(lp, datetime.now(UTC))
    else:
        obj = read_json_object(path)
    return conversion_of(obj, path or "sample")[0]


def send_text(result: SendResult) -> str:
    lines = []
    req = result.request
    if req is not None:
        lines.append(f"> {req.method} {req.url}")
        lines.extend(f"> {k}: {v}" for k, v in req.headers.items())
        if req.body is not None:
            lines.append(f"> body: {req.body}")
    if result.response_status is not None:
        excerpt = (result.response_excerpt or "").replace("\n", " ")[:300]
        lines.append(f"< HTTP {result.response_status} {excerpt}".rstrip())
    if result.error is None:
        lines.append(f"outcome: succeeded in {result.duration_ms} ms")
    else:
        kind = "retryable" if isinstance(result.error, RetryableError) else "permanent"
        lines.append(f"outcome: failed ({kind}): {result.error}")
    return "\n".join(lines)
