"""A circuit breaker per destination: a pure state machine, the clock passed in.

::

    closed ──N consecutive unwell results──▶ open (pause P₁ = first_pause)
      ▲                                        │ the pause has passed: the next attempt
      │ the probe is healthy                   ▼ is the one probe
      └──────────────────────────────────── half-open ──the probe is unwell──▶ open
                                                         (pause × growth, up to max_pause)

Every admission carries the breaker's epoch; a result counts only if the breaker has not
changed state since its attempt was admitted, so the failures of attempts that were already in
flight when the breaker opened do not count again (they cannot lengthen the pause), and a late
success of such an attempt does not close it either. While open (and while the probe is out)
everything else for the destination is held: handed back to the store, not attempted.

Results are "healthy" (succeeded, or an answer about the request such as a 404: the host is
there) or "unwell" (the typed ``DeliveryError.unwell`` fact: connection refused or reset, a
timeout, 5xx, 429). The breaker never sees reason strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Verdict(StrEnum):
    SEND = "send"  # closed: attempt as usual
    PROBE = "probe"  # the one attempt that tests a destination after its pause
    HOLD = "hold"  # open, or the probe is out: hand the delivery back, no attempt


class Change(StrEnum):
    OPENED = "opened"
    PROBING = "probing"
    REOPENED = "reopened"
    CLOSED = "closed"


@dataclass(frozen=True)
class BreakerPolicy:
    threshold: int = 5  # consecutive unwell results that open the breaker
    first_pause: float = 5.0  # seconds
    growth: float = 2.0  # the pause after each failed probe, times this
    max_pause: float = 60.0

    def next_pause(self, pause: float) -> float:
        return min(self.max_pause, pause * self.growth if pause else self.first_pause)


@dataclass(frozen=True)
class Ticket:
    """What the breaker said to one attempt, and the epoch it said it in."""

    verdict: Verdict
    epoch: int


@dataclass(frozen=True)
class Event:
    """A change of state, for the log and the store (CLOSED releases the held backlog)."""

    change: Change
    pause: float = 0.0  # OPENED/REOPENED: seconds until the next probe
    failures: int = 0  # OPENED: the consecutive unwell results that opened it


class Breaker:
    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.state = BreakerState.CLOSED
        self.epoch = 0
        self.failures = 0  # consecutive unwell results while closed
        self.pause = 0.0  # the current pause (0 while closed)
        self.until = 0.0  # while open: when the probe may go
        self._send = Ticket(Verdict.SEND, 0)  # every SEND of this epoch (tickets are immutable)

    def admit(self, now: float) -> tuple[Ticket, Event | None]:
        """The verdict for one attempt that is about to start."""
        if self.state is BreakerState.CLOSED:
            send = self._send
            if send.epoch != self.epoch:
                send = self._send = Ticket(Verdict.SEND, self.epoch)
            return send, None
        if self.state is BreakerState.OPEN and now >= self.until:
            self._move(BreakerState.HALF_OPEN)
            return Ticket(Verdict.PROBE, self.epoch), Event(Change.PROBING, self.pause)
        return Ticket(Verdict.HOLD, self.epoch), None

    def record(self, ticket: Ticket, healthy: bool, now: float) -> Event | None:
        """The result of an admitted attempt (SEND or PROBE)."""
        if ticket.epoch != self.epoch or ticket.verdict is Verdict.HOLD:
            return None  # admitted before the last change: it has been counted already
        if ticket.verdict is Verdict.PROBE:
            if healthy:
                self.failures, self.pause = 0, 0.0
                self._move(BreakerState.CLOSED)
                return Event(Change.CLOSED)
            return self._open(now, Change.REOPENED)
        if healthy:
            self.failures = 0
            return None
        self.failures += 1
        if self.failures < self.policy.threshold:
            return None
        return self._open(now, Change.OPENED)

    def abandon(self, ticket: Ticket, now: float) -> None:
        """The probe was not sent after all (no slot, shutting down): the next attempt probes."""
        if ticket.verdict is Verdict.PROBE and ticket.epoch == self.epoch:
            self.until = now
            self._move(BreakerState.OPEN)

    def _open(self, now: float, change: Change) -> Event:
        failures = self.failures
        self.pause = self.policy.next_pause(self.pause)
        self.until = now + self.pause
        self.failures = 0
        self._move(BreakerState.OPEN)
        return Event(change, self.pause, failures)

    def _move(self, state: BreakerState) -> None:
        self.state = state
        self.epoch += 1
