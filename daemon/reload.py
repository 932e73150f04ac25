"""Hot reload (SPEC 10.1): one reload at a time, parsed off the event loop, swapped atomically.

Triggers: file changes under rules_dir and webhooks_dir (watchfiles, after the tree has been
quiet for a moment and no git operation holds `.git/index.lock`), a swapped `rules.d` symlink,
SIGHUP, and `POST /api/v1/reload` — all through :meth:`Reloader.reload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from daemon.actions import build_action
from daemon.actions.base import Action, Resources
from daemon.affiliates.policy import DEFAULT_POLICY, LoadedPolicy, file_id_issues, load_policy
from daemon.errors import Issue, RulesError
from daemon.loader import ParseCache, RuleSet, is_ignored_name, load_rules
from daemon.log import get_logger
from daemon.rulecache import default_parse_cache
from daemon.sources import GENERIC, GENERIC_SOURCE, Source

log = get_logger("postbackd.reload")

QUIET_MS = 300  # the tree must be this quiet before a reload
GIT_LOCK_WAIT = 30.0
SYMLINK_POLL = 1.0


@dataclass(frozen=True)
class Runtime:
    """Everything a request or an attempt needs from the rules, swapped as one object."""

    rules: RuleSet
    actions: Mapping[int, Action]
    sources: Mapping[str, Source] = field(default_factory=lambda: {GENERIC: GENERIC_SOURCE})
    policy: LoadedPolicy = DEFAULT_POLICY  # rules.d/affiliates.yaml (issue 15)


class Overlay(Protocol):
    """What runs over the rule files: the store postbacks (daemon.affiliates.index)."""

    def compose(self, file_runtime: Runtime) -> Runtime: ...


SourceLoader = Callable[[], Mapping[str, Source]]


def build_runtime(
    rules: RuleSet,
    sources: Mapping[str, Source],
    resources: Resources,
    previous: Runtime | None = None,
    policy: LoadedPolicy = DEFAULT_POLICY,
) -> Runtime:
    """The runtime of a rule set; a postback whose model is the very one of `previous` (its file
    did not change, see loader.ParseCache) keeps its action object."""
    if previous is not None and rules.postbacks is previous.rules.postbacks:
        # The very set of postbacks (a reload of unchanged files): the very actions.
        return Runtime(rules, previous.actions, {GENERIC: GENERIC_SOURCE, **sources}, policy)
    before = previous.rules.postbacks if previous else {}
    actions: dict[int, Action] = {}
    # Postbacks that share one action model (daemon.sharing) share one action object.
    built: dict[int, Action] = {}
    for pid, lp in rules.postbacks.items():
        old = before.get(pid)
        if old is not None and old.postback is lp.postback and previous is not None:
            actions[pid] = previous.actions[pid]
        else:
            settings = lp.postback.action
            action = built.get(id(settings))
            if action is None:
                action = built[id(settings)] = build_action(settings, resources)
            actions[pid] = action
    return Runtime(rules, actions, {GENERIC: GENERIC_SOURCE, **sources}, policy)


@dataclass
class ReloadStatus:
    ok: bool = True
    loaded_at: datetime | None = None
    last_attempt_at: datetime | None = None
    last_error: list[str] = field(default_factory=list)
    reloads_ok: int = 0
    reloads_failed: int = 0


def settle_memory(replaced: bool = True) -> None:
    """After a load: collect once, then move everything alive (the rule set above all) out of
    the collector's sight. With 100,000 postbacks a full collection otherwise stops the event
    loop for about 1.5 s every 10-20k conversions; frozen, it takes milliseconds. Unfrozen
    first, so the set a reload replaced is freed; when the reload kept the same postbacks (an
    unchanged tree) only what is new since the last freeze is collected and frozen."""
    if replaced:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


class Reloader:
    def __init__(
        self,
        rules_dir: Path,
        resources: Resources,
        *,
        missing_secrets: Callable[[Iterable[str]], list[str]] | None = None,
        load_sources: SourceLoader | None = None,
        webhooks_dir: Path | None = None,
        on_swap: Callable[[Runtime, Runtime | None], Any] | None = None,
        notifier: Any = None,
    ) -> None:
        self.rules_dir = rules_dir
        self.webhooks_dir = webhooks_dir
        self.resources = resources
        self._missing_secrets = missing_secrets
        self._load_sources = load_sources or dict
        self._on_swap = on_swap
        self._notifier = notifier
        self._lock = asyncio.Lock()
        self._runtime: Runtime | None = None
        self._file_runtime: Runtime | None = None  # the rule files alone (no store postbacks)
        self.overlay: Overlay | None = None
        # Used by one reload at a time (the lock); on disk under `postbackd run` (rulecache).
        self._parse_cache: ParseCache = default_parse_cache()
        self.status = ReloadStatus()

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "rules not loaded yet"
        return self._runtime

    def _load(self) -> Runtime:
        """Rules and sources as one set: both load, or RulesError lists the problems of both."""
        issues: list[Issue] = []
        rules: RuleSet | None = None
        sources: Mapping[str, Source] | None = None
        try:
            rules = load_rules(
                self.rules_dir, missing_secrets=self._missing_secrets, cache=self._parse_cache
            )
        except RulesError as err:
            issues.extend(err.issues)
        policy = DEFAULT_POLICY
        try:
            policy = load_policy(self.rules_dir)
        except RulesError as err:
            issues.extend(err.issues)
        previous = self._file_runtime
        if rules is not None and not (previous and rules.postbacks is previous.rules.postbacks):
            # (the very postbacks of the running set passed this check when it was loaded)
            issues.extend(file_id_issues(rules.postbacks.values()))
        try:
            sources = self._load_sources()
        except RulesError as err:
            issues.extend(err.issues)
        if rules is None or sources is None or issues:
            raise RulesError(issues)
        return build_runtime(rules, sources, self.resources, previous=previous, policy=policy)

    def _composed(self, file_runtime: Runtime) -> Runtime:
        return self.overlay.compose(file_runtime) if self.overlay else file_runtime

    def recompose(self) -> Runtime:
        """Swap in the rule files with the overlay as it is now (a store postback changed)."""
        assert self._file_runtime is not None, "rules not loaded yet"
        self._runtime = self._composed(self._file_runtime)
        return self._runtime

    async def load_initial(self) -> Runtime:
        """The first load: a failure here stops the daemon from starting (RulesError)."""
        self._file_runtime = await asyncio.to_thread(self._load)
        self._runtime = runtime = self._composed(self._file_runtime)
        settle_memory()
        self.status.loaded_at = self.status.last_attempt_at = datetime.now(UTC)
        log.info(
            "rules_loaded",
            rules_version=str(runtime.rules.version),
            files=len(runtime.rules.files),
            postbacks=len(runtime.rules.postbacks),
        )
        return runtime

    async def reload(self, reason: str) -> bool:
        """Load, validate and swap; on failure keep the running set and record why."""
        async with self._lock:
            if self._notifier is not None:
                self._notifier.reloading()
            try:
                return await self._reload(reason)
            finally:
                if self._notifier is not None:
                    self._notifier.ready()

    async def _reload(self, reason: str) -> bool:
        self.status.last_attempt_at = datetime.now(UTC)
        try:
            runtime = await asyncio.to_thread(self._load)
        except RulesError as err:
            self.status.ok = False
            self.status.reloads_failed += 1
            self.status.last_error = [str(i) for i in err.issues]
            log.error(
                "rules_reload_failed",
                reason=reason,
                errors=self.status.last_error,
                rules_version=str(self.runtime.rules.version),
            )
            return False
        before = self._file_runtime
        kept = before is not None and runtime.rules.postbacks is before.rules.postbacks
        self._file_runtime = runtime
        old = self._runtime
        self._runtime = runtime = self._composed(runtime)
        self.status.ok = True
        self.status.reloads_ok += 1
        self.status.loaded_at = self.status.last_attempt_at
        self.status.last_error = []
        log.info(
            "rules_reloaded",
            reason=reason,
            rules_version=str(runtime.rules.version),
            files=len(runtime.rules.files),
            postbacks=len(runtime.rules.postbacks),
        )
        if self._on_swap is not None:
            result = self._on_swap(runtime, old)
            if asyncio.iscoroutine(result):
                await result
        del old
        settle_memory(replaced=not kept)
        return True

    async def watch(self, beat: Callable[[], None] | None = None) -> None:
        """Reload on changes until cancelled; follows a `rules.d` symlink that is swapped.
        `beat()` when a watch starts and after each reload (daemon.supervise)."""
        import watchfiles

        while True:
            target = self.rules_dir.resolve()
            if not target.is_dir():  # fail here, not in the watcher thread, and say what
                raise FileNotFoundError(f"rules_dir {target} is not a directory")
            if beat is not None:
                beat()
            paths = [str(target)] + (
                [str(self.webhooks_dir)] if self.webhooks_dir and self.webhooks_dir.is_dir() else []
            )
            stop = asyncio.Event()
            identity = _identity(target)
            poller = asyncio.create_task(self._watch_symlink(target, identity, stop))
            try:
                async for _ in watchfiles.awatch(
                    *paths,
                    watch_filter=_relevant,
                    step=QUIET_MS,
                    stop_event=stop,
                    recursive=True,
                    ignore_permission_denied=True,
                ):
                    await self._wait_for_git()
                    await self.reload("files changed")
                    if beat is not None:
                        beat()
            finally:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            swapped = self.rules_dir.resolve()
            if swapped != target or _identity(swapped) != identity:
                if not swapped.is_dir():  # gone: the supervisor retries until it is back
                    raise FileNotFoundError(f"rules_dir {swapped} is not a directory")
                await self.reload("rules directory swapped")

    async def _watch_symlink(
        self, target: Path, identity: tuple[int, int] | None, stop: asyncio.Event
    ) -> None:
        """Ends the watch when `rules_dir` points elsewhere (a swapped symlink) or its folder
        was replaced or removed (an inotify watch would follow the old folder)."""

        def unchanged() -> bool:
            return self.rules_dir.resolve() == target and _identity(target) == identity

        try:
            while unchanged():  # noqa: ASYNC110 - a swap sends no event
                await asyncio.sleep(SYMLINK_POLL)
        finally:  # a failure here ends the watch too; `watch` re-raises it to its supervisor
            stop.set()

    async def _wait_for_git(self) -> None:
        """A git checkout rewrites files one by one; wait until it lets go of its index lock."""
        lock = _git_index_lock(self.rules_dir.resolve())
        if lock is None:
            return
        waited = 0.0
        while lock.exists() and waited < GIT_LOCK_WAIT:
            await asyncio.sleep(0.1)
            waited += 0.1
        await asyncio.sleep(QUIET_MS / 1000)


def _identity(folder: Path) -> tuple[int, int] | None:
    """The folder's (device, inode), or None when it is not there."""
    try:
        st = folder.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _git_index_lock(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        git = folder / ".git"
        if git.is_dir():
            return git / "index.lock"
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            text = git.read_text("utf-8", "replace").strip()
            if text.startswith("gitdir:"):
                return (folder / text.removeprefix("gitdir:").strip()) / "index.lock"
    return None


def _relevant(change: Any, path: str) -> bool:
    name = Path(path).name
    return not is_ignored_name(name) and "/.git/" not in path and not path.endswith("/.git")
