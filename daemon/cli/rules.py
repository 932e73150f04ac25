"""`postbackd rules list|edit` (add and duplicate: rules_add.py; enable, disable, delete and
goals: rules_bulk.py): the platform's Postbacks
screen, on the YAML files of a rules repository (comments and formatting kept)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click
from ruamel.yaml.comments import CommentedMap

from daemon.affiliates.records import file_view
from daemon.catalogue import CATALOGUE_FILE, Catalogue
from daemon.cli import affiliates
from daemon.cli.acting import as_option, own_postback, require_seen, viewer_of
from daemon.cli.common import (
    config_option,
    load_or_exit,
    rules_dir_from,
    rules_option,
)
from daemon.cli.editing import (
    plan_edit,
    set_path,
    to_yaml,
)
from daemon.cli.rulecheck import lint_plan
from daemon.cli.ruletree import EditError, Plan, Tree, atomic_write, check, write
from daemon.cli.table import label, render
from daemon.cli.validate import catalogue_of
from daemon.listing import (
    COLUMNS,
    action_settings_text,
    author_text,
    literal_credentials,
    trigger_settings_text,
)
from daemon.userjson import json_value
from daemon.visibility import visible_to

FIXED_KEYS = ("id", "created_at", "author")


@click.group()
def rules() -> None:
    """List and edit the postbacks in rules.d/ (the platform's Postbacks screen).

    Edits keep comments and formatting, allocate ids, fill author and created_at, and are
    validated like `postbackd validate` before anything is written: an invalid change writes
    nothing. Review with `git diff`, then commit.
    """


@rules.command("list")
@click.option("--offer", metavar="ID", help="Only this offer's postbacks.")
@click.option("--status", type=click.Choice(["active", "disabled"]))
@click.option(
    "--as",
    "viewer",
    metavar="admin|affiliate:ID",
    default="admin",
    show_default=True,
    help="Show what this user sees: an affiliate's users see only their affiliate's postbacks.",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@rules_option
@config_option
def list_cmd(
    offer: str | None,
    status: str | None,
    viewer: str,
    fmt: str,
    rules: str | None,
    config: str | None,
) -> None:
    """List postbacks: ID, Trigger, Trigger Settings, Action, Action Settings (secrets as
    ****), Status, Created At, Author, with the product's labels; long cells wrap to fit the
    terminal. With a catalogue, offers and affiliates show their names. --format json shows
    each postback's offer, file and line too; `rules show ID` shows every setting of one."""
    who = viewer_of(viewer)
    rule_set = load_or_exit(rules_dir_from(rules, config))
    if offer is not None and offer.strip() not in rule_set.offers:
        raise click.ClickException(f"unknown offer {offer}: no postback in the rules names it")
    rows = [
        file_view(lp)  # the API's object (GET /api/v1/postbacks): one JSON shape per postback
        for lp in sorted(rule_set.postbacks.values(), key=lambda lp: (lp.offer, lp.id))
        if (offer is None or lp.offer == offer.strip())
        and (status is None or lp.postback.status == status)
        and visible_to(lp.postback, who)
    ]
    stored = affiliates.store_rows_for(config, rule_set, who, offer, status)  # issue 15
    if fmt == "json":
        click.echo(json.dumps(rows + stored, indent=2, default=str))
        return
    if not rows and not stored:
        click.echo("no postbacks")
        return
    offers = sorted({r["offer"] for r in rows}, key=lambda o: [r["offer"] for r in rows].index(o))
    names = catalogue_of(rule_set_root(rules, config))
    for n, one in enumerate(offers):
        goals = next(lp.goals_enabled for lp in rule_set.offers[one])
        name = names.offer_name(one) if names else None
        title = f"Offer {one}" + (f" {name}" if name else "")
        click.echo(("\n" if n else "") + f"{title} (goals {'on' if goals else 'off'})")
        cells = [readable_cells(r, names) for r in rows if r["offer"] == one]
        click.echo(render(COLUMNS, cells))
    affiliates.print_store_tables(stored, first=not rows)


author_option = click.option(
    "--author", metavar="ID:NAME", help="Who makes it (default: git config user.email/name)."
)
author_affiliate_option = click.option(
    "--author-affiliate", metavar="ID", help="The author is a user of this affiliate."
)
dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Show the change and validate it; write nothing."
)


def apply(
    tree: Tree, plan: Plan, dry_run: bool, done: str, side: Mapping[str, str] | None = None
) -> None:
    """Validate the plan on a copy of the tree, show it as a diff, and write it. `side`: files
    kept with the rules that are not rule files (catalogue, retired ids), written just before
    the plan."""
    side = dict(side or {})
    if all(text == _text(tree, rel) for rel, text in plan.texts.items()) and not side:
        click.echo("nothing to change")
        return
    issues, new = check(tree, plan)
    # The catalogue's checks, on the rule set check() loaded: only when there is one to check.
    catalogue = (tree.root / CATALOGUE_FILE).is_file() or CATALOGUE_FILE in side
    findings = None
    if new is not None and not issues and catalogue:
        findings = lint_plan(tree, plan, new, side)
    if findings is not None:
        issues = findings.errors
    if issues:
        for issue in issues:
            click.echo(str(issue), err=True)
        raise click.ClickException(
            f"the change does not validate ({len(issues)} error(s)); nothing written"
        )
    for rel, text in sorted({**plan.texts, **side}.items()):
        path = tree.root / rel
        old = path.read_text("utf-8") if path.is_file() else None
        before, after = ("/dev/null" if old is None else f"a/{rel}"), f"b/{rel}"
        diff = difflib.unified_diff(
            (old or "").replace("\r\n", "\n").splitlines(keepends=True),
            text.replace("\r\n", "\n").splitlines(keepends=True),
            before,
            after,
        )
        click.echo("".join(diff), nl=False)
    for note in plan.notes:
        click.echo(f"note: {note}")
    for warning in findings.warnings if findings else []:
        click.echo(f"warning: {warning}")
    if dry_run:
        click.echo("dry run: nothing written")
        return
    try:
        for rel, text in sorted(side.items()):
            atomic_write(tree.root / rel, text.encode("utf-8"))
        write(tree, plan)
    except (EditError, OSError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(done)


def _text(tree: Tree, rel: str) -> str | None:
    doc = tree.get(rel)
    return None if doc is None else doc.original.decode("utf-8", "replace")


def credential_notes(item: CommentedMap) -> list[str]:
    action = item.get("action")
    keys = literal_credentials(action) if isinstance(action, CommentedMap) else []
    return [
        f"{key} is written out in the rule: put credentials in ${{secret:NAME}} instead"
        for key in keys
    ]


def open_tree(rules: str | None, config: str | None) -> Tree:
    try:
        return Tree.scan(rules_dir_from(rules, config))
    except EditError as err:
        raise click.ClickException(str(err)) from err


def parse_set(text: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE`: the key path and the value (JSON if it parses as JSON, else text)."""
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not key.strip() or any(not p.strip() for p in path):
        raise click.BadParameter(
            f"{text!r}: expected KEY=VALUE with a dotted KEY (e.g. action.url=https://...)",
            param_hint="--set",
        )
    try:
        value = json_value(raw)
    except json.JSONDecodeError:
        value = raw  # not JSON: text
    except ValueError as err:  # JSON, but NaN or nested too deeply
        raise click.BadParameter(f"{key.strip()}: {err}", param_hint="--set") from err
    return [p.strip() for p in path], to_yaml(value)


@rules.command("edit")
@click.argument("postback_id", metavar="ID", type=int)
@click.option(
    "--set",
    "sets",
    multiple=True,
    required=True,
    metavar="KEY=VALUE",
    help="Dotted key (action.url, retry.max_attempts, when as JSON); null removes the key.",
)
@as_option
@dry_run_option
@rules_option
@config_option
def edit_cmd(
    postback_id: int,
    sets: tuple[str, ...],
    acting: str,
    dry_run: bool,
    rules: str | None,
    config: str | None,
) -> None:
    """Change settings of postback ID in place (the platform's Configure).

    \b
    postbackd rules edit 101 --set action.url='https://t.example/pb?cid={click_id}'
    postbackd rules edit 102 --set 'when={">=": [{"var": "payout"}, 10]}'
    postbackd rules edit 102 --set goal=null        (removes the key)

    A value is JSON when it parses as JSON (5, true, {...}), else text. The action type, id,
    created_at and author cannot change: to change the action, add a new postback and delete
    this one. With --as affiliate:ID, only a postback authored for affiliate ID, and it stays
    affiliate ID's.
    """
    viewer = viewer_of(acting)
    changes = [parse_set(text) for text in sets]
    for path, _ in changes:
        if path[0] in FIXED_KEYS or path[:2] == ["action", "type"]:
            what = "the action type" if path[0] == "action" else path[0]
            raise click.ClickException(
                f"{what} of an existing postback cannot change"
                + (": add a new postback and delete this one" if path[0] == "action" else "")
            )
    tree = open_tree(rules, config)
    try:
        require_seen(viewer, tree, [postback_id])
    except EditError as err:
        raise click.ClickException(str(err)) from err
    notes: list[str] = []

    def change(item: CommentedMap) -> None:
        before = _action_type(item)
        for path, value in changes:
            set_path(item, path, value)
        own_postback(viewer, item)
        if _action_type(item) != before:
            raise EditError(
                f"the action type cannot change ({before} to {_action_type(item)}): "
                "add a new postback and delete this one"
            )
        notes.extend(credential_notes(item))

    _edit(tree, postback_id, change, dry_run, f"edited postback {postback_id}", notes)


def _action_type(item: CommentedMap) -> str:
    action = item.get("action")
    return str(action.get("type")) if isinstance(action, CommentedMap) else "(none)"


def _edit(
    tree: Tree,
    pid: int,
    change: Callable[[CommentedMap], None],
    dry_run: bool,
    done: str,
    notes: list[str] | None = None,
) -> None:
    try:
        plan = plan_edit(tree, pid, change)
    except EditError as err:
        raise click.ClickException(str(err)) from err
    plan.notes.extend(notes or [])
    doc, _ = tree.locate(pid)
    apply(tree, plan, dry_run, f"{done} in {doc.rel}")


def rule_set_root(rules: str | None, config: str | None) -> Path:
    return rules_dir_from(rules, config)


def readable_cells(row: Mapping[str, Any], names: Catalogue | None) -> list[str]:
    """The eight columns of the list with the product's labels, whole (the table wraps them),
    and the catalogue's names beside ids."""
    settings = trigger_settings_text(row)
    affiliate = row["trigger_settings"]["affiliate"]
    name = names.affiliate_name(affiliate) if names else None
    if name:
        settings = settings.replace(f"affiliate {affiliate}", f"affiliate {affiliate} ({name})", 1)
    return [
        str(row["id"]),
        label(row["trigger"]),
        settings,
        label(row["action"]),
        action_settings_text(row["action_settings"]),
        label(row["status"]),
        row["created_at"] or "-",
        author_text(row["author"]),
    ]
