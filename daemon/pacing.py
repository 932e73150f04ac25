"""Pacing new arrivals to delivery when the event loop is the bottleneck (issue 17).

One process serves the webhooks and sends the deliveries on one event loop. When that loop is
saturated, the two share it by how much of each is ready: 64 trackers' connections against a
destination's 8 slots, so ingest took most of it, and a node that accepts conversions faster
than it delivers them grows a backlog without bound (delivered/accepted 0.75 at saturation on
the benchmark's 2 cores, docs/benchmarks.md). Pacing gives delivery its share back by making
new arrivals wait. It starts when an arrival finds both:

- the loop's thread busy at least BUSY_SHARE of the last sample (its CPU time over the wall
  time, sampled every SAMPLE seconds): CPU is what is short, not a destination's answers;
- and the dispatcher behind (Dispatcher.behind: its last claim came back full, so more is due
  now than one claim takes). A slow or down destination does not make it so: its deliveries
  are left out of the claims once its share is in progress (daemon.dispatcher).

While pacing, an arrival (after its checks, before its transaction: a refused request is
answered at once) waits for its turn: a delivery attempt's end here gives one turn; an arrival
that planned no delivery passes its turn on, one that planned n owes n - 1 more. So, paced,
accepted arrivals follow delivered ones. An arrival does not wait when no attempt is in
progress (nothing would give it a turn), and never longer than MAX_HOLD: a tracker is answered
later, never refused. Pacing ends at a sample in which the loop was not saturated or no arrival
found the dispatcher behind, and the waiting arrivals go. `ingest_paced` (info) is logged when
it starts and `ingest_unpaced` (count: the arrivals that waited) once it has not run for QUIET
seconds, or when the daemon stops (at saturation it stops and starts again about once a
second: one pair of lines per episode, not per run); postbackd_ingest_paced_total counts the
arrivals that waited.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.log import get_logger

log = get_logger("postbackd.pacing")

SAMPLE = 0.1  # seconds between two readings of the loop thread's CPU time
BUSY_SHARE = 0.9  # of the wall time: the loop is saturated at or above it
MAX_HOLD = 0.5  # the longest an arrival waits (seconds)
QUIET = 10.0  # seconds without pacing before ingest_unpaced is logged (and the next paced)


class Pacing:
    """Holds new arrivals while the loop is saturated and the dispatcher behind (the module's
    docstring). `run()` samples the loop on its own thread; `admit()` is awaited by an arrival,
    `settle(n)` told once it planned n deliveries; `credit()` when a delivery attempt ends."""

    def __init__(
        self,
        behind: Callable[[], bool],
        attempts: Callable[[], int],
        *,
        sample: float = SAMPLE,
        busy_share: float = BUSY_SHARE,
        max_hold: float = MAX_HOLD,
        quiet: float = QUIET,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.thread_time,
    ) -> None:
        self._behind = behind
        self._attempts = attempts
        self._sample = sample
        self._busy_share = busy_share
        self.max_hold = max_hold
        self._quiet = quiet
        self._logged = False  # ingest_paced logged, ingest_unpaced not yet
        self._last_active = 0.0  # the clock at the last sample taken while pacing
        self._clock = clock
        self._cpu = cpu
        self.saturated = False
        self.active = False  # pacing now (saturated and behind at the last admit)
        self._turns = 0  # arrivals that may go now (negative: attempts still owed)
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.held = 0  # arrivals that waited, in all
        self.timed_out = 0  # of them, let through by MAX_HOLD
        self._held_in_run = 0
        self._behind_seen = False  # an arrival found the dispatcher behind since the last sample

    @property
    def waiting(self) -> int:
        """Arrivals waiting for their turn now."""
        return len(self._waiting)

    async def run(self) -> None:
        """Sample the loop's thread until cancelled (on the loop being paced). Cancelled (the
        daemon stops), an episode whose end was not logged yet is: pacing ends with it."""
        wall, cpu = self._clock(), self._cpu()
        try:
            while True:
                await asyncio.sleep(self._sample)
                now_wall, now_cpu = self._clock(), self._cpu()
                elapsed = now_wall - wall
                if elapsed > 0:
                    self.observe((now_cpu - cpu) / elapsed)
                wall, cpu = now_wall, now_cpu
        finally:
            self.saturated = False
            if self.active:
                self._end()
            self._log_unpaced()

    def observe(self, busy: float) -> None:
        """One sample: the loop's thread was busy this share of the wall time. Pacing ends at
        a sample that was not saturated, or in which no arrival found the dispatcher behind."""
        self.saturated = busy >= self._busy_share
        if self.active and not (self.saturated and self._behind_seen):
            self._end()
        self._behind_seen = False
        if self.active:
            self._last_active = self._clock()
        elif self._clock() - self._last_active >= self._quiet:
            self._log_unpaced()

    async def admit(self) -> bool:
        """Wait for this arrival's turn while pacing; whether it took one (then `settle` it
        once its deliveries are planned)."""
        if not self.saturated:
            return False
        if self._behind():
            self._behind_seen = True
            if not self.active:
                self.active = True
                self._turns = 0
                if not self._logged:  # the first run of pacing after QUIET seconds without
                    self._logged = True
                    self._held_in_run = 0
                    log.info("ingest_paced")
        elif not self.active:
            return False
        if not self._attempts():
            self._release()  # no attempt in progress whose end would give it a turn
            return False
        if self._turns > 0 and not self._waiting:
            self._turns -= 1
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self.held += 1
        self._held_in_run += 1
        timed_out = False
        try:
            async with asyncio.timeout(self.max_hold):
                await asyncio.shield(future)
        except TimeoutError:
            timed_out = True
        finally:
            if not future.done():  # not let through: timed out, or the request was cancelled
                future.cancel()
                self._waiting.remove(future)
        if timed_out:
            self.timed_out += 1
            self._turns -= 1  # its turn, owed by the next attempt
        return True

    def settle(self, deliveries: int) -> None:
        """An arrival that took a turn planned `deliveries` (0 if it did not commit): it owes
        that many turns, less its own."""
        if self.active:
            self._give(1 - deliveries)

    def credit(self) -> None:
        """A delivery attempt ended here: one more arrival may go."""
        if self.active:
            self._give(1)

    def _give(self, turns: int) -> None:
        self._turns += turns
        while self._turns > 0 and self._waiting:
            self._turns -= 1
            self._waiting.popleft().set_result(None)

    def _log_unpaced(self) -> None:
        """The end of an episode whose start was logged, once."""
        if self._logged:
            self._logged = False
            log.info("ingest_unpaced", count=self._held_in_run)

    def _release(self) -> None:
        self._turns = 0
        while self._waiting:
            self._waiting.popleft().set_result(None)

    def _end(self) -> None:
        self.active = False
        self._last_active = self._clock()
        self._release()


class PacingCollector(Collector):
    """The arrivals that waited for their turn, at scrape time, by what let them go."""

    def __init__(self, pacing: Pacing) -> None:
        self._p = pacing

    def collect(self) -> Iterable[Metric]:
        paced = CounterMetricFamily(
            "postbackd_ingest_paced",
            "Arrivals that waited for delivery to catch up before their transaction, by what "
            "let them go: a delivery attempt's end or the end of pacing (turn), or the longest "
            f"wait, {self._p.max_hold:g} s (max_hold).",
            labels=["released_by"],
        )
        paced.add_metric(["turn"], self._p.held - self._p.timed_out)
        paced.add_metric(["max_hold"], self._p.timed_out)
        yield paced
