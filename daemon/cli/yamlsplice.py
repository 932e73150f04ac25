"""Text surgery on one rule file: where each postback's lines are, and how to replace, remove or
append one postback while every other byte of the file stays as the author wrote it.

ruamel.yaml's round trip keeps comments but not always the exact spelling of a file (indentation
it did not guess, some flow styles), and it attaches the comment above a list item to the item
before it. So we never dump a whole file: a postback is cut out as text, edited through ruamel
on its own, merged back line by line against a no-op round trip of the same text (so lines the
edit did not touch keep their bytes), and spliced in.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

WRAPPER = "postbacks"  # the key a cut-out item is parsed under


class SpliceError(ValueError):
    """The file's layout is one we cannot edit as text (the message says what to change)."""


@dataclass(frozen=True)
class Style:
    """Indentation as ruamel.yaml counts it: `mapping`, `sequence` (item content) and `offset`
    (the dash), each relative to the parent key."""

    mapping: int = 2
    sequence: int = 4
    offset: int = 2


@dataclass(frozen=True)
class Span:
    """One postback's lines (0-based): `lead` starts the comments right above it, `dash` is the
    line of its dash, `end` is just after its last line of content."""

    lead: int
    dash: int
    end: int


class _Emitter(YAML(typ="rt").Emitter):  # type: ignore[misc]
    """Where YAML needs quotes and the author chose none, use double quotes (as the example
    rules do); quotes the author wrote are kept as written."""

    def choose_scalar_style(self) -> Any:
        style = super().choose_scalar_style()
        return '"' if style == "'" and self.event.style is None else style


def yaml_rt(style: Style = Style()) -> YAML:
    """A round-trip YAML set up to reproduce hand-written rule files."""
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 1 << 16  # never fold a long URL
    yaml.brace_single_entry_mapping_in_flow_sequence = True  # [{var: x}] stays braced
    yaml.indent(mapping=style.mapping, sequence=style.sequence, offset=style.offset)
    yaml.Emitter = _Emitter
    return yaml


def parse_value(text: str) -> Any:
    """A YAML scalar or flow value written by a user (`2026-01-01T00:00:00Z`, `{a: 1}`...)."""
    return yaml_rt().load(text)


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _blank(line: str) -> bool:
    return not line.strip()


def _comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def dash_line(lines: Sequence[str], node_line: int) -> int:
    """The line of the dash of the item whose content starts at `node_line`."""
    k = node_line
    while k >= 0:
        text = lines[k].lstrip()
        if text.startswith("-") and (len(text) == 1 or text[1] in " \t\r\n"):
            return k
        if k != node_line and not (_blank(lines[k]) or _comment(lines[k])):
            break
        k -= 1
    return node_line


def spans(lines: Sequence[str], node_lines: Sequence[int], region_end: int) -> list[Span]:
    """The span of each item, given the line where each item's content starts and the line
    where the list's region ends (the parent's next key, or the end of the file)."""
    dashes = [dash_line(lines, n) for n in node_lines]
    out: list[Span] = []
    for i, dash in enumerate(dashes):
        lead = dash
        while lead > 0 and _comment(lines[lead - 1]):
            lead -= 1
        if i > 0:
            lead = max(lead, out[-1].end)
        boundary = region_end
        if i + 1 < len(dashes):
            boundary = dashes[i + 1]
        col = indent_of(lines[dash])
        end = dash + 1
        for k in range(dash + 1, boundary):
            line = lines[k]
            if _blank(line):
                continue
            if _comment(line) and indent_of(line) <= col:
                continue  # a comment at the list's own indentation belongs to what follows
            end = k + 1
        if i + 1 < len(dashes):
            # Comments right above the next dash are that item's lead, not this item's tail.
            nxt = dashes[i + 1]
            while nxt > end and _comment(lines[nxt - 1]):
                nxt -= 1
            end = min(end, nxt)
        out.append(Span(lead, dash, end))
    return out


def detect_style(lines: Sequence[str], key_line: int, first: Span | None) -> Style:
    """The indentation the file uses, read from its `postbacks:` list; the examples' otherwise."""
    if first is None:
        return Style()
    key_col = indent_of(lines[key_line])
    dash = lines[first.dash]
    dash_col = indent_of(dash)
    rest = dash.lstrip()[1:]
    content_col = dash_col + 1 + (len(rest) - len(rest.lstrip(" ")))
    if not rest.strip() and first.dash + 1 < len(lines):
        content_col = indent_of(lines[first.dash + 1])
    mapping = 2
    for k in range(first.dash, first.end - 1):
        text = lines[k].split(" #")[0].rstrip()
        nxt = lines[k + 1]
        if text.endswith(":") and not _blank(nxt) and not nxt.lstrip().startswith(("-", "#")):
            head = text.lstrip()
            key_at = indent_of(text) + (2 if head.startswith("- ") else 0)
            if indent_of(nxt) > key_at:
                mapping = indent_of(nxt) - key_at
                break
    offset = max(dash_col - key_col, 0)
    return Style(mapping, max(content_col - key_col, offset + 2), offset)


def shift(lines: Sequence[str], by: int) -> list[str]:
    """Indent (or dedent) every non-blank line by `by` columns."""
    out: list[str] = []
    for line in lines:
        if by >= 0:
            out.append(" " * by + line if line.strip() else line)
        else:
            cut = min(-by, indent_of(line))
            out.append(line[cut:])
    return out


def dump_item(item: CommentedMap, style: Style) -> list[str]:
    """`item` as list-item lines, its dash at column `style.offset`."""
    buf = io.StringIO()
    yaml_rt(style).dump(CommentedMap([(WRAPPER, CommentedSeq([item]))]), buf)
    return buf.getvalue().splitlines(keepends=True)[1:]


def dump_map(data: CommentedMap, style: Style) -> list[str]:
    """A whole (new) document's lines."""
    buf = io.StringIO()
    yaml_rt(style).dump(data, buf)
    return buf.getvalue().splitlines(keepends=True)


def load_item(item_lines: Sequence[str], style: Style) -> tuple[CommentedMap, list[str]]:
    """Parse one cut-out item (dash at `style.offset`): its map, and the wrapper's lines."""
    doc = [f"{WRAPPER}:\n", *item_lines]
    data = yaml_rt(style).load("".join(doc))
    seq = data[WRAPPER] if isinstance(data, CommentedMap) else None
    if not isinstance(seq, CommentedSeq) or len(seq) != 1 or not isinstance(seq[0], CommentedMap):
        raise SpliceError("a postback could not be cut out of its file as text")
    return seq[0], doc


def edit_item(item_lines: Sequence[str], style: Style, change: Any) -> list[str]:
    """Apply `change(map)` to one cut-out item and return its new lines, every line the change
    did not touch kept byte for byte."""
    item, doc = load_item(item_lines, style)
    noop = [doc[0], *dump_item(item, style)]
    change(item)
    edited = [doc[0], *dump_item(item, style)]
    return merge_lines(doc, noop, edited)[1:]


def merge_lines(original: Sequence[str], noop: Sequence[str], edited: Sequence[str]) -> list[str]:
    """`original` with the changes that turn `noop` (original after a no-op round trip) into
    `edited`. Where the round trip respelled a line the edit also touches, the new spelling
    wins; every other line of `original` is kept as it is."""
    if list(noop) == list(original):
        return list(edited)
    anchor: dict[int, int] = {}
    for block in SequenceMatcher(None, noop, original, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            anchor[block.a + k] = block.b + k
    changes: list[list[int]] = []
    ops = SequenceMatcher(None, noop, edited, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            continue
        # Widen to the nearest lines the round trip kept, so the cut is well defined.
        while i1 > 0 and (i1 - 1) not in anchor:
            i1, j1 = i1 - 1, j1 - 1
        while i2 < len(noop) and i2 not in anchor:
            i2, j2 = i2 + 1, j2 + 1
        if changes and i1 <= changes[-1][1]:
            # Overlaps the previous change: that one's start stands, this one's end is exact.
            changes[-1][1], changes[-1][3] = i2, j2
        else:
            changes.append([i1, i2, j1, j2])
    out: list[str] = []
    pos = 0
    for i1, i2, j1, j2 in changes:
        start = anchor[i1 - 1] + 1 if i1 > 0 else 0
        stop = anchor[i2] if i2 < len(noop) else len(original)
        out.extend(original[pos:start])
        out.extend(edited[j1:j2])
        pos = stop
    out.extend(original[pos:])
    return out


_EMPTY_LIST = re.compile(r"^(?P<key>\s*postbacks\s*:)\s*(\[\s*\])?\s*(?P<comment>#.*)?$")


def empty_list_key(line: str) -> str | None:
    """`postbacks:` (or `postbacks: []`) with its comment, ready to take block items; None
    when the line holds anything else."""
    found = _EMPTY_LIST.match(line.rstrip("\r\n"))
    if found is None:
        return None
    comment = found.group("comment")
    return found.group("key") + (f"  {comment}" if comment else "") + "\n"
