"""`--as admin|affiliate:ID` on the `rules` editing commands (issue 15): a user of an affiliate
creates postbacks for its own affiliate only (as the author's affiliate and as the affiliate
they match), and touches only the postbacks it may see, those authored for its affiliate (the
rule of daemon/visibility.py; any other id reads as one that does not exist, as in the API).

The decisions are plain functions of the viewer and the postback's mapping; the commands turn
a refusal (:class:`ActingError`) into one error line and write nothing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import click
from pydantic import TypeAdapter, ValidationError

from daemon.cli.editing import item_of
from daemon.cli.ruletree import EditError, Tree
from daemon.rules import ANY_AFFILIATE, Id
from daemon.visibility import Viewer
from daemon.yamlfile import raw_text

as_option = click.option(
    "--as",
    "acting",
    metavar="admin|affiliate:ID",
    default="admin",
    show_default=True,
    help="Act as this user: an affiliate's user creates postbacks for its own affiliate only, "
    "and changes only those authored for it.",
)


class ActingError(EditError):
    """What a viewer may not do (one line: the command's error)."""


def viewer_of(text: str) -> Viewer:
    """The viewer of `--as`; a usage error for anything but admin or affiliate:ID, ID an id as
    the rules write it (1 to 128 printable characters), never "*" (every affiliate)."""
    shown = repr(text[:40]) + ("..." if len(text) > 40 else "")
    try:
        viewer = Viewer.parse(text)
        if viewer.affiliate is not None:
            TypeAdapter(Id).validate_python(viewer.affiliate)
    except (ValueError, ValidationError) as err:
        raise click.BadParameter(
            f"{shown} is not admin or affiliate:ID", param_hint="--as"
        ) from err
    if viewer.affiliate == ANY_AFFILIATE:
        raise click.BadParameter(
            "affiliate:* is every affiliate, not one: name the affiliate", param_hint="--as"
        )
    return viewer


def _id_text(value: Any) -> str:
    return raw_text(value).strip()


def author_affiliate_for(viewer: Viewer, given: str | None) -> str | None:
    """The author's affiliate: `--author-affiliate` as given for an admin; the viewer's own
    for an affiliate's user (another one is refused)."""
    if viewer.is_admin:
        return given
    if given is not None and given.strip() != viewer.affiliate:
        raise ActingError(
            f"--author-affiliate {given.strip()} but --as affiliate:{viewer.affiliate}: an "
            f"affiliate's user writes as a user of its own affiliate only"
        )
    return viewer.affiliate


def own_postback(viewer: Viewer, item: Mapping[str, Any]) -> None:
    """A new or changed postback of an affiliate's user matches its own affiliate only (not
    another one, not "*" for every affiliate)."""
    if viewer.is_admin:
        return
    value = item.get("affiliate")
    text = None if value is None or isinstance(value, Mapping | list) else _id_text(value)
    if text == viewer.affiliate:
        return
    shown = repr(text) if text is not None else "none"
    if text == "*":
        shown = "'*' (every affiliate)"
    raise ActingError(
        f"--as affiliate:{viewer.affiliate} creates and changes postbacks of affiliate "
        f"{viewer.affiliate} only, not {shown}"
    )


def owner(item: Mapping[str, Any]) -> str | None:
    """The affiliate whose users may see a postback as written (Postback.owner_affiliate)."""
    author = item.get("author")
    if not isinstance(author, Mapping):
        return None
    value = author.get("affiliate")
    return None if value is None else _id_text(value)


def sees(viewer: Viewer, tree: Tree, pid: int) -> bool:
    """True when `viewer` may see postback `pid` of the tree (False when it is not there)."""
    if viewer.is_admin:
        return True
    if tree.current is not None:
        lp = tree.current.postbacks.get(pid)
        return lp is not None and lp.postback.owner_affiliate == viewer.affiliate
    try:
        doc, index = tree.locate(pid)
    except EditError:
        return False
    return owner(item_of(doc, index)) == viewer.affiliate


def require_seen(viewer: Viewer, tree: Tree, pids: Iterable[int]) -> None:
    """Every id is one the viewer may see; the others read as ids that do not exist."""
    hidden = [pid for pid in pids if not sees(viewer, tree, pid)]
    if hidden:
        raise ActingError(f"no postback with id {', '.join(map(str, hidden))} in {tree.root}")
