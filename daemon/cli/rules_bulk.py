"""`postbackd rules enable|disable|delete` on several postbacks at once (ids and selectors) and
`rules goals enable|disable --offer ID` (the product's goals switch, across all the offer's
files). Every change is one plan, validated and shown as a diff before anything is written."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import click
from ruamel.yaml.comments import CommentedMap

from daemon.catalogue import CATALOGUE_FILE, RETIRED_FILE
from daemon.cli.acting import as_option, sees, viewer_of
from daemon.cli.common import config_option, rules_option
from daemon.cli.editing import item_of, set_path
from daemon.cli.rulecheck import retired_text
from daemon.cli.rules import apply, dry_run_option, open_tree
from daemon.cli.ruletree import EditError, Plan, RuleDoc, Tree
from daemon.cli.yamlsplice import (
    SpliceError,
    edit_item,
    empty_list_key,
    indent_of,
    shift,
    yaml_rt,
)
from daemon.visibility import Viewer

Change = Callable[[CommentedMap], None]


def select(
    tree: Tree,
    ids: Iterable[int],
    offer: str | None,
    affiliate: str | None,
    viewer: Viewer | None = None,
) -> list[int]:
    """The ids given, plus every postback of the selectors (offer and affiliate together
    narrow each other); an unknown id is an error. With an affiliate viewer, only the
    postbacks it may see: another id reads as unknown, selectors pass over the others."""
    viewer = viewer or Viewer.admin()
    wanted = sorted(set(ids))
    known = tree.ids()
    unknown = [pid for pid in wanted if pid not in known or not sees(viewer, tree, pid)]
    if unknown:
        raise click.ClickException(
            f"no postback with id {', '.join(map(str, unknown))} in {tree.root}"
        )
    if offer is None and affiliate is None:
        return wanted
    if tree.current is None:
        raise click.ClickException(
            f"the rules in {tree.root} do not load: fix them (postbackd validate) before "
            "selecting by --offer or --affiliate"
        )
    chosen = {
        lp.id
        for lp in tree.current.postbacks.values()
        if (offer is None or lp.offer == offer.strip())
        and (affiliate is None or lp.postback.affiliate == affiliate.strip())
        and sees(viewer, tree, lp.id)
    }
    return sorted(chosen | set(wanted))


def _chosen(
    ids: tuple[int, ...],
    offer: str | None,
    affiliate: str | None,
    acting: str,
    rules: str | None,
    config: str | None,
) -> tuple[Tree, list[int]]:
    """The tree and the postbacks a bulk command names (ids and selectors), as `--as` sees them."""
    if not ids and offer is None and affiliate is None:
        raise click.UsageError("give postback ids, --offer or --affiliate")
    viewer = viewer_of(acting)
    tree = open_tree(rules, config)
    return tree, select(tree, ids, offer, affiliate, viewer)


def _join(doc: RuleDoc, lines: list[str]) -> str:
    text = "".join(lines)
    return text.replace("\n", "\r\n") if doc.crlf else text


def plan_many(tree: Tree, pids: list[int], change: Change | None) -> Plan:
    """One plan that edits (`change`) or deletes (None) every postback of `pids`, file by file,
    from the last postback of a file up (so the positions above stay right)."""
    by_doc: dict[str, tuple[RuleDoc, list[int]]] = {}
    for pid in pids:
        try:
            doc, index = tree.locate(pid)
        except EditError as err:
            raise click.ClickException(str(err)) from err
        by_doc.setdefault(doc.rel, (doc, []))[1].append(index)
    plan = Plan(ids=list(pids), edits_existing=change is not None)
    for rel, (doc, indexes) in by_doc.items():
        lines = list(doc.lines)
        for index in sorted(indexes, reverse=True):
            span = doc.spans[index]
            if change is None:  # blank separators stay even
                start, stop = span.lead, span.end
                last = all(j in indexes for j in range(index + 1, len(doc.spans)))
                if not last:
                    while stop < len(lines) and not lines[stop].strip():
                        stop += 1
                elif index > 0:
                    while start > 0 and not lines[start - 1].strip():
                        start -= 1
                del lines[start:stop]
                continue
            col = indent_of(doc.lines[span.dash])
            item = doc.lines[span.dash : span.end]
            item[-1] = item[-1] if item[-1].endswith("\n") else item[-1] + "\n"
            try:
                new = edit_item(shift(item, doc.style.offset - col), doc.style, change)
            except SpliceError as err:
                raise click.ClickException(f"{rel}: cannot edit: {err}") from err
            lines[span.dash : span.end] = shift(new, col - doc.style.offset)
        if change is None and len(indexes) == len(doc.spans) and doc.key_line is not None:
            key = empty_list_key(lines[doc.key_line])
            if key is not None:
                lines[doc.key_line] = key.replace(":", ": []", 1)
        plan.texts[rel] = _join(doc, lines)
    return plan


def _status_cmd(status: str) -> Callable[..., None]:
    def command(
        postback_ids: tuple[int, ...],
        offer: str | None,
        affiliate: str | None,
        acting: str,
        dry_run: bool,
        rules: str | None,
        config: str | None,
    ) -> None:
        tree, pids = _chosen(postback_ids, offer, affiliate, acting, rules, config)
        if not pids:
            click.echo("no postback matches; nothing to do")
            return
        todo = [pid for pid in pids if _status(tree, pid) != status]
        verb = "enabled" if status == "active" else "disabled"
        if not todo:
            what = f"postback {pids[0]} is" if len(pids) == 1 else f"{_count(pids)} are"
            click.echo(f"{what} already {status}; nothing to do")
            return
        plan = plan_many(tree, todo, lambda item: set_path(item, ["status"], status))
        files = ", ".join(sorted(plan.texts))
        what = f"postback {todo[0]}" if len(todo) == 1 else f"{_count(todo)} ({_ids(todo)})"
        apply(tree, plan, dry_run, f"{verb} {what} in {files}")

    return command


def _status(tree: Tree, pid: int) -> str:
    if tree.current is not None:
        return tree.current.postbacks[pid].postback.status
    doc, index = tree.locate(pid)
    return str(item_of(doc, index).get("status", "active"))


def _count(pids: list[int]) -> str:
    return f"{len(pids)} postback{'' if len(pids) == 1 else 's'}"


def _ids(pids: list[int]) -> str:
    return ", ".join(map(str, pids))


selector_options = (
    click.option("--offer", metavar="ID", help="Every postback of this offer."),
    click.option("--affiliate", metavar="ID", help="Every postback of this affiliate."),
)


def _with_selectors(command: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(selector_options):
        command = option(command)
    return command


def _status_command(name: str, status: str, doc: str) -> click.Command:
    command = _status_cmd(status)
    command.__doc__ = doc + (
        "\n\n\b\npostbackd rules disable 101 102\n"
        "postbackd rules disable --offer 1234 --affiliate 42\n\n"
        "With --as affiliate:ID, only the postbacks authored for affiliate ID."
    )
    return click.command(name)(
        click.argument("postback_ids", metavar="[ID]...", nargs=-1, type=int)(
            _with_selectors(as_option(dry_run_option(rules_option(config_option(command)))))
        )
    )


enable_cmd = _status_command(
    "enable", "active", "Set the status of postbacks ID... (and/or the selected ones) to active."
)
disable_cmd = _status_command(
    "disable",
    "disabled",
    "Set the status of postbacks ID... (and/or the selected ones) to disabled (kept in the "
    "files; the daemon cancels their queued deliveries).",
)


@click.command("delete")
@click.argument("postback_ids", metavar="[ID]...", nargs=-1, type=int)
@_with_selectors
@click.option(
    "--confirm",
    type=int,
    metavar="N",
    help="The id again (one id), or the number of postbacks (several), when not on a terminal.",
)
@as_option
@dry_run_option
@rules_option
@config_option
def delete_cmd(
    postback_ids: tuple[int, ...],
    offer: str | None,
    affiliate: str | None,
    confirm: int | None,
    acting: str,
    dry_run: bool,
    rules: str | None,
    config: str | None,
) -> None:
    """Delete postbacks and the comment above each; their ids are recorded in
    retired-ids.yaml and never used again. One id: type the id to confirm. Several, or a
    selector (--offer, --affiliate): type how many. Elsewhere than a terminal pass --confirm.
    With --as affiliate:ID, only postbacks authored for affiliate ID. (To pause, use
    `rules disable`.)"""
    tree, pids = _chosen(postback_ids, offer, affiliate, acting, rules, config)
    if not pids:
        raise click.ClickException("no postback matches; nothing deleted")
    single = len(pids) == 1 and offer is None and affiliate is None
    expected = pids[0] if single else len(pids)
    what = f"postback {pids[0]}" if single else f"{_count(pids)} ({_ids(pids)})"
    if confirm is None and not dry_run:
        if not sys.stdin.isatty():
            raise click.ClickException(
                f"not a terminal: pass --confirm {expected} to delete {what}"
            )
        click.echo(f"about to delete {what}")
        prompt = f"Type {expected} to delete it" if single else f"Type {expected} (the count)"
        typed: str = click.prompt(prompt, default="", show_default=False, type=str)
        confirm = int(typed) if typed.strip().isdigit() else -1
    if confirm is not None and confirm != expected:
        raise click.ClickException(f"confirmation does not match {expected}; nothing deleted")
    plan = plan_many(tree, pids, None)
    side = {RETIRED_FILE: retired_text(tree, pids, datetime.now(UTC))}
    files = ", ".join(sorted(plan.texts))
    apply(
        tree, plan, dry_run, f"deleted {what} from {files}; id(s) retired in {RETIRED_FILE}", side
    )


@click.group("goals")
def goals() -> None:
    """Turn an offer's goals on or off across all its files (the product's goals switch)."""


def _goals_cmd(on: bool) -> Callable[..., None]:
    def command(offer: str, dry_run: bool, rules: str | None, config: str | None) -> None:
        tree = open_tree(rules, config)
        docs = tree.files_of(offer.strip())
        if not docs:
            raise click.ClickException(f"unknown offer {offer}: no rule file describes it")
        plan, side = Plan(), {}
        for doc in docs:
            if doc.problem:
                raise click.ClickException(f"{doc.rel}: {doc.problem}")
            if doc.goals_enabled != on:
                plan.texts[doc.rel] = _join(doc, _set_goals(doc, on))
        catalogue = _catalogue_goals(tree, offer.strip(), on)
        if catalogue is not None:
            side[CATALOGUE_FILE] = catalogue
        state = "on" if on else "off"
        if not plan.texts and not side:
            click.echo(f"goals of offer {offer} are already {state}; nothing to do")
            return
        apply(
            tree,
            plan,
            dry_run,
            f"goals of offer {offer} {state} in {len(docs)} file(s)"
            + ("" if on else "; every postback keeps its goal, not evaluated until goals are on"),
            side,
        )

    return command


def _set_goals(doc: RuleDoc, on: bool) -> list[str]:
    """The file's lines with `goals_enabled:` set (added after `offer:` when absent)."""
    value = "true" if on else "false"
    lines = list(doc.lines)
    for n, line in enumerate(lines):
        if line.startswith("goals_enabled:"):
            _, _, rest = line.partition(":")
            comment = rest[rest.index("#") :] if "#" in rest else ""
            lines[n] = f"goals_enabled: {value}" + (f"  {comment.rstrip()}" if comment else "")
            lines[n] += "\n"
            return lines
    for n, line in enumerate(lines):
        if line.startswith("offer:"):
            lines.insert(n + 1, f"goals_enabled: {value}\n")
            return lines
    return [f"goals_enabled: {value}\n", *lines]


def _catalogue_goals(tree: Tree, offer: str, on: bool) -> str | None:
    """The catalogue's new text when it records goals_enabled for the offer and that differs
    (kept in step with the rule files), else None."""
    path = tree.root / CATALOGUE_FILE
    if not path.is_file():
        return None
    yaml = yaml_rt()
    data = yaml.load(path.read_text("utf-8"))
    offers = data.get("offers") if isinstance(data, dict) else None
    if not isinstance(offers, dict):
        return None
    for key, entry in offers.items():
        if str(key).strip() == offer and isinstance(entry, dict) and "goals_enabled" in entry:
            if entry["goals_enabled"] is on:
                return None
            entry["goals_enabled"] = on
            out = io.StringIO()
            yaml.dump(data, out)
            return out.getvalue()
    return None


def _goals_command(on: bool) -> click.Command:
    command = _goals_cmd(on)
    command.__doc__ = (
        "Turn the goals of offer ID on: every postback's goal is evaluated again."
        if on
        else "Turn the goals of offer ID off: every postback keeps its goal, not evaluated."
    )
    return click.command("enable" if on else "disable")(
        click.option("--offer", required=True, metavar="ID", help="The offer.")(
            dry_run_option(rules_option(config_option(command)))
        )
    )


goals.add_command(_goals_command(True))
goals.add_command(_goals_command(False))
