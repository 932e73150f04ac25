"""A rules tree as text, for the `rules` editing commands: every rule file with the position
of each postback, the ids ever used, and the check-then-write of a planned change.

A change is planned in full before anything is written (see daemon.cli.editing): `check` loads a
temporary copy of the tree with the new texts through the same loader as `postbackd validate`,
and only then `write` replaces the files, each atomically.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.cli.history import compare
from daemon.cli.yamlsplice import Span, Style, detect_style, spans
from daemon.errors import Issue, RulesError
from daemon.gitutil import GitError, git
from daemon.loader import NOT_RULE_FILES, RuleSet, load_rules, read_capped, rule_files
from daemon.yamlfile import YamlError, YList, YMap, load_yaml, raw_text

_HISTORY_ID = re.compile(r"^[+-]\s*-\s+id:\s*[\"']?(\d{1,12})[\"']?\s*(?:#.*)?$", re.MULTILINE)


class EditError(ValueError):
    """A change that cannot be made; the message is one line for the user."""


@dataclass
class RuleDoc:
    """One rule file as text, with the position of each postback."""

    rel: str
    path: Path
    lines: list[str]  # "\n"-terminated (a CRLF file is converted back when written)
    original: bytes
    crlf: bool = False
    offer: str | None = None
    goals_enabled: bool = False
    ids: list[int | None] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    key_line: int | None = None  # the `postbacks:` line
    style: Style = field(default_factory=Style)
    problem: str | None = None  # why this file cannot be edited as text


@dataclass
class Plan:
    """A change, not yet written: the new text of every file it touches."""

    texts: dict[str, str] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)
    ids: list[int] = field(default_factory=list)  # postbacks added or touched
    notes: list[str] = field(default_factory=list)
    edits_existing: bool = False  # an existing postback changes: check what may not change


class Tree:
    """Every rule file below a rules directory. The current rules, loaded once, are the index
    (ids, offers, which file holds which postback); a file is read as text only when a change
    touches it. When the current rules do not load, every file is read to find things."""

    def __init__(self, root: Path, rels: list[str], current: RuleSet | None) -> None:
        self.root = root
        self.rels = rels
        self.current = current  # None when the tree does not load as it stands
        self._docs: dict[str, RuleDoc] = {}

    @classmethod
    def scan(cls, root: Path) -> Tree:
        if not root.is_dir():
            raise EditError(f"{root}: rules directory does not exist")
        rels = [p.relative_to(root).as_posix() for p in _rule_files(root)]
        try:
            current: RuleSet | None = load_rules(root, git=False)
        except RulesError:
            current = None
        return cls(root, rels, current)

    def get(self, rel: str) -> RuleDoc | None:
        """The file `rel` read as text (once), or None when it is not a rule file here."""
        if rel not in self._docs:
            if rel not in self.rels:
                return None
            self._docs[rel] = read_doc(self.root, rel)
        return self._docs[rel]

    def _all(self) -> list[RuleDoc]:
        return [doc for rel in self.rels if (doc := self.get(rel)) is not None]

    def ids(self) -> set[int]:
        if self.current is not None:
            return set(self.current.postbacks)
        return {pid for doc in self._all() for pid in doc.ids if pid is not None}

    def files_of(self, offer: str) -> list[RuleDoc]:
        """The files that describe `offer`, sorted (the first takes new postbacks)."""
        pattern = re.compile(rf"^offer\s*:\s*[\"']?{re.escape(offer)}(?!\w)", re.MULTILINE)
        candidates = [rel for rel in self.rels if pattern.search(_text(self.root / rel))]
        if self.current is None:
            candidates = self.rels  # a layout the quick look may miss: read them all
        docs = [self.get(rel) for rel in sorted(candidates)]
        return [d for d in docs if d is not None and d.offer == offer]

    def locate(self, pid: int) -> tuple[RuleDoc, int]:
        if self.current is not None:
            lp = self.current.postbacks.get(pid)
            found = [] if lp is None else [self.get(lp.file)]
        else:
            found = [d for d in self._all() if pid in d.ids]
        if not found or found[0] is None:
            broken = [] if self.current else [d.rel for d in self._all() if d.problem]
            hint = f" (these files do not parse: {', '.join(broken)})" if broken else ""
            raise EditError(f"no postback with id {pid} in {self.root}{hint}")
        if len(found) > 1:
            where = " and ".join(d.rel for d in found if d)
            raise EditError(f"postback {pid} appears in {where}; fix the duplicate id first")
        doc = found[0]
        if doc.problem:
            raise EditError(f"{doc.rel}: {doc.problem}")
        return doc, doc.ids.index(pid)


def _text(path: Path) -> str:
    data = read_capped(path, path.name, [])  # never blocks on a FIFO, never raises
    return data.decode("utf-8", errors="replace") if data is not None else ""


def _rule_files(root: Path) -> list[Path]:
    """Exactly the files the loader reads (dangling links, FIFOs and the like are the loader's
    errors, not a traceback here)."""
    real = root.resolve()
    return [root / p.relative_to(real) for p in rule_files(root)[0]]  # as `root` is written


def read_doc(root: Path, rel: str) -> RuleDoc:
    path = root / rel
    issues: list[Issue] = []
    data = read_capped(path, rel, issues)
    if data is None:
        return RuleDoc(rel, path, [], b"", problem=issues[0].message if issues else "unreadable")
    doc = RuleDoc(rel, path, [], data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        doc.problem = "not valid UTF-8"
        return doc
    doc.crlf = "\r\n" in text
    doc.lines = text.replace("\r\n", "\n").splitlines(keepends=True)
    try:
        raw = load_yaml(data)
    except YamlError as err:
        doc.problem = f"line {err.line}: {err.message}"
        return doc
    if raw is None:
        return doc
    if not isinstance(raw, YMap):
        doc.problem = "a rule file must be a mapping"
        return doc
    _locate_postbacks(doc, raw)
    return doc


def _locate_postbacks(doc: RuleDoc, raw: YMap) -> None:
    if raw.get("offer") is not None:
        doc.offer = raw_text(raw["offer"]).strip()
    doc.goals_enabled = raw.get("goals_enabled") is True
    if "postbacks" not in raw:
        return
    doc.key_line = raw.lines["postbacks"] - 1
    items = raw["postbacks"]
    if items is None:
        return
    if not isinstance(items, YList):
        doc.problem = "`postbacks` is not a list"
        return
    after = [line for key, line in raw.lines.items() if line - 1 > doc.key_line]
    region_end = min(after) - 1 if after else len(doc.lines)
    key_text = doc.lines[doc.key_line].split("#")[0]
    if items and "[" in key_text.partition(":")[2]:
        doc.problem = "`postbacks` is written in flow style ([...]); write it as a block list"
        return
    doc.spans = spans(doc.lines, [n - 1 for n in items.lines], region_end)
    doc.ids = [_item_id(item) for item in items]
    doc.style = detect_style(doc.lines, doc.key_line, doc.spans[0] if doc.spans else None)


def _item_id(item: Any) -> int | None:
    pid = item.get("id") if isinstance(item, dict) else None
    return int(pid) if isinstance(pid, int) and not isinstance(pid, bool) else None


def history_ids(root: Path) -> set[int]:
    """Ids that postback lines (`- id: N`) ever had in the git history below `root`, on every
    branch we know of; empty outside git."""
    try:
        log = git(root, "log", "--all", "--format=", "-p", "--unified=0", "--no-color", "--", ".")
    except GitError:
        return set()
    return {int(m) for m in _HISTORY_ID.findall(log)}


def next_ids(tree: Tree, count: int) -> list[int]:
    """`count` fresh ids above every id in the tree and in its git history (never reused)."""
    top = max(tree.ids() | history_ids(tree.root), default=0)
    return list(range(top + 1, top + 1 + count))


# --- checking and writing -----------------------------------------------------------------


def check(tree: Tree, plan: Plan) -> tuple[list[Issue], RuleSet | None]:
    """Load a temporary copy of the tree with the plan applied, as `postbackd validate` would;
    for an edit, also what may not change for an existing id (as `validate --base` would).
    The issues, and the rule set the copy loaded (None when it did not load)."""
    with tempfile.TemporaryDirectory(prefix="postbackd-edit-") as tmp:
        copy = Path(tmp) / "rules"
        issues = copy_rule_files(tree.root, copy)
        for rel, text in plan.texts.items():
            target = copy / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(text.encode("utf-8"))
        try:
            new = load_rules(copy, git=False)
        except RulesError as err:
            return issues + err.issues, None
        if issues:
            return issues, new
    unloaded = sorted(set(plan.texts) - set(new.files))
    if unloaded:
        return [Issue(rel, 0, "postbackd would not load this file") for rel in unloaded], new
    if not plan.edits_existing or tree.current is None:
        return [], new
    return compare(new, tree.current, "the current files"), new


def copy_rule_files(root: Path, copy: Path, also: Iterable[str] = NOT_RULE_FILES) -> list[Issue]:
    """Copy the files the loader reads, and the side files `also` at the top (the catalogue,
    the retired ids) when they exist, into `copy`: only those (a dangling link or a FIFO
    elsewhere is nothing to copy); the problems the loader would report of the tree itself."""
    real = root.resolve()
    paths, issues = rule_files(root)
    paths += [real / name for name in also if (real / name).exists()]
    copy.mkdir(parents=True)
    for path in paths:
        rel = path.relative_to(real).as_posix()
        data = read_capped(path, rel, issues)
        if data is not None:
            target = copy / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return issues


def write(tree: Tree, plan: Plan) -> None:
    """Replace each file atomically, refusing if it changed since it was read."""
    for rel, text in plan.texts.items():
        path = tree.root / rel
        doc = tree.get(rel)
        if doc is not None and path.read_bytes() != doc.original:
            raise EditError(f"{rel} changed while we edited it; nothing written, try again")
        if doc is None and path.exists():
            raise EditError(f"{rel} appeared while we edited; nothing written, try again")
        atomic_write(path, text.encode("utf-8"))


def atomic_write(path: Path, data: bytes) -> None:
    """Write a sibling temp file (a name the loader ignores), fsync it, rename it over `path`."""
    target = path.resolve() if path.is_symlink() else path
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = target.stat().st_mode & 0o7777 if target.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
