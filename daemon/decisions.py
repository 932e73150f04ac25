"""What follows an attempt, decided apart from the I/O: one pure function of (outcome, claim,
policy, now), the way Alertmanager's RetryStage or procrastinate's ``get_retry_decision``
separate the decision from sending and recording.

The decision says how the delivery moves on (succeeded, retry at T, dead) and whether the
attempt says anything about the destination's health (feeds its circuit breaker,
daemon.breaker). Health comes from the typed ``DeliveryError.unwell`` fact that the one status
classifier (daemon.httpstatus) and the transport mapping set, never from reason strings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from daemon.errors import DeliveryError, PermanentError, RetryableError
from daemon.retry import RetryPolicy
from daemon.rules import RetryOverride
from daemon.store.base import Claim, DeliveryState


@dataclass(frozen=True)
class Decision:
    state: DeliveryState  # SUCCEEDED, RETRYING or DEAD
    outcome: str  # succeeded | retry | dead (the attempt record's and the metrics' word)
    reason: str | None
    next_at: float | None  # RETRYING: when the next attempt is due (Unix seconds)
    healthy: bool  # the destination answered as a healthy host would (for its breaker)


# Every success decides the same (a Decision is immutable: one object serves them all).
_SUCCEEDED = Decision(DeliveryState.SUCCEEDED, "succeeded", None, None, True)


def effective_policy(policy: RetryPolicy, override: RetryOverride | None) -> RetryPolicy:
    """The daemon's schedule with a postback's own `retry:` limits, if it has any."""
    if override is None:
        return policy
    return policy.with_override(override.max_attempts, override.max_age)


def decide(
    error: DeliveryError | None,
    claim: Claim,
    policy: RetryPolicy,
    now: float,
    rng: random.Random | None = None,
) -> Decision:
    """What follows one attempt of `claim` that ended with `error` (None: it succeeded) at
    `now`, under `policy` (already with the postback's override, see effective_policy)."""
    if error is None:
        return _SUCCEEDED
    healthy = not error.unwell
    if isinstance(error, RetryableError):
        age = now - claim.created_at.timestamp()
        delay = policy.next_delay(claim.attempts + 1, age, error.retry_after, rng)
        if delay is None:
            return Decision(DeliveryState.DEAD, "dead", error.reason, None, healthy)
        return Decision(DeliveryState.RETRYING, "retry", error.reason, now + delay, healthy)
    assert isinstance(error, PermanentError)
    return Decision(DeliveryState.DEAD, "dead", error.reason, None, healthy)
