"""`postbackd rules add` and `rules duplicate`: new postbacks with the next free ids, created_at
now and the caller as author, appended to their offer's file (the platform's "Add Postback" and
"Duplicate Postback")."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import click
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from daemon.cli import action_options
from daemon.cli.acting import as_option, author_affiliate_for, own_postback, require_seen, viewer_of
from daemon.cli.common import config_option, rules_option
from daemon.cli.editing import (
    NewItem,
    author_map,
    clone,
    id_value,
    item_of,
    plan_append,
    put,
    set_path,
    timestamp,
    to_yaml,
)
from daemon.cli.rules import (
    FIXED_KEYS,
    apply,
    author_affiliate_option,
    author_option,
    credential_notes,
    dry_run_option,
    open_tree,
    parse_set,
)
from daemon.cli.ruletree import EditError, Plan, Tree, next_ids
from daemon.cli.yamlsplice import yaml_rt
from daemon.models import Trigger
from daemon.userjson import json_value
from daemon.yamlfile import MAX_FILE_BYTES, YamlError, load_yaml


def new_postback_options(command: Callable[..., None]) -> Callable[..., None]:
    """Who makes the new postbacks (--author, --author-affiliate, --as), and where (--dry-run,
    --rules, -c)."""
    options = (author_option, author_affiliate_option, as_option, dry_run_option)
    for option in reversed((*options, rules_option, config_option)):
        command = option(command)
    return command


@click.command("add", epilog=action_options.epilog())
@click.option(
    "--template",
    type=click.Choice(list(action_options.models())),
    metavar="TYPE",
    help="Print a commented skeleton of a postback with this action type, and stop.",
)
@click.option("--offer", metavar="ID", help="The offer (its file gets the postback).")
@click.option("--trigger", type=click.Choice([t.value for t in Trigger]))
@click.option("--affiliate", metavar="ID|*", help='One affiliate, or "*" for all.')
@click.option("--goal", metavar="GOAL", help="Only for this goal (when the offer has goals on).")
@click.option("--when", metavar="JSON", help="A JsonLogic condition.")
@click.option(
    "--status", type=click.Choice(["active", "disabled"]), default=None, help="Default: active."
)
@click.option(
    "--action",
    "action_type",
    type=click.Choice(list(action_options.models())),
    metavar="TYPE",
    help="The action type (default: ping_url); its settings are the options listed below.",
)
@click.option("--method", help="The HTTP method (ping_url: GET or POST).")
@click.option("--url", help="ping_url's URL (macros such as {click_id} allowed).")
@click.option("--header", "headers", multiple=True, metavar="NAME=VALUE", help="ping_url header.")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other key, dotted (action.form.clickid={click_id}, retry.max_attempts=5).",
)
@click.option(
    "--from",
    "snippet",
    type=click.File("r"),
    metavar="FILE|-",
    help="A YAML mapping of the postback's keys (- reads stdin); options override it.",
)
@click.option("--file", metavar="PATH", help="Rule file to append to (relative to rules).")
@click.option("--comment", metavar="TEXT", help="A comment line above the new postback.")
@new_postback_options
@action_options.options
def add_cmd(**opts: Any) -> None:
    """Add a postback to an offer's file (a new file if the offer has none), with the next
    free id, created_at now and you as author (--author, else git config user.email/name).

    \b
    postbackd rules add --offer 1234 --trigger conversion_done --affiliate 42 \\
        --url 'https://t.example/pb?cid={click_id}&payout={payout}' \\
        --header 'X-Api-Key=${secret:partner_42_key}'
    postbackd rules add --offer 1234 --from - < postback.yaml

    Credentials go in as ${secret:NAME}, never as values. With --as affiliate:ID the
    postback is for affiliate ID only (its affiliate and its author's). The change is validated
    before it is written, and shown as a diff. Any action type without YAML: --action TYPE
    and its settings (below; JSON for lists and maps), or --template TYPE for a skeleton.
    """
    if opts["template"]:
        click.echo(action_options.template(opts["template"]), nl=False)
        return
    viewer = viewer_of(opts["acting"])
    tree = open_tree(opts["rules"], opts["config"])
    item = _snippet(opts["snippet"])
    offer = _offer_of(item, opts["offer"])
    _fill(item, opts)
    if not viewer.is_admin and "affiliate" not in item:
        put(item, "affiliate", id_value(viewer.affiliate or ""))
    for key in ("trigger", "affiliate"):
        if key not in item:
            raise click.UsageError(f"--{key} is required (or `{key}:` in --from)")
    try:
        own_postback(viewer, item)
        affiliate = author_affiliate_for(viewer, opts["author_affiliate"])
        author = author_map(opts["author"], affiliate, tree.root)
        pid = next_ids(tree, 1)[0]
    except EditError as err:
        raise click.ClickException(str(err)) from err
    put(item, "id", pid)
    put(item, "created_at", timestamp(datetime.now(UTC)))
    put(item, "author", author)
    plan = _append(tree, offer, [NewItem(item, opts["comment"])], opts["file"])
    plan.notes.extend(credential_notes(item))
    rel = next(iter(plan.texts))
    apply(tree, plan, opts["dry_run"], f"added postback {pid} to {rel} (offer {offer})")


def _snippet(stream: TextIO | None) -> CommentedMap:
    if stream is None:
        return CommentedMap()
    text = stream.read(MAX_FILE_BYTES + 1)
    try:
        load_yaml(text.encode("utf-8", "surrogateescape"))  # the loader's limits: alias bombs,
    except YamlError as err:  # tags, depth and size are refused before anything expands
        raise click.ClickException(f"--from: line {err.line}: {err.message}") from err
    try:
        data = yaml_rt().load(text)
    except YAMLError as err:
        raise click.ClickException(f"--from: not YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, CommentedMap) or "postbacks" in data:
        raise click.ClickException("--from: expected a mapping of one postback's keys")
    for key in FIXED_KEYS:
        if key in data:
            raise click.ClickException(f"--from: `{key}` is filled in by postbackd; remove it")
    return data


def _offer_of(item: CommentedMap, option: str | None) -> str:
    given = item.pop("offer", None)
    offer = option if option is not None else (str(given) if given is not None else None)
    if offer is None or not offer.strip():
        raise click.UsageError("--offer is required")
    if given is not None and option is not None and str(given) != option:
        raise click.UsageError(f"--offer {option} but the snippet says offer {given}")
    return offer.strip()


def _fill(item: CommentedMap, opts: dict[str, Any]) -> None:
    for key in ("trigger", "goal", "status"):
        if opts[key] is not None:
            put(item, key, opts[key])
    if opts["affiliate"] is not None:
        put(item, "affiliate", id_value(opts["affiliate"]))
    if opts["when"] is not None:
        try:
            put(item, "when", to_yaml(json_value(opts["when"])))
        except ValueError as err:
            raise click.BadParameter(f"not JSON: {err}", param_hint="--when") from err
    if "status" not in item:
        put(item, "status", "active")
    action = item.get("action")
    if action is None:
        put(item, "action", CommentedMap([("type", opts["action_type"] or "ping_url")]))
    elif opts["action_type"] and str(action.get("type")) != opts["action_type"]:
        raise click.UsageError(f"--action {opts['action_type']} but the snippet's action differs")
    for key in ("method", "url"):
        if opts[key] is not None:
            set_path(item, ["action", key], opts[key])
    kind = str(item["action"].get("type"))
    for key, value in action_options.chosen(opts, kind):
        set_path(item, ["action", key], to_yaml(value))
    for header in opts["headers"]:
        name, sep, value = header.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{header!r}: expected NAME=VALUE", param_hint="--header")
        set_path(item, ["action", "headers", name.strip()], value)
    for text in opts["sets"]:
        path, value = parse_set(text)
        if path[0] in FIXED_KEYS:
            raise click.BadParameter(f"{path[0]} is filled in by postbackd", param_hint="--set")
        _set(item, path, value)


def _set(item: CommentedMap, path: list[str], value: Any) -> None:
    try:
        set_path(item, path, value)
    except EditError as err:
        raise click.BadParameter(str(err), param_hint="--set") from err


def _append(tree: Tree, offer: str, items: list[NewItem], file: str | None) -> Plan:
    try:
        plan = plan_append(tree, offer, items, file)
    except EditError as err:
        raise click.ClickException(str(err)) from err
    plan.ids = [int(one.item["id"]) for one in items]
    if plan.created:
        plan.notes.append(f"offer {offer} had no rule file: created {next(iter(plan.created))}")
    docs = tree.files_of(offer)
    if docs and not docs[0].goals_enabled and any("goal" in one.item for one in items):
        plan.notes.append(f"offer {offer} has goals disabled: the goal is kept, not evaluated")
    return plan


@click.command("duplicate")
@click.argument("postback_ids", metavar="ID...", nargs=-1, type=int, required=True)
@click.option("--from-offer", required=True, metavar="A", help="The offer they belong to.")
@click.option("--to-offer", required=True, metavar="B", help="The offer that gets the copies.")
@click.option("--file", metavar="PATH", help="Rule file of B to append to.")
@new_postback_options
def duplicate_cmd(
    postback_ids: tuple[int, ...],
    from_offer: str,
    to_offer: str,
    file: str | None,
    author: str | None,
    author_affiliate: str | None,
    acting: str,
    dry_run: bool,
    rules: str | None,
    config: str | None,
) -> None:
    """Copy postbacks of offer A into offer B with new ids (created_at now, you as author).
    With --as affiliate:ID, only postbacks authored for that affiliate, copied as its user."""
    viewer = viewer_of(acting)
    tree = open_tree(rules, config)
    from_offer, to_offer = from_offer.strip(), to_offer.strip()
    if not tree.files_of(from_offer):
        raise click.ClickException(f"unknown offer {from_offer}: no rule file names it")
    try:
        require_seen(viewer, tree, postback_ids)
        who = author_map(author, author_affiliate_for(viewer, author_affiliate), tree.root)
        ids = next_ids(tree, len(postback_ids))
        items = []
        for old, new in zip(postback_ids, ids, strict=True):
            doc, index = tree.locate(old)
            if doc.offer != from_offer:
                raise EditError(f"postback {old} belongs to offer {doc.offer}, not {from_offer}")
            item = clone(item_of(doc, index))
            put(item, "id", new)
            put(item, "created_at", timestamp(datetime.now(UTC)))
            put(item, "author", clone(who))
            own_postback(viewer, item)
            items.append(NewItem(item, f"Copied from postback {old} of offer {from_offer}."))
    except EditError as err:
        raise click.ClickException(str(err)) from err
    plan = _append(tree, to_offer, items, file)
    rel = next(iter(plan.texts))
    pairs = ", ".join(f"{a} as {b}" for a, b in zip(postback_ids, ids, strict=True))
    apply(tree, plan, dry_run, f"duplicated {pairs} into {rel} (offer {to_offer})")
