"""The circuit breaker state machine (daemon.breaker), table-driven with an injected clock."""

from __future__ import annotations

import pytest

from daemon.breaker import Breaker, BreakerPolicy, BreakerState, Change, Verdict

POLICY = BreakerPolicy(threshold=3, first_pause=5.0, growth=2.0, max_pause=30.0)
S, P, H = Verdict.SEND, Verdict.PROBE, Verdict.HOLD
OK, BAD = True, False

# Each step: (time, what, expected). `what` is "admit" (expected: the verdict), or
# ("result", i, healthy) for the ticket of the i-th admission (expected: the change or None).
Step = tuple[float, object, object]


def sends(now: float, n: int) -> list[Step]:
    """`n` admissions at `now`, each let through (closed)."""
    return [(now, "admit", S)] * n


def opens(now: float, first: int = 0) -> list[Step]:
    """The tickets `first` to `first + 2` fail at `now`: the third (the threshold) opens."""
    return [
        (now, ("result", first, BAD), None),
        (now, ("result", first + 1, BAD), None),
        (now, ("result", first + 2, BAD), Change.OPENED),
    ]


CASES: dict[str, list[Step]] = {
    "opens_after_threshold_consecutive_failures": [
        *sends(0, 3),
        *opens(1),
        (2, "admit", H),
    ],
    "a_success_resets_the_count": [
        *sends(0, 4),
        (1, ("result", 0, BAD), None),
        (1, ("result", 1, BAD), None),
        (1, ("result", 2, OK), None),
        (1, ("result", 3, BAD), None),
        (2, "admit", S),
    ],
    "in_flight_failures_do_not_count_again_once_open": [
        *sends(0, 5),
        *opens(1),
        (1.5, ("result", 3, BAD), None),
        (1.5, ("result", 4, BAD), None),
        (5.9, "admit", H),
        (6, "admit", P),  # the first pause (5 s), not lengthened by the in-flight failures
    ],
    "a_late_success_of_an_old_attempt_does_not_close": [
        *sends(0, 4),
        *opens(1),
        (2, ("result", 3, OK), None),
        (3, "admit", H),
    ],
    "one_probe_per_pause_others_held_while_it_is_out": [
        *sends(0, 3),
        *opens(0),
        (5, "admit", P),
        (5, "admit", H),
        (6, "admit", H),
        (100, "admit", H),
    ],
    "probe_success_closes_and_the_next_failures_count_from_zero": [
        *sends(0, 3),
        *opens(0),
        (5, "admit", P),
        (5.2, ("result", 3, OK), Change.CLOSED),
        *sends(6, 3),
        *opens(7, 4),
        (11.9, "admit", H),
        (12, "admit", P),  # the first pause again, not a longer one
    ],
    "pause_grows_only_with_failed_probes_up_to_the_cap": [
        *sends(0, 3),
        *opens(0),  # pause 5
        (5, "admit", P),
        (5, ("result", 3, BAD), Change.REOPENED),  # pause 10
        (14.9, "admit", H),
        (15, "admit", P),
        (15, ("result", 4, BAD), Change.REOPENED),  # 20
        (34.9, "admit", H),
        (35, "admit", P),
        (35, ("result", 5, BAD), Change.REOPENED),  # 30
        (64.9, "admit", H),
        (65, "admit", P),
        (65, ("result", 6, BAD), Change.REOPENED),  # 30
        (94.9, "admit", H),
        (95, "admit", P),
        (95, ("result", 7, OK), Change.CLOSED),
        (96, "admit", S),
    ],
}


@pytest.mark.parametrize("steps", CASES.values(), ids=CASES.keys())
def test_breaker(steps: list[Step]) -> None:
    breaker = Breaker(POLICY)
    tickets = []
    for n, (now, what, expected) in enumerate(steps):
        if what == "admit":
            ticket, _ = breaker.admit(now)
            assert ticket.verdict is expected, f"step {n}"
            if ticket.verdict is not Verdict.HOLD:
                tickets.append(ticket)
        else:
            assert isinstance(what, tuple)
            _, i, healthy = what
            event = breaker.record(tickets[i], healthy, now)
            assert (event.change if event else None) is expected, f"step {n}"


def test_events_carry_the_pause_and_the_failures() -> None:
    breaker = Breaker(POLICY)
    tickets = [breaker.admit(0)[0] for _ in range(3)]
    events = [breaker.record(t, False, 1) for t in tickets]
    assert events[-1] is not None
    assert (events[-1].change, events[-1].pause, events[-1].failures) == (Change.OPENED, 5.0, 3)
    probe, event = breaker.admit(6)
    assert event is not None
    assert (event.change, event.pause) == (Change.PROBING, 5.0)
    again = breaker.record(probe, False, 6)
    assert again is not None
    assert (again.change, again.pause) == (Change.REOPENED, 10.0)
    assert breaker.state is BreakerState.OPEN
    assert breaker.until == 16


def test_an_abandoned_probe_lets_the_next_attempt_probe() -> None:
    breaker = Breaker(POLICY)
    for t in [breaker.admit(0)[0] for _ in range(3)]:
        breaker.record(t, False, 0)
    probe, _ = breaker.admit(5)
    assert probe.verdict is Verdict.PROBE
    states = []
    breaker.abandon(probe, 7)
    states.append(breaker.state)
    second, _ = breaker.admit(7)
    assert second.verdict is Verdict.PROBE
    breaker.abandon(probe, 8)  # stale: nothing happens
    states.append(breaker.state)
    assert breaker.record(second, True, 8) is not None
    breaker.abandon(second, 9)  # after its result: nothing happens
    states.append(breaker.state)
    assert states == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_threshold_of_one_opens_on_the_first_failure() -> None:
    breaker = Breaker(BreakerPolicy(threshold=1, first_pause=1, growth=3, max_pause=5))
    ticket, _ = breaker.admit(0)
    event = breaker.record(ticket, False, 0)
    assert event is not None
    assert event.change is Change.OPENED
    pauses = []
    for now in (1.0, 4.0, 9.0, 14.0):
        probe, _ = breaker.admit(now)
        assert probe.verdict is Verdict.PROBE, now
        reopened = breaker.record(probe, False, now)
        assert reopened is not None
        pauses.append(reopened.pause)
    assert pauses == [3.0, 5.0, 5.0, 5.0]
