"""`postbackd rules history ID` and `rules export --affiliate ID` (issue 15): the audit trail of
a store postback, and an affiliate's store postbacks as rule-file YAML (to move one into git);
plus the store rows that `rules list` shows beside the file postbacks."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import click

from daemon.affiliates.records import store_view
from daemon.cli.common import config_option
from daemon.cli.store import with_store
from daemon.listing import COLUMNS, mask, render_table, table_cells
from daemon.loader import RuleSet
from daemon.store.affiliate_types import FIRST_STORE_ID, AuditRow, StoredPostback
from daemon.store.base import Store
from daemon.visibility import Viewer

_AFFILIATE_SECRET = re.compile(r"\$\{affiliate_secret:([^}]*)\}")


async def _live(store: Store) -> list[StoredPostback]:
    rows = (await store.affiliate_changes(0)).postbacks
    return [r for r in rows if r.status != "deleted"]


def store_rows(
    config: str, rules: RuleSet, viewer: Viewer, offer: str | None, status: str | None
) -> list[dict[str, Any]]:
    """The store postbacks `viewer` sees, in the list's JSON shape (`source: "store"`)."""
    goals = {o: lps[0].goals_enabled for o, lps in rules.offers.items()}
    return [
        store_view(row, goals.get(row.offer, False))
        for row in with_store(config, _live)
        if (viewer.is_admin or row.affiliate == viewer.affiliate)
        and (offer is None or row.offer == offer)
        and (status is None or row.status == status)
    ]


@click.command("history")
@click.argument("postback_id", metavar="ID", type=int)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@config_option
def history_cmd(postback_id: int, fmt: str, config: str | None) -> None:
    """The audit trail of a store (affiliate) postback: who changed what, when, before and
    after (secrets masked). File postbacks keep their history in git (`git log`)."""
    if postback_id < FIRST_STORE_ID:
        raise click.ClickException(
            f"postback {postback_id} is a file postback: its history is in git "
            f"(git log -S 'id: {postback_id}' in the rules repository)"
        )
    rows: list[AuditRow] = with_store(config, lambda s: s.affiliate_history(postback_id))
    if not rows:
        raise click.ClickException(f"no postback {postback_id} in the store")
    entries: list[dict[str, Any]] = [
        {
            "at": r.at.isoformat(),
            "who": r.who,
            "change": r.change,
            "before": _masked(r.before),
            "after": _masked(r.after),
        }
        for r in rows
    ]
    if fmt == "json":
        click.echo(json.dumps(entries, indent=2))
        return
    for e in entries:
        who = e["who"]
        by = who["name"] + (f" (affiliate {who['affiliate']})" if who.get("affiliate") else "")
        click.echo(f"{e['at']}  {e['change']:<7} by {by}")
        for line in _diff(e["before"], e["after"]):
            click.echo(f"    {line}")


def _masked(snapshot: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    return {**snapshot, "body": mask(snapshot.get("body") or {})}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _diff(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[str]:
    old, new = _flat(before or {}), _flat(after or {})
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            lines.append(f"{key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}")
    return lines


@click.command("export")
@click.option("--affiliate", "affiliate", metavar="ID", required=True)
@click.option("--offer", metavar="ID", help="Only this offer's postbacks.")
@click.option(
    "--first-id",
    type=click.IntRange(1, FIRST_STORE_ID - 1),
    help="Number the postbacks from here (file ids stay below 1,000,000,000); "
    "without it, each `id:` is left for you to fill.",
)
@config_option
def export_cmd(affiliate: str, offer: str | None, first_id: int | None, config: str | None) -> None:
    """An affiliate's store postbacks as rule-file YAML, one document per offer, to move them
    into git. Affiliate secrets become ops secrets named affiliate_ID_NAME."""
    from ruamel.yaml import YAML

    rows = [
        r
        for r in with_store(config, _live)
        if r.affiliate == affiliate.strip() and (offer is None or r.offer == offer.strip())
    ]
    if not rows:
        raise click.ClickException(f"affiliate {affiliate} has no postbacks in the store")
    yaml = YAML()
    yaml.default_flow_style = False
    next_id = first_id
    docs = []
    for one in sorted({r.offer for r in rows}):
        items = []
        for row in (r for r in rows if r.offer == one):
            item: dict[str, Any] = {}
            if next_id is not None:
                item["id"] = next_id
                next_id += 1
            body = _ops_secrets(row.body, row.affiliate)
            item.update(trigger=body["trigger"], affiliate=row.affiliate)
            for key in ("goal", "when", "retry"):
                if key in body:
                    item[key] = body[key]
            item["status"] = row.status
            item["created_at"] = row.created_at.strftime("%Y-%m-%dT%H:%M:%SZ")
            item["author"] = body.get("author")
            item["action"] = body["action"]
            items.append(item)
        docs.append({"offer": one, "postbacks": items})
    out = io.StringIO()
    yaml.dump_all(docs, out)
    note = "" if first_id else "# fill in each postback's id (below 1000000000), then validate\n"
    click.echo(note + out.getvalue(), nl=False)


def _ops_secrets(value: Any, affiliate: str) -> Any:
    if isinstance(value, str):
        return _AFFILIATE_SECRET.sub(
            lambda m: "${secret:affiliate_" + affiliate + "_" + m.group(1) + "}", value
        )
    if isinstance(value, Mapping):
        return {k: _ops_secrets(v, affiliate) for k, v in value.items()}
    if isinstance(value, list):
        return [_ops_secrets(v, affiliate) for v in value]
    return value


def store_rows_for(
    config: str | None, rules: RuleSet, viewer: Viewer, offer: str | None, status: str | None
) -> list[dict[str, Any]]:
    """For `rules list`: the store postbacks when a store is named (-c or $POSTBACKD_CONFIG),
    else none (the rules repository alone knows only file postbacks)."""
    if not config and not os.environ.get("POSTBACKD_CONFIG"):
        return []
    return store_rows(config or "", rules, viewer, offer.strip() if offer else None, status)


def print_store_tables(rows: list[dict[str, Any]], first: bool) -> None:
    """The store postbacks, one table per offer, after the file ones."""
    for n, one in enumerate(sorted({r["offer"] for r in rows})):
        title = f"Offer {one}: affiliate postbacks in the store (not in git)"
        click.echo(("" if first and n == 0 else "\n") + title)
        cells = [table_cells(r) for r in rows if r["offer"] == one]
        click.echo(render_table(COLUMNS, cells))
