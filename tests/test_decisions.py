"""The decision that follows an attempt (daemon.decisions.decide), as a table."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from daemon.decisions import Decision, decide, effective_policy
from daemon.errors import (
    DeliveryError,
    GuardRefusedError,
    OutcomeUnknownError,
    PermanentError,
    RetryableError,
)
from daemon.httpstatus import HttpResponse, classify_failure, classify_status
from daemon.retry import RetryPolicy
from daemon.rules import RetryOverride
from daemon.store.base import Claim, DeliveryState

NOW = 1_790_000_000.0
POLICY = RetryPolicy(delays=(10.0, 60.0), jitter=0.0)  # 3 attempts in all
RETRY, DEAD, DONE = DeliveryState.RETRYING, DeliveryState.DEAD, DeliveryState.SUCCEEDED


def claim(attempts: int = 0, age: float = 0.0) -> Claim:
    return Claim(
        "d1", "tok", 1, "h.example", "generic", "c1", 1, "generic:c1:1:1", attempts,
        datetime.fromtimestamp(NOW - age, UTC), {}, {},
    )  # fmt: skip


def status_error(status: int, headers: dict[str, str] | None = None) -> DeliveryError:
    try:
        classify_status(HttpResponse(status, headers or {}, b"", "http://x"), NOW)
    except DeliveryError as err:
        return err
    raise AssertionError("no error")


CASES: dict[str, tuple[DeliveryError | None, Claim, Decision]] = {
    "success": (None, claim(), Decision(DONE, "succeeded", None, None, True)),
    "503 first attempt retries in 10 s, unwell": (
        status_error(503),
        claim(0),
        Decision(RETRY, "retry", "http_503", NOW + 10, False),
    ),
    "503 second attempt retries in 60 s": (
        status_error(503),
        claim(1),
        Decision(RETRY, "retry", "http_503", NOW + 60, False),
    ),
    "503 last attempt is dead": (
        status_error(503),
        claim(2),
        Decision(DEAD, "dead", "http_503", None, False),
    ),
    "429 with Retry-After waits at least that long": (
        status_error(429, {"Retry-After": "120"}),
        claim(0),
        Decision(RETRY, "retry", "http_429", NOW + 120, False),
    ),
    "404 is dead, and the host is healthy": (
        status_error(404),
        claim(0),
        Decision(DEAD, "dead", "http_404", None, True),
    ),
    "425 retries, the host is healthy": (
        status_error(425),
        claim(0),
        Decision(RETRY, "retry", "http_425", NOW + 10, True),
    ),
    "408 retries, unwell": (
        status_error(408),
        claim(0),
        Decision(RETRY, "retry", "http_408", NOW + 10, False),
    ),
    "connection refused retries, unwell": (
        classify_failure(ConnectionRefusedError(), "http://x", True, sent=False),
        claim(0),
        Decision(RETRY, "retry", "connect_failed", NOW + 10, False),
    ),
    "a timeout after sending a non-idempotent request is dead, unwell": (
        classify_failure(TimeoutError(), "http://x", False, sent=True),
        claim(0),
        Decision(DEAD, "dead", "outcome_unknown", None, False),
    ),
    "a render failure is dead, host healthy": (
        PermanentError("render_failed"),
        claim(0),
        Decision(DEAD, "dead", "render_failed", None, True),
    ),
    "the guard's refusal says nothing about the host": (
        GuardRefusedError("private"),
        claim(0),
        Decision(DEAD, "dead", "guard_refused", None, True),
    ),
    "without a max_age the age does not matter": (
        RetryableError("http_500", unwell=True),
        claim(0, age=10_000),
        Decision(RETRY, "retry", "http_500", NOW + 10, False),
    ),
    "outcome unknown without a transport fact is healthy": (
        OutcomeUnknownError("no verdict"),
        claim(0),
        Decision(DEAD, "dead", "outcome_unknown", None, True),
    ),
}


@pytest.mark.parametrize(("error", "the_claim", "expected"), CASES.values(), ids=CASES.keys())
def test_decide(error: DeliveryError | None, the_claim: Claim, expected: Decision) -> None:
    assert decide(error, the_claim, POLICY, NOW, random.Random(1)) == expected


def test_a_postbacks_override_limits_the_schedule() -> None:
    policy = effective_policy(POLICY, RetryOverride(max_attempts=1))
    assert decide(status_error(500), claim(0), policy, NOW).state is DEAD
    aged = effective_policy(POLICY, RetryOverride(max_age=5.0))
    assert decide(status_error(500), claim(0), aged, NOW).state is DEAD  # 10 s is past 5 s
    assert effective_policy(POLICY, None) is POLICY
