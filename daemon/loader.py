"""Loads and validates a whole `rules.d/` tree, all or nothing (SPEC 7.1 and 7.5).

Start-up, hot reload and `postbackd validate` all come through :func:`load_rules`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISDIR, S_ISFIFO, S_ISREG, S_ISSOCK
from typing import Any, TypeGuard

from pydantic import BaseModel, ValidationError

from daemon.actions import BUILDERS
from daemon.errors import Issue, RulesError
from daemon.gitutil import work_tree_state
from daemon.macros import Template
from daemon.models import Trigger
from daemon.rules import Postback, RuleFile
from daemon.sharing import Pool, share_parts
from daemon.yamlfile import MAX_FILE_BYTES, YamlError, YList, YMap, line_of, load_yaml

RULE_SUFFIXES = (".yaml", ".yml")
TESTS_DIR = "tests"
# Files at the top of rules.d/ that are kept with the rules but are not rule files: the
# catalogue and the retired ids (read by daemon/catalogue.py, which imports their names from
# here) and the affiliates policy file (daemon/affiliates/policy.py).
CATALOGUE_FILE = "catalogue.yaml"
RETIRED_FILE = "retired-ids.yaml"
NOT_RULE_FILES = frozenset({CATALOGUE_FILE, RETIRED_FILE, "affiliates.yaml"})
_BACKUP_SUFFIXES = ("~", ".swp", ".swo", ".swx", ".bak", ".orig", ".rej", ".tmp", ".part")


def is_ignored_name(name: str) -> bool:
    """Hidden files, editor swap/backup files and temp files are never rules."""
    return name.startswith((".", "#", "~")) or name.endswith(_BACKUP_SUFFIXES)


@dataclass(frozen=True)
class RulesVersion:
    digest: str  # sha256 over every rule file's path and content
    git_commit: str | None = None
    git_dirty: bool = False

    def __str__(self) -> str:
        text = self.digest[:12]
        if self.git_commit:
            text += f"+git.{self.git_commit[:12]}" + ("-dirty" if self.git_dirty else "")
        return text


@dataclass(frozen=True, slots=True)  # slots: 100,000 of them hold no per-instance dict
class LoadedPostback:
    postback: Postback
    offer: str
    goals_enabled: bool
    file: str
    line: int

    @property
    def id(self) -> int:
        return self.postback.id


@dataclass(frozen=True)
class RuleSet:
    postbacks: Mapping[int, LoadedPostback]
    offers: Mapping[str, tuple[LoadedPostback, ...]]  # every postback of an offer, by id
    active: Mapping[tuple[str, Trigger], tuple[LoadedPostback, ...]]  # the matching index
    version: RulesVersion
    files: tuple[str, ...]
    secrets: frozenset[str]
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Store (affiliate) postbacks by (offer, trigger, affiliate): they match their own
    # affiliate's conversions only, so matching never looks at another's (issue 15).
    by_affiliate: Mapping[tuple[str, Trigger, str], tuple[LoadedPostback, ...]] = field(
        default_factory=dict
    )

    @classmethod
    def empty(cls) -> RuleSet:
        return cls({}, {}, {}, RulesVersion(hashlib.sha256().hexdigest()), (), frozenset())


def load_rules(
    rules_dir: str | Path,
    *,
    missing_secrets: Callable[[Iterable[str]], list[str]] | None = None,
    git: bool = True,
    cache: ParseCache | None = None,
) -> RuleSet:
    """Load every rule file below `rules_dir`; raise RulesError listing every problem found.

    `missing_secrets`, when given, is asked which referenced secrets do not resolve (the daemon
    refuses a set whose secrets are missing; `validate` only lists them)."""
    root = Path(rules_dir)
    if not root.is_dir():
        raise RulesError([Issue(str(root), 0, "rules directory does not exist")])
    real_root = root.resolve()
    found, issues = _discover(real_root)
    cache = cache if cache is not None else ParseCache()
    cache.use_root(real_root)
    last = cache.unchanged(found) if not issues else None
    if _reusable(last, missing_secrets):
        # Every file has the stat it had when the last set was built from it: not read again.
        return _again(last, real_root, git)
    with collector_paused():  # (YAML parsing runs with it: ParseCache.parse)
        return _read_and_build(found, issues, missing_secrets, git, real_root, cache)


def _read_and_build(
    found: list[tuple[str, str]],
    issues: list[Issue],
    missing_secrets: Callable[[Iterable[str]], list[str]] | None,
    git: bool,
    real_root: Path,
    cache: ParseCache,
) -> RuleSet:
    """Every file read and hashed, parsed where it changed, and the set: the last one when
    every file is the one it was built from."""
    started = time.time_ns()  # before any file is read (see ParseCache.record_stats)
    stats: dict[str, FileStat] = {}
    parsed: list[tuple[str, _Parsed]] = []
    digest = hashlib.sha256()  # the version: every file's path, length and content, by path
    for rel, path in sorted(found):
        got = _read_file(path, rel, issues)
        if got is None:
            continue
        data, stats[rel] = got
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
        # One file's bytes at a time (10,000 files held at once were 40 MB at the peak).
        parsed.append((rel, cache.parse(rel, data)))
        del data
    cache.keep_only(stats)
    cache.record_stats(stats, started)
    fingerprint = cache.fingerprint(stats)
    last = cache.last_result(fingerprint) if not issues else None
    if _reusable(last, missing_secrets):
        # Every file is the one the last load built its set from (that set had no issue):
        # the same set, with the git state of now. A reload of an unchanged tree builds nothing.
        return _again(last, real_root, git)
    git_root = real_root if git else None
    return _build_set(parsed, issues, missing_secrets, git_root, digest.hexdigest(), cache)


_pause_lock = threading.Lock()
_pauses = 0  # loads running now
_was_enabled = False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while rules are read and a set is built, or the
    parsed-rules cache is read: that makes hundreds of thousands of objects, none of them
    garbage, and the collections they set off walked every one of them again and again (half
    the CPU of a start from the cache with 100,000 postbacks). Not while YAML is parsed
    (_collector_running), which may take minutes while the daemon serves. Process-wide, so
    counted: the last one to end turns it back on. A reload ends with a collection of its own
    (daemon.reload.settle_memory)."""
    global _pauses, _was_enabled
    with _pause_lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()


@contextlib.contextmanager
def _collector_running() -> Iterator[None]:
    """The collector on for a while inside a pause that turned it off."""
    with _pause_lock:
        resumed = _pauses > 0 and _was_enabled and not gc.isenabled()
        if resumed:
            gc.enable()
    try:
        yield
    finally:
        with _pause_lock:
            if resumed and _pauses > 0:
                gc.disable()


def _build_set(
    parsed: list[tuple[str, _Parsed]],
    issues: list[Issue],
    missing_secrets: Callable[[Iterable[str]], list[str]] | None,
    git_root: Path | None,
    version: str,
    cache: ParseCache,
) -> RuleSet:
    """The set of these parsed files, or RulesError with every problem of them."""
    loaded: list[LoadedPostback] = []
    offer_goals: dict[str, tuple[bool, str, int]] = {}
    for rel, one in parsed:
        loaded.extend(_load_file(rel, one, issues, offer_goals, cache))
    by_id = _check_ids(loaded, issues)
    seen: dict[int, frozenset[str]] = {}  # postbacks share action objects (daemon.sharing)
    secrets = {name: lp for lp in loaded for name in _secrets_of(lp.postback, seen)}
    if missing_secrets is not None:
        for name in missing_secrets(sorted(secrets)):
            lp = secrets[name]
            issues.append(Issue(lp.file, lp.line, f"secret {name!r} does not resolve", lp.id))
    if issues:
        raise RulesError(issues)
    files = tuple(rel for rel, _ in parsed)
    built = _build(by_id, files, version, git_root, frozenset(secrets))
    cache.remember(cache.fingerprint(files), built)
    return built


def _reusable(
    last: RuleSet | None, missing_secrets: Callable[[Iterable[str]], list[str]] | None
) -> TypeGuard[RuleSet]:
    """Whether the last set may be taken again: there is one, and its secrets still resolve."""
    return last is not None and not (missing_secrets and missing_secrets(sorted(last.secrets)))


def _again(last: RuleSet, root: Path, git: bool) -> RuleSet:
    """The set built last time from these very files, with the git state of now."""
    commit, dirty = work_tree_state(root) if git else (None, False)
    version = RulesVersion(last.version.digest, commit, dirty)
    return dataclasses.replace(last, version=version, loaded_at=datetime.now(UTC))


def _discover(root: Path) -> tuple[list[tuple[str, str]], list[Issue]]:
    """The rule files below `root` (a resolved folder) as (path relative to root, path), in the
    order of a sorted walk that follows symlinked folders, and the problems of the layout.
    os.scandir: the kind of each entry and whether it is a symlink come with the listing."""
    found: list[tuple[str, str]] = []
    issues: list[Issue] = []
    seen_dirs: set[Path] = set()
    top = str(root)
    pending: list[tuple[str, str]] = [(top, "")]  # (folder, its path relative to root + "/")
    while pending:
        here, prefix = pending.pop()
        real = Path(here).resolve()
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        try:
            with os.scandir(here) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError:
            continue  # as os.walk: a folder that cannot be listed is skipped
        folders: list[tuple[str, str]] = []
        for entry in entries:
            name = entry.name
            try:
                is_dir = entry.is_dir()  # follows a symlink, as os.walk(followlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                if is_ignored_name(name) or (not prefix and name == TESTS_DIR):
                    continue
                path = Path(entry.path)
                if not _inside(path.resolve(), root):
                    issues.append(_outside(path, root))
                    continue
                folders.append((entry.path, f"{prefix}{name}/"))
                continue
            if is_ignored_name(name) or not name.endswith(RULE_SUFFIXES):
                continue
            if not prefix and name in NOT_RULE_FILES:
                continue
            # A file that is not a symlink is where its folder is, and the folder was checked
            # (resolving each of 10,000 files was most of a reload of an unchanged tree).
            try:
                link = entry.is_symlink()
            except OSError:
                link = False
            if link and not _inside(Path(entry.path).resolve(), root):
                issues.append(_outside(Path(entry.path), root))
                continue
            found.append((f"{prefix}{name}", entry.path))
        pending.extend(reversed(folders))  # depth first, in name order, as os.walk
    return found, issues


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _outside(path: Path, root: Path) -> Issue:
    return Issue(path.relative_to(root).as_posix(), 0, "symlink leads out of the rules directory")


def rule_files(root: Path) -> tuple[list[Path], list[Issue]]:
    """The files :func:`load_rules` reads below `root`, and the problems of the tree's layout
    (the rules editor writes only where the loader reads: one predicate for both)."""
    real = root.resolve()
    found, issues = _discover(real)
    return [Path(path) for _, path in found], issues


def _special(mode: int) -> str | None:
    """What a file that is not a regular file is (we never read one: a FIFO blocks forever)."""
    if S_ISREG(mode):
        return None
    kinds = {S_ISFIFO: "a FIFO", S_ISSOCK: "a socket", S_ISDIR: "a directory"}
    kind = next((name for test, name in kinds.items() if test(mode)), "a device")
    return f"not a regular file ({kind}): only regular files are read"


def read_capped(path: Path, rel: str, issues: list[Issue]) -> bytes | None:
    """A rule or source file's bytes, or None with an Issue (unreadable, not a regular file, or
    over 1 MiB: no more than one byte past the limit is read). A FIFO, socket or device is
    never opened (stat first), and the open itself cannot block (O_NONBLOCK, then fstat: the
    name may have been swapped in between)."""
    got = _read_file(path, rel, issues)
    return None if got is None else got[0]


# What says that a file is the one read before: (device, inode, size, mtime, ctime), the last
# two in nanoseconds. The ctime changes on every write, rename over the name or chmod, and
# cannot be set back by a program (the mtime can: touch -d, cp -p, tar, git keep old ones).
FileStat = tuple[int, int, int, int, int]


def file_stat(st: os.stat_result) -> FileStat:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read_file(path: str | Path, rel: str, issues: list[Issue]) -> tuple[bytes, FileStat] | None:
    """read_capped, and the stat of the file that was read (of the open file itself)."""
    try:
        problem = _special(os.stat(path).st_mode)
        if problem is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fd)
                problem = _special(st.st_mode)
                data = fh.read(MAX_FILE_BYTES + 1) if problem is None else b""
    except OSError as err:
        issues.append(Issue(rel, 0, f"cannot read: {err.strerror or err}"))
        return None
    if problem is not None:
        issues.append(Issue(rel, 0, problem))
        return None
    if len(data) > MAX_FILE_BYTES:
        issues.append(Issue(rel, 1, f"file is larger than {MAX_FILE_BYTES // 1024} KiB"))
        return None
    return data, file_stat(st)


@dataclass(frozen=True)
class _Parsed:
    """One file's parse: its postbacks and the line of goals_enabled, or its issues."""

    issues: tuple[Issue, ...] = ()
    rule_file: RuleFile | None = None
    goals_line: int = 0
    lines: tuple[int, ...] = ()


# A stat is trusted only for a file last changed this long before it was read: a write within
# the time stamps' granularity (a clock tick of a few ms on ext4, 1-2 s on some file systems)
# after the read could leave size, mtime and ctime as they were (git's "racily clean" case).
RACY_NS = 3_000_000_000


class ParseCache:
    """Parsed files by path and content, kept between reloads: a reload parses only the files
    that changed (the models are immutable, so the unchanged ones are reused as they are).

    It also remembers, in memory only, the stat of each file when it was read (FileStat): a
    reload whose every file still has the stat it had when the last set was built from it, in
    the same listing, takes that set without reading a file (:meth:`unchanged`). The content
    hash stays the truth: any other stat, and the file is read and hashed again. A start never
    trusts a stat (they are not kept on disk): it reads and hashes every file."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[bytes, _Parsed]] = {}
        self._pool = Pool()  # equal parts of postbacks share one object (daemon.sharing)
        self._last: tuple[tuple[tuple[str, bytes], ...], RuleSet] | None = None
        self._stats: dict[str, tuple[FileStat, bytes]] = {}  # path -> (stat, content hash)
        self._root: Path | None = None
        # The LoadedPostbacks made from each file's parse: a reload that builds a new set
        # makes new ones for the files that changed only (fewer objects made and freed).
        self._loaded: dict[str, tuple[_Parsed, tuple[LoadedPostback, ...]]] = {}

    def use_root(self, root: Path) -> None:
        """The (resolved) rules folder of this load: another one forgets every stat."""
        if root != self._root:
            self._stats.clear()
            self._root = root

    def parse(self, rel: str, data: bytes) -> _Parsed:
        digest = hashlib.sha256(data).digest()
        hit = self._files.get(rel)
        if hit is not None and hit[0] == digest:
            return hit[1]
        with _collector_running():  # YAML may take minutes: no pause for it
            parsed = _parse_file(rel, data)
            if parsed.rule_file is not None:
                share_parts(parsed.rule_file, self._pool)
        self._files[rel] = (digest, parsed)
        return parsed

    def keep_only(self, rels: Iterable[str]) -> None:
        keep = set(rels)
        for rel in [r for r in self._files if r not in keep]:
            del self._files[rel]
        for rel in [r for r in self._stats if r not in keep]:
            del self._stats[rel]
        for rel in [r for r in self._loaded if r not in keep]:
            del self._loaded[rel]

    def loaded_of(self, rel: str, parsed: _Parsed) -> tuple[LoadedPostback, ...]:
        """The postbacks of one parsed file as the set holds them (the same objects as long as
        the file's parse is the same)."""
        hit = self._loaded.get(rel)
        if hit is not None and hit[0] is parsed:
            return hit[1]
        made = _postbacks_of(rel, parsed)
        self._loaded[rel] = (parsed, made)
        return made

    def record_stats(self, stats: Mapping[str, FileStat], started_ns: int) -> None:
        """The stat of each file as it was read (after parse: its content hash is known).
        A file changed less than RACY_NS before `started_ns` (taken before any read) is not
        trusted: it is read again next time, until it has been quiet for that long."""
        limit = started_ns - RACY_NS
        for rel, stat in stats.items():
            hit = self._files.get(rel)
            if hit is not None and max(stat[3], stat[4]) < limit:
                self._stats[rel] = (stat, hit[0])
            else:
                self._stats.pop(rel, None)

    def unchanged(self, found: Iterable[tuple[str, str]]) -> RuleSet | None:
        """The last set, if `found` (relative path, path) are exactly the files it was built
        from and each still has the stat recorded when its content (hash) was read; else None
        (the caller reads and hashes every file)."""
        last = self._last
        if last is None:
            return None
        fingerprint, rules = last
        files = list(found)
        if len(files) != len(fingerprint):
            return None
        for (rel, path), (want_rel, want_digest) in zip(sorted(files), fingerprint, strict=True):
            known = self._stats.get(rel)
            if rel != want_rel or known is None or known[1] != want_digest:
                return None
            try:
                st = os.stat(path)  # a symlink: its target's (a new target is another inode)
            except OSError:
                return None
            if file_stat(st) != known[0]:
                return None
        return rules

    def fingerprint(self, rels: Iterable[str]) -> tuple[tuple[str, bytes], ...]:
        """The (path, content hash) of every file of a load (after parse of each)."""
        return tuple((rel, self._files[rel][0]) for rel in sorted(rels))

    def remember(self, fingerprint: tuple[tuple[str, bytes], ...], rules: RuleSet) -> None:
        """The rule set built from exactly these files (a set without issues)."""
        self._last = (fingerprint, rules)

    def last_result(self, fingerprint: tuple[tuple[str, bytes], ...]) -> RuleSet | None:
        last = self._last
        return last[1] if last is not None and last[0] == fingerprint else None


def _parse_file(rel: str, data: bytes) -> _Parsed:
    try:
        raw = load_yaml(data)
    except YamlError as err:
        return _Parsed((Issue(rel, err.line, err.message, postback_at_line(data, err.line)),))
    if raw is None:
        return _Parsed()  # an empty file describes nothing
    if not isinstance(raw, YMap):
        return _Parsed((Issue(rel, getattr(raw, "line", 1), "a rule file must be a mapping"),))
    try:
        rule_file = RuleFile.model_validate(raw)
    except ValidationError as err:
        return _Parsed(tuple(pydantic_issues(rel, raw, err, _postback_id)))
    postbacks = raw.get("postbacks")
    lines = tuple(postbacks.lines) if isinstance(postbacks, YList) else ()
    return _Parsed((), rule_file, raw.lines.get("goals_enabled", raw.line), lines)


_ITEM_ID = re.compile(rb"^(\s*)-\s+id:\s*[\"']?(\d{1,12})[\"']?\s*(?:#.*)?$")


def postback_at_line(data: bytes, line: int) -> int | None:
    """The id of the postback whose list item holds `line`, read from the text (for errors the
    YAML parser raises, when there is no structure to ask): the last `- id: N` at or above it,
    unless a line indented no deeper than that item comes between."""
    found: int | None = None
    indent = -1
    for text in data.splitlines()[: max(line, 0)]:
        match = _ITEM_ID.match(text)
        if match:
            found, indent = int(match.group(2)), len(match.group(1))
        elif text.strip() and not text.lstrip().startswith(b"#") and _indent(text) <= indent:
            found = None
    return found


def _indent(text: bytes) -> int:
    return len(text) - len(text.lstrip())


def _postbacks_of(rel: str, parsed: _Parsed) -> tuple[LoadedPostback, ...]:
    """The postbacks of one parsed file, each with its offer, goals switch, file and line."""
    rule_file = parsed.rule_file
    if rule_file is None:
        return ()
    offer, goals = rule_file.offer, rule_file.goals_enabled
    return tuple(
        LoadedPostback(pb, offer, goals, rel, parsed.lines[i])
        for i, pb in enumerate(rule_file.postbacks)
    )


def _load_file(
    rel: str,
    parsed: _Parsed,
    issues: list[Issue],
    offer_goals: dict[str, tuple[bool, str, int]],
    cache: ParseCache,
) -> tuple[LoadedPostback, ...]:
    issues.extend(parsed.issues)
    rule_file = parsed.rule_file
    if rule_file is None:
        return ()
    goals = (rule_file.goals_enabled, rel, parsed.goals_line)
    first = offer_goals.setdefault(rule_file.offer, goals)
    if first[0] != goals[0]:
        issues.append(
            Issue(
                rel,
                goals[2],
                f"offer {rule_file.offer}: goals_enabled is "
                f"{str(goals[0]).lower()} here but {str(first[0]).lower()} in {first[1]}",
            )
        )
    return cache.loaded_of(rel, parsed)


def _postback_id(raw: Any, loc: tuple[Any, ...]) -> int | None:
    if len(loc) >= 2 and loc[0] == "postbacks" and isinstance(loc[1], int):
        items = raw.get("postbacks")
        if isinstance(items, list) and loc[1] < len(items) and isinstance(items[loc[1]], dict):
            pid = items[loc[1]].get("id")
            if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
                return pid
    return None


def pydantic_issues(
    rel: str,
    raw: Any,
    err: ValidationError,
    postback_id: Callable[[Any, tuple[Any, ...]], int | None] = lambda raw, loc: None,
) -> Iterator[Issue]:
    """One Issue per pydantic error, with the line of the offending key and a message for ops."""
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        yield Issue(rel, line_of(raw, loc), describe_error(e, loc), postback_id(raw, loc))


def describe_error(e: Mapping[str, Any], loc: tuple[Any, ...]) -> str:
    kind, ctx = e["type"], e.get("ctx") or {}
    names = [str(p) for p in loc if not isinstance(p, int)]
    if names[:1] == ["postbacks"]:
        names = names[1:]
    if kind == "union_tag_invalid":
        return f"unknown action type {ctx.get('tag')!r} (known: {', '.join(sorted(BUILDERS))})"
    if kind == "union_tag_not_found":
        return f"action needs a type (known: {', '.join(sorted(BUILDERS))})"
    if names and names[0] == "action" and len(names) > 1 and names[1] in BUILDERS:
        del names[1]  # the union's tag is not a key the user wrote
    where = ".".join(names)
    if kind == "extra_forbidden":
        return f"unknown key {where!r}"
    if kind == "missing":
        return f"missing required key {where!r}"
    if kind in ("enum", "literal_error"):
        expected = str(ctx.get("expected", "")).replace("'", "")
        return f"{where}: must be {expected}, not {e.get('input')!r}"
    message = str(e["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"{where}: {message}" if where else message


def _check_ids(loaded: list[LoadedPostback], issues: list[Issue]) -> dict[int, LoadedPostback]:
    by_id: dict[int, LoadedPostback] = {}
    for lp in loaded:
        other = by_id.get(lp.id)
        if other is not None:
            issues.append(
                Issue(lp.file, lp.line, f"duplicate id (also at {other.file}:{other.line})", lp.id)
            )
            continue
        by_id[lp.id] = lp
    return by_id


def templates_in(value: Any) -> Iterator[Template]:
    """Every Template inside a settings model (fields, dicts, lists)."""
    if isinstance(value, Template):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from templates_in(getattr(value, name))
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from templates_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from templates_in(item)


def _secrets_of(
    postback: Postback, seen: dict[int, frozenset[str]] | None = None
) -> frozenset[str]:
    """The secrets the postback's action names; `seen` remembers them by action object."""
    action = postback.action
    found = seen.get(id(action)) if seen is not None else None
    if found is None:
        found = frozenset(name for t in templates_in(action) for name in t.secrets)
        if seen is not None:
            seen[id(action)] = found
    return found


def _build(
    by_id: dict[int, LoadedPostback],
    files: tuple[str, ...],
    digest: str,
    git_root: Path | None,
    secrets: frozenset[str],
) -> RuleSet:
    postbacks, offers, active = _index(by_id[pid] for pid in sorted(by_id))
    commit, dirty = work_tree_state(git_root) if git_root else (None, False)
    return RuleSet(
        postbacks=postbacks,
        offers=offers,
        active=active,
        version=RulesVersion(digest, commit, dirty),
        files=files,
        secrets=secrets,
    )


_Index = tuple[
    dict[int, LoadedPostback],
    dict[str, tuple[LoadedPostback, ...]],
    dict[tuple[str, Trigger], tuple[LoadedPostback, ...]],
]


def _index(in_id_order: Iterable[LoadedPostback]) -> _Index:
    """The set's mappings: postbacks by id, every postback of an offer, the matching index."""
    postbacks: dict[int, LoadedPostback] = {}
    offers: dict[str, list[LoadedPostback]] = {}
    active: dict[tuple[str, Trigger], list[LoadedPostback]] = {}
    for lp in in_id_order:
        postbacks[lp.postback.id] = lp
        offers.setdefault(lp.offer, []).append(lp)
        if lp.postback.active:
            active.setdefault((lp.offer, lp.postback.trigger), []).append(lp)
    return (
        postbacks,
        {k: tuple(v) for k, v in offers.items()},
        {k: tuple(v) for k, v in active.items()},
    )


def rebuild_set(
    files: Mapping[str, tuple[bytes, _Parsed]],
    fingerprint: tuple[tuple[str, bytes], ...],
    version: RulesVersion,
    secrets: frozenset[str],
    loaded_at: datetime,
) -> RuleSet | None:
    """The set a load without issues built from exactly the files of `fingerprint`, made again
    from their parses (the parsed-rules cache keeps these, not a second copy of the set: see
    daemon.rulecache); None when a file of it is not in `files` as it was."""
    loaded: list[LoadedPostback] = []
    for rel, digest in fingerprint:
        hit = files.get(rel)
        if hit is None or hit[0] != digest or hit[1].issues:
            return None
        loaded.extend(_postbacks_of(rel, hit[1]))
    loaded.sort(key=lambda lp: lp.postback.id)
    postbacks, offers, active = _index(loaded)
    if len(postbacks) != len(loaded):
        return None  # a duplicate id: not a set a load built
    files_of = tuple(rel for rel, _ in fingerprint)
    return RuleSet(postbacks, offers, active, version, files_of, secrets, loaded_at)
