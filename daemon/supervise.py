"""Supervision of the daemon's background loops: one rule for all of them.

A supervised loop never ends while the daemon runs. When its body raises, the error is logged
once (``loop_failing``, the error masked) and the body is started again after a capped
exponential backoff with jitter; the first progress after that is logged once
(``loop_recovered``). Each loop reports progress (:meth:`LoopHealth.beat`), so that readiness
and the systemd watchdog can tell a wedged loop (no progress within its interval) from a live
one. Only ``asyncio.CancelledError`` (the daemon's stop) ends a loop; a body that returns has
ended on purpose (the dispatcher, once stopped) and is no longer watched. A loop found with no
progress past its interval is logged once too (``loop_stalled``, by a monitor that looks every
second), and its next progress is its ``loop_recovered``.

The decision (how long to wait after the n-th failure in a row) is :class:`Backoff`, a value
object with one pure method; :class:`Supervisor` only applies it. One-shot tasks that are not
loops get :func:`collect` as their done callback, so that no task exception goes unretrieved.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from daemon.log import get_logger, mask_userinfo

log = get_logger("postbackd.supervise")

MONITOR_INTERVAL = 1.0  # seconds between looks for stalled loops
MAX_ERROR = 300  # characters of an error kept for logs and the admin view of /readyz


def describe(err: BaseException) -> str:
    """The error as one masked line: its type and message, never a URL's userinfo."""
    text = mask_userinfo(" ".join(str(err).split()))
    line = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return line if len(line) <= MAX_ERROR else line[: MAX_ERROR - 3] + "..."


@dataclass(frozen=True)
class Backoff:
    """How long a loop waits before it starts again after failing `failures` times in a row."""

    first: float = 0.5
    cap: float = 5.0
    factor: float = 2.0
    jitter: float = 0.2  # the share of the delay that is random, either way

    def delay(self, failures: int, spread: float) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1, 2, ...); `spread` in
        [-1, 1] picks the jitter (random in the runner, chosen in tests). Never above `cap`."""
        exponent = min(max(failures, 1) - 1, 64)
        base = min(self.cap, self.first * self.factor**exponent)
        spread = min(1.0, max(-1.0, spread))
        return max(0.0, min(self.cap, base * (1 + self.jitter * spread)))


@dataclass
class LoopHealth:
    """What one loop last did: read by /readyz, the metrics and the watchdog."""

    name: str
    interval: float | None  # progress is due at least this often; None: no such duty
    now: Callable[[], float] = time.monotonic
    failing: bool = False
    error: str | None = None  # the last error, masked (admins only)
    failures: int = 0  # in a row; 0 once the loop progresses again
    failing_since: float | None = None
    last_progress: float | None = None
    due_by: float | None = None  # no progress by then: the loop is stalled
    ended: bool = False
    stall_noted: bool = False  # loop_stalled was logged; the next beat logs the recovery

    def __post_init__(self) -> None:
        self.due_by = None if self.interval is None else self.now() + self.interval

    def beat(self, next_in: float = 0.0) -> None:
        """The loop made progress; the next progress is due within `next_in` + its interval."""
        now = self.now()
        self.last_progress = now
        self.due_by = None if self.interval is None else now + next_in + self.interval
        if self.failing or self.stall_noted:
            log.info(
                "loop_recovered",
                loop=self.name,
                failures=self.failures,
                down_s=round(now - (self.failing_since or now), 1),
            )
        self.failing, self.failures, self.failing_since = False, 0, None
        self.stall_noted = False

    def check(self) -> None:
        """Log once when the loop is found stalled (no progress within its interval)."""
        if self.stalled and not self.stall_noted and not self.failing:
            self.stall_noted = True
            now = self.now()
            self.failing_since = now
            since = None if self.last_progress is None else round(now - self.last_progress, 1)
            log.error("loop_stalled", loop=self.name, interval_s=self.interval, since_s=since)

    def failed(self, err: BaseException, retry_in: float) -> None:
        """The body raised; it starts again in `retry_in` seconds. Logged on the first failure."""
        now = self.now()
        self.failures += 1
        self.error = describe(err)
        if not self.failing:
            self.failing, self.failing_since = True, now
            log.error(
                "loop_failing", loop=self.name, error=self.error, next_in_s=round(retry_in, 2)
            )
        # Failing is not wedged: the loop is alive as long as it keeps trying on schedule.
        self.due_by = None if self.interval is None else now + retry_in + self.interval

    @property
    def stalled(self) -> bool:
        return not self.ended and self.due_by is not None and self.now() > self.due_by

    @property
    def state(self) -> str:
        """up, failing, stalled or ended."""
        if self.ended:
            return "ended"
        if self.failing:
            return "failing"
        return "stalled" if self.stalled else "up"


Body = Callable[[LoopHealth], Awaitable[None]]


@dataclass
class Supervisor:
    """Runs each loop under the rule of this module and keeps its :class:`LoopHealth`."""

    now: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    loops: dict[str, LoopHealth] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _monitor: asyncio.Task[None] | None = None

    def start(
        self, name: str, body: Body, *, interval: float | None, backoff: Backoff = Backoff()
    ) -> LoopHealth:
        """Run `body(health)` as a supervised loop; the body calls ``health.beat()``."""
        health = LoopHealth(name, interval, self.now)
        self.loops[name] = health
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._watch(), name="supervisor")
            self._monitor.add_done_callback(collect)
        task = asyncio.create_task(self._run(health, body, backoff), name=name)
        task.add_done_callback(collect)
        self._tasks.append(task)
        return health

    def every(
        self,
        name: str,
        step: Callable[[], Awaitable[object]],
        period: float,
        *,
        interval: float,
        backoff: Backoff = Backoff(),
    ) -> LoopHealth:
        """Run `step` now and then every `period` seconds; each step must end within
        `interval`."""

        async def body(health: LoopHealth) -> None:
            while True:
                await step()
                health.beat(next_in=period)
                await asyncio.sleep(period)

        return self.start(name, body, interval=interval, backoff=backoff)

    async def _run(self, health: LoopHealth, body: Body, backoff: Backoff) -> None:
        while True:
            try:
                await body(health)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                delay = backoff.delay(health.failures + 1, self.rng.uniform(-1.0, 1.0))
                health.failed(err, delay)
                await asyncio.sleep(delay)
            else:
                health.ended = True
                log.info("loop_ended", loop=health.name)
                return

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL)
            for health in list(self.loops.values()):
                health.check()

    def problems(self) -> dict[str, str]:
        """The loops that are failing or stalled, with that state."""
        return {
            name: h.state for name, h in self.loops.items() if h.state in ("failing", "stalled")
        }

    def states(self) -> dict[str, str]:
        """Every loop's state (up, failing, stalled, ended), by name."""
        return {name: h.state for name, h in self.loops.items()}

    def alive(self) -> bool:
        """No loop is stalled (failing ones retry on schedule: alive, not wedged)."""
        return not any(h.stalled for h in self.loops.values())

    async def stop(self) -> None:
        """Cancel every loop and wait for them."""
        tasks = [*self._tasks, *([self._monitor] if self._monitor else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._monitor = None


def collect(task: asyncio.Task[Any]) -> None:
    """A done callback that retrieves a task's exception and logs it (``task_failed``)."""
    if task.cancelled():
        return
    err = task.exception()
    if err is not None:
        log.error("task_failed", task=task.get_name(), error=describe(err))


def spawn(coro: Coroutine[Any, Any, Any], name: str, tasks: set[asyncio.Task[Any]]) -> None:
    """Start a one-shot task kept in `tasks` until done, its exception collected."""
    task = asyncio.create_task(coro, name=name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    task.add_done_callback(collect)
