"""The parsed-rules cache on disk: a start whose rule files have not changed skips YAML parsing
and model validation (100,000 postbacks: from about 30 s to a few seconds).

It is the loader's ParseCache (parsed files by path and content hash, and the rule set the last
load built from them), kept in ``{state_dir}/rules-cache/parsed.pickle`` after each load that
built a new set, and read back when `postbackd run` starts: when every file is the one the set
was built from, the start takes that set as it is. The cache is an optimisation only:

- **safe to lose**: without it (missing, unreadable, another version) the rules load from YAML
  as always, and the next load writes it again;
- **never trusted if damaged**: the file starts with a header naming the cache format, the
  Python version, a hash of the code of every class it holds and the SHA-256 and length of the
  payload; anything that does not match exactly is ignored (logged `rules_cache_ignored`), never
  unpickled;
- **keyed by content**: an entry is used only for a file whose path and SHA-256 are those it
  was parsed from, so a changed file is always parsed again. A start reads and hashes every
  file: the stats a reload trusts (loader.ParseCache.unchanged) are never written here.

The file is pickle: it holds the parsed models themselves (with compiled conditions and URL
templates), which is what makes loading it fast. Each file's postbacks are pickled as one flat
tuple of their field values (rules.RuleFile.__reduce__) and the last set as its fingerprint,
version and secrets only, its mappings built again from the parsed files at start
(loader.rebuild_set): pickle keeps every object it makes until the end of a load, and a state
dict per model (or a second copy of the set) left about 40 MiB of holes with 100,000 postbacks.
Like the SQLite file beside it, it must be writable by the daemon's user only; it is written
with mode 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.loader import ParseCache, RuleSet, RulesVersion, collector_paused, rebuild_set
from daemon.log import get_logger

log = get_logger("postbackd.rulecache")

FORMAT = 3  # bump when what is pickled changes in a way the code hash would not show
MAGIC = b"postbackd parsed-rules cache\n"
FILE_NAME = "parsed.pickle"
MAX_HEADER = 4096
# The code of every class a cached file holds: a change to any of them invalidates the cache.
_CODE_PACKAGES = ("daemon",)


def code_hash() -> str:
    """SHA-256 over the source of the daemon package (every .py file, sorted by path)."""
    digest = hashlib.sha256()
    for package in _CODE_PACKAGES:
        root = Path(sys.modules[package].__file__ or "").parent
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _header(payload: bytes, code: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "python": sys.version.split()[0],
        "code": code,
        "length": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }


@dataclass(frozen=True)
class Snapshot:
    """What the file holds: the parsed files by path, and the rule set the last successful load
    built from exactly the files of `last[0]` (path, content hash), if any."""

    files: dict[str, Any]
    last: tuple[Any, Any] | None = None


def encode(snapshot: Snapshot, code: str) -> bytes:
    return b"".join(_encoded(snapshot, code))


def _encoded(snapshot: Snapshot, code: str) -> tuple[bytes, bytes]:
    """The file's header (magic and JSON line) and its payload, written one after the other.

    The last set is kept as its fingerprint, version, secrets and load time only: its
    postbacks are those of the parsed files, and decode() builds its mappings again
    (loader.rebuild_set). Pickled as well, they were a second copy of every postback, and the
    objects pickle builds and keeps to the end of a load were holes in memory after it."""
    last = snapshot.last
    if last is not None:
        fingerprint, rules = last
        last = (fingerprint, (rules.version, rules.secrets, rules.loaded_at))
    data = {"files": snapshot.files, "last": last}
    payload = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
    return MAGIC + json.dumps(_header(payload, code)).encode() + b"\n", payload


def decode(blob: bytes, code: str) -> tuple[Snapshot | None, str]:
    """The cached snapshot, or None and why not. Unpickles only a payload whose header matches
    this code and whose length and SHA-256 are right."""
    if not blob.startswith(MAGIC):
        return None, "not a rules cache"
    end = blob.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if end == -1:
        return None, "damaged header"
    try:
        header = json.loads(blob[len(MAGIC) : end])
    except ValueError:
        return None, "damaged header"
    payload = memoryview(blob)[end + 1 :]  # not a copy (12 MiB with 100,000 postbacks)
    if not isinstance(header, dict):
        return None, "damaged header"
    if header.get("format") != FORMAT or header.get("python") != sys.version.split()[0]:
        return None, "written by another version"
    if header.get("code") != code:
        return None, "written by another version"
    if header.get("length") != len(payload):
        return None, "truncated"
    if header.get("sha256") != hashlib.sha256(payload).hexdigest():
        return None, "checksum mismatch"
    try:
        data = pickle.loads(payload)  # noqa: S301 (our own file, checked above)
    except Exception as err:  # a payload that hashes right but will not load: still ignored
        return None, f"unreadable ({err.__class__.__name__})"
    files = data.get("files") if isinstance(data, dict) else None
    last = data.get("last") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, tuple) and len(v) == 2 for k, v in files.items()
    ):
        return None, "unexpected contents"
    if last is None:
        return Snapshot(files), ""
    if not (
        isinstance(last, tuple)
        and len(last) == 2
        and isinstance(last[0], tuple)
        and isinstance(last[1], tuple)
        and len(last[1]) == 3
        and isinstance(last[1][0], RulesVersion)
        and isinstance(last[1][1], frozenset)
        and isinstance(last[1][2], datetime)
    ):
        return None, "unexpected contents"
    fingerprint, (version, secrets, loaded_at) = last
    rules = rebuild_set(files, fingerprint, version, secrets, loaded_at)
    return Snapshot(files, None if rules is None else (fingerprint, rules)), ""


class PersistentParseCache(ParseCache):
    """A ParseCache read from `directory` (at the first parse) and written back, in the
    background, after each load that built a new set."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.path = directory / FILE_NAME
        self._code = code_hash()
        self._writer: threading.Thread | None = None
        self._read_done = False
        self.loaded = 0  # files read from disk at start

    def _read(self) -> None:
        """Read the file once, at the first parse (in the loader's thread, off the loop)."""
        if self._read_done:
            return
        self._read_done = True
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as err:
            log.warning("rules_cache_ignored", path=str(self.path), reason=err.strerror)
            return
        with collector_paused():  # (see there: half the CPU of this read)
            snapshot, reason = decode(blob, self._code)
        del blob
        if snapshot is None:
            log.warning("rules_cache_ignored", path=str(self.path), reason=reason)
            return
        self._files.update(snapshot.files)
        self._last = snapshot.last
        self.loaded = len(snapshot.files)

    def parse(self, rel: str, data: bytes) -> Any:
        self._read()
        return super().parse(rel, data)

    def keep_only(self, rels: Iterable[str]) -> None:
        self._read()
        super().keep_only(rels)

    def remember(self, fingerprint: tuple[tuple[str, bytes], ...], rules: RuleSet) -> None:
        """A load built a set: write the files and that set (a start with the same files then
        builds nothing: see loader.load_rules)."""
        super().remember(fingerprint, rules)
        self._save(Snapshot(dict(self._files), (fingerprint, rules)))

    def _save(self, snapshot: Snapshot) -> None:
        """Write in a thread of its own: the models are immutable, the dict is a copy."""
        previous = self._writer
        self._writer = threading.Thread(
            target=self._write, args=(snapshot, previous), name="rules-cache", daemon=True
        )
        self._writer.start()

    def wait(self) -> None:
        """Wait for the last write (tests; a stop does not need to)."""
        if self._writer is not None:
            self._writer.join()

    def _write(self, snapshot: Snapshot, previous: threading.Thread | None) -> None:
        if previous is not None:
            previous.join()  # writes land in order
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            parts = _encoded(snapshot, self._code)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    out.write(part)
            del parts
            os.replace(tmp, self.path)
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as err:
            # Safe to lose: the next start parses the YAML.
            log.warning("rules_cache_not_written", path=str(self.path), error=str(err))
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


_configured: Path | None = None


def configure(directory: Path | None) -> None:
    """Where this process keeps its cache (`postbackd run` sets it; None: no cache)."""
    global _configured
    _configured = directory


def default_parse_cache() -> ParseCache:
    """The Reloader's cache: persistent where `configure` named a directory."""
    if _configured is None:
        return ParseCache()
    return PersistentParseCache(_configured)


def cache_dir(state_dir: Path | None, store_url: str, config_dir: Path) -> Path | None:
    """`{state_dir}/rules-cache`; state_dir defaults to the folder of an SQLite store; None
    (no cache) for PostgreSQL without a state_dir."""
    if state_dir is not None:
        base = state_dir if state_dir.is_absolute() else config_dir / state_dir
        return base / "rules-cache"
    if store_url.startswith("sqlite:///"):
        from daemon.store.factory import sqlite_path

        return sqlite_path(store_url, config_dir).parent / "rules-cache"
    return None
