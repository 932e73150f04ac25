"""`postbackd rules show ID`: every setting of one postback, the ones left at their defaults
included (marked), secrets as ****, with the product's labels and the catalogue's names."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import click

from daemon.affiliates.records import file_view
from daemon.cli.acting import as_option, viewer_of
from daemon.cli.common import config_option, load_or_exit, rules_dir_from, rules_option
from daemon.cli.table import label
from daemon.cli.validate import catalogue_of
from daemon.listing import (
    _source_text,
    author_text,
    iso,
    mask,
    postback_row,
    summarise_condition,
)
from daemon.loader import LoadedPostback
from daemon.visibility import visible_to


def every_setting(settings: Any) -> tuple[dict[str, Any], set[str]]:
    """Every setting of an action (defaults included), masked, and the dotted keys written in
    the rule."""
    full = mask(settings.model_dump(mode="json", by_alias=True, fallback=_source_text))
    written = settings.model_dump(
        mode="json", by_alias=True, exclude_unset=True, fallback=_source_text
    )
    full.pop("type", None)
    return full, set(dict(_flat(written)))


def _flat(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            yield from _flat(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


@click.command("show")
@click.argument("postback_id", metavar="ID", type=int)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@as_option
@rules_option
@config_option
def show_cmd(
    postback_id: int, fmt: str, acting: str, rules: str | None, config: str | None
) -> None:
    """Every setting of postback ID: trigger settings, status, origin, retry, and each setting
    of its action, including those left at their defaults (marked so); secrets as ****.
    With --as affiliate:ID, only a postback that affiliate's users see."""
    viewer = viewer_of(acting)
    root = rules_dir_from(rules, config)
    rule_set = load_or_exit(root)
    lp = rule_set.postbacks.get(postback_id)
    if lp is None or not visible_to(lp.postback, viewer):
        raise click.ClickException(f"no postback with id {postback_id} in {root}")
    full, written = every_setting(lp.postback.action)
    if fmt == "json":
        row = file_view(lp)  # the list's (and the API's) object, plus every setting
        row["retry"] = lp.postback.retry.model_dump(mode="json") if lp.postback.retry else None
        row["action_settings_all"] = full
        click.echo(json.dumps(row, indent=2, default=str))
        return
    names = catalogue_of(root)
    click.echo("\n".join(_lines(lp, full, written, names)))


def _lines(lp: LoadedPostback, full: dict[str, Any], written: set[str], names: Any) -> list[str]:
    pb = lp.postback
    offer_name = names.offer_name(lp.offer) if names else None
    affiliate_name = names.affiliate_name(pb.affiliate) if names else None
    goal = "-"
    if pb.goal is not None:
        state = "evaluated" if lp.goals_enabled else "not evaluated: goals are off"
        goal = f"{pb.goal} ({state})"
    retry = "the daemon's defaults"
    if pb.retry is not None:
        retry = (
            ", ".join(f"{k} {v}" for k, v in pb.retry.model_dump(exclude_none=True).items())
            or retry
        )
    pairs = [
        ("trigger", label(pb.trigger.value)),
        ("affiliate", pb.affiliate + (f" ({affiliate_name})" if affiliate_name else "")),
        ("goal", goal),
        ("when", summarise_condition(pb.when.logic) if pb.when is not None else "-"),
    ]
    if pb.when is not None:
        pairs.append(("", json.dumps(pb.when.logic, separators=(", ", ": "))))
    pairs += [
        ("status", label(pb.status)),
        ("created_at", iso(pb.created_at) or "-"),
        ("author", author_text(postback_row(lp)["author"])),
        ("retry", retry),
        ("action", label(pb.action.type)),
    ]
    pairs += [
        (f"  {key}", _text(value) + ("" if key in written else "   (default)"))
        for key, value in _flat(full)
    ]
    width = max(len(k) for k, _ in pairs) + 2
    head = f"postback {lp.id}: offer {lp.offer}" + (f" {offer_name}" if offer_name else "")
    return [
        f"{head} ({lp.file}:{lp.line})",
        *(f"  {k.ljust(width)}{v}" for k, v in pairs),
    ]
