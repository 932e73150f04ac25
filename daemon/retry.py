"""The retry schedule (SPEC 10): a small value object with one decision method."""

from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_DELAYS = (10.0, 60.0, 300.0, 1800.0, 7200.0, 21600.0, 43200.0)
RETRY_AFTER_CAP = 3600.0


@dataclass(frozen=True)
class RetryPolicy:
    delays: tuple[float, ...] = DEFAULT_DELAYS
    jitter: float = 0.2
    max_attempts: int | None = None  # default: one more than the delays
    max_age: float | None = None  # seconds since the delivery was created

    def next_delay(
        self,
        attempts_done: int,
        age: float,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> float | None:
        """Seconds until the next attempt after `attempts_done` failed attempts, or None when
        the delivery should end `dead`. `age` is the delivery's age now, in seconds."""
        limit = self.max_attempts if self.max_attempts is not None else len(self.delays) + 1
        if attempts_done >= limit:
            return None
        base = self.delays[min(attempts_done, len(self.delays)) - 1] if attempts_done else 0.0
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        delay = base * (1 + spread)
        if retry_after is not None:
            delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
        if self.max_age is not None and age + delay > self.max_age:
            return None
        return delay

    def with_override(self, max_attempts: int | None, max_age: float | None) -> RetryPolicy:
        return RetryPolicy(
            self.delays,
            self.jitter,
            max_attempts if max_attempts is not None else self.max_attempts,
            max_age if max_age is not None else self.max_age,
        )
