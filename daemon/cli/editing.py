"""Plans for the `rules` editing commands: a postback edited, deleted or appended as new file
texts that keep every comment and every untouched byte (see daemon.cli.yamlsplice), plus the
round-trip values those edits put in (ids, authors, timestamps, command-line JSON)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from daemon.cli.ruletree import EditError, Plan, RuleDoc, Tree
from daemon.cli.yamlsplice import (
    Span,
    SpliceError,
    Style,
    dump_item,
    dump_map,
    edit_item,
    empty_list_key,
    indent_of,
    load_item,
    parse_value,
    shift,
)
from daemon.gitutil import GitError, git
from daemon.loader import RULE_SUFFIXES

KEY_ORDER = (
    "id",
    "trigger",
    "affiliate",
    "goal",
    "when",
    "status",
    "created_at",
    "author",
    "retry",
    "action",
)


def author_map(author: str | None, affiliate: str | None, root: Path) -> CommentedMap:
    """`{id, name[, affiliate]}` from `ID:NAME`, else from git's user.email and user.name."""
    if author is not None:
        uid, sep, name = author.partition(":")
        if not sep or not uid.strip() or not name.strip():
            raise EditError(f"--author {author!r}: expected ID:NAME, e.g. 7:Jane Doe")
        uid, name = uid.strip(), name.strip()
    else:
        name, uid = _git_config(root, "user.name"), _git_config(root, "user.email")
        if not name:
            raise EditError("no author: pass --author ID:NAME or set git config user.name")
        uid = uid or name
    out = CommentedMap([("id", id_value(uid)), ("name", name)])
    if affiliate is not None:
        out["affiliate"] = id_value(affiliate)
    out.fa.set_flow_style()
    return out


def _git_config(root: Path, key: str) -> str:
    try:
        return git(root, "config", "--get", key).strip()
    except GitError:
        return ""


def id_value(text: str) -> int | str:
    """An id as it reads best in YAML: plain digits as a number, anything else a string."""
    text = text.strip()
    if re.fullmatch(r"[1-9]\d{0,14}|0", text):
        return int(text)
    return text


def timestamp(now: datetime) -> Any:
    """`now` as the plain YAML timestamp of the examples (2026-11-01T10:00:00Z)."""
    return parse_value(now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))


def to_yaml(value: Any) -> Any:
    """A JSON value from the command line as round-trip YAML (objects and lists inline)."""
    if isinstance(value, dict):
        out = CommentedMap((str(k), to_yaml(v)) for k, v in value.items())
        out.fa.set_flow_style()
        return out
    if isinstance(value, list):
        seq = CommentedSeq(to_yaml(v) for v in value)
        seq.fa.set_flow_style()
        return seq
    return value


def put(item: CommentedMap, key: str, value: Any) -> None:
    """Set `key`, keeping its place (and comments) if it exists, else in KEY_ORDER's place."""
    for existing in item:
        if str(existing) == key:
            item[existing] = value
            return
    if key not in KEY_ORDER:
        item[key] = value
        return
    rank = KEY_ORDER.index(key)
    pos = 0
    for i, existing in enumerate(item):
        if str(existing) in KEY_ORDER and KEY_ORDER.index(str(existing)) < rank:
            pos = i + 1
    item.insert(pos, key, value)


def set_path(item: CommentedMap, path: Sequence[str], value: Any) -> None:
    """Set a dotted key (`action.headers.X-Key`); a None value removes the key."""
    node = item
    for depth, key in enumerate(path[:-1]):
        child = _get(node, key)
        if child is None:
            if value is None:
                return
            child = CommentedMap()
            put(node, key, child) if node is item else node.__setitem__(key, child)
        if not isinstance(child, CommentedMap):
            raise EditError(f"{'.'.join(path[: depth + 1])} is not a mapping")
        node = child
    last = path[-1]
    if value is None:
        for existing in list(node):
            if str(existing) == last:
                del node[existing]
    elif node is item:
        put(item, last, value)
    else:
        found = [k for k in node if str(k) == last]
        node[found[0] if found else last] = value


def _get(node: CommentedMap, key: str) -> Any:
    for existing in node:
        if str(existing) == key:
            return node[existing]
    return None


def clone(node: Any) -> Any:
    """A copy of a round-trip value without its comments (they described the original)."""
    if isinstance(node, CommentedMap):
        out = CommentedMap((k, clone(v)) for k, v in node.items())
        if node.fa.flow_style():
            out.fa.set_flow_style()
        return out
    if isinstance(node, CommentedSeq):
        seq = CommentedSeq(clone(v) for v in node)
        if node.fa.flow_style():
            seq.fa.set_flow_style()
        return seq
    return node


# --- planning -----------------------------------------------------------------------------


def item_of(doc: RuleDoc, index: int) -> CommentedMap:
    """The round-trip map of one postback of `doc`."""
    span = doc.spans[index]
    item, _ = load_item(_cut(doc, span), doc.style)
    return item


def _cut(doc: RuleDoc, span: Span) -> list[str]:
    lines = doc.lines[span.dash : span.end]
    lines[-1] = lines[-1] if lines[-1].endswith("\n") else lines[-1] + "\n"
    return shift(lines, doc.style.offset - indent_of(doc.lines[span.dash]))


def plan_edit(tree: Tree, pid: int, change: Callable[[CommentedMap], None]) -> Plan:
    """Apply `change` to postback `pid` in place."""
    doc, index = tree.locate(pid)
    span = doc.spans[index]
    dash_col = indent_of(doc.lines[span.dash])
    try:
        new = edit_item(_cut(doc, span), doc.style, change)
    except (YAMLError, SpliceError) as err:
        raise EditError(f"{doc.rel}: cannot edit postback {pid}: {err}") from err
    lines = doc.lines[: span.dash] + shift(new, dash_col - doc.style.offset) + doc.lines[span.end :]
    return Plan({doc.rel: _join(doc, lines)}, ids=[pid], edits_existing=True)


@dataclass(frozen=True)
class NewItem:
    item: CommentedMap
    comment: str | None = None


def plan_append(tree: Tree, offer: str, items: Sequence[NewItem], file: str | None) -> Plan:
    """Append postbacks to the file of `offer` (`file` if given), or to a new file."""
    doc = _target(tree, offer, file)
    if doc is None:
        return _new_file(file or _new_file_name(tree, offer), offer, items)
    if doc.problem:
        raise EditError(f"{doc.rel}: {doc.problem}")
    lines = list(doc.lines)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    if doc.key_line is None:
        lines.append("postbacks:\n")
        at, col = len(lines), doc.style.offset
    elif not doc.spans:
        key = empty_list_key(lines[doc.key_line])
        if key is None:
            raise EditError(f"{doc.rel}:{doc.key_line + 1}: cannot add to this `postbacks:` line")
        lines[doc.key_line] = key
        at, col = doc.key_line + 1, indent_of(key) + doc.style.offset
    else:
        at, col = doc.spans[-1].end, indent_of(doc.lines[doc.spans[-1].dash])
    lines[at:at] = _render(items, doc.style, col, first_blank=bool(doc.spans), blank=_blanks(doc))
    return Plan({doc.rel: _join(doc, lines)})


def _render(
    items: Sequence[NewItem], style: Style, col: int, *, first_blank: bool, blank: bool
) -> list[str]:
    out: list[str] = []
    for i, one in enumerate(items):
        if first_blank if i == 0 else blank:
            out.append("\n")
        if one.comment:
            out.append(" " * col + f"# {one.comment}\n")
        out.extend(shift(dump_item(one.item, style), col - style.offset))
    return out


def _target(tree: Tree, offer: str, file: str | None) -> RuleDoc | None:
    if file is not None:
        rel = _inside_rel(tree.root, file)
        doc = tree.get(rel)
        if doc is not None and doc.offer != offer:
            raise EditError(f"--file {file}: it describes offer {doc.offer}, not {offer}")
        if doc is None and (tree.root / rel).exists():
            raise EditError(f"--file {file}: exists but is not a rule file")
        return doc
    docs = tree.files_of(offer)
    return docs[0] if docs else None


def _inside_rel(root: Path, file: str) -> str:
    """`file` as a path relative to the rules directory, refused when it is not one (absolute,
    `..`, a symlink out of the tree, not a .yaml name). Whether the loader would read it (hidden
    names, tests/, backups) is checked with the loader itself (ruletree.check)."""
    path = Path(file)
    rel = path.as_posix()
    bad = f"--file {file}: a .yaml path inside the rules directory"
    if path.is_absolute() or ".." in path.parts or not rel.endswith(RULE_SUFFIXES) or not rel:
        raise EditError(bad)
    real = root.resolve()
    target = (root / path).resolve()  # every symlink on the way, the file's own too
    if real not in target.parents:
        raise EditError(f"{bad}; it leads out of the rules directory through a symlink")
    if (root / path).is_symlink() and not target.exists():
        raise EditError(f"--file {file}: a dangling symlink")
    return rel


def _new_file_name(tree: Tree, offer: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", offer).strip("-") or "offer"
    rel, n = f"offer-{slug}.yaml", 1
    while (tree.root / rel).exists():
        n += 1
        rel = f"offer-{slug}-{n}.yaml"
    return rel


def _new_file(rel: str, offer: str, items: Sequence[NewItem]) -> Plan:
    head = dump_map(CommentedMap([("offer", id_value(offer))]), Style())
    body = _render(items, Style(), Style().offset, first_blank=False, blank=True)
    return Plan({rel: "".join([*head, "postbacks:\n", *body])}, created={rel})


def _blanks(doc: RuleDoc) -> bool:
    """Whether the file separates postbacks with a blank line (yes for a single one)."""
    if len(doc.spans) < 2:
        return True
    return any(not doc.lines[s.lead - 1].strip() for s in doc.spans[1:])


def _join(doc: RuleDoc, lines: Iterable[str]) -> str:
    text = "".join(lines)
    return text.replace("\n", "\r\n") if doc.crlf else text
