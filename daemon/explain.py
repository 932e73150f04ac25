"""A side-effect-free dry run: what an arrival of this conversion would fire, and the exact
requests (used by `postbackd explain`, `postbackd test` and `postbackd diff`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from daemon.actions import build_action
from daemon.actions.base import Job, RequestRecord, Resources
from daemon.errors import DeliveryError, SecretError
from daemon.loader import RuleSet
from daemon.matching import Verdict, explain
from daemon.models import (
    Conversion,
    Status,
    Transition,
    arrival_view,
    decide_transition,
)
from daemon.store.base import idempotency_key


class _FixedClock:
    def __init__(self, now: float) -> None:
        self._now = now

    def now(self) -> float:
        return self._now


def _no_secret(name: str) -> str:
    raise SecretError(f"secret {name!r} is not resolved in a dry run")


@dataclass
class Planned:
    verdict: Verdict
    request: RequestRecord | None = None
    error: str | None = None
    guard_note: str | None = None


@dataclass
class Evaluation:
    conversion: Conversion
    source: str
    transition: Transition
    previous_status: Status | None
    data: dict[str, Any]
    planned: list[Planned] = field(default_factory=list)

    @property
    def fired(self) -> list[int]:
        return [p.verdict.postback.id for p in self.planned if p.verdict.fires]


def evaluate(
    rules: RuleSet,
    conversion: Conversion,
    *,
    source: str = "generic",
    previous_status: Status | None = None,
    now: datetime | None = None,
    guard: Any = None,
) -> Evaluation:
    """Evaluate one arrival against `rules` without any I/O; secrets render as ****."""
    now = now or datetime.now(UTC)
    transition = decide_transition(previous_status, None, conversion)
    fires = transition in (Transition.NEW, Transition.STATUS_CHANGED)
    data, values = arrival_view(
        conversion,
        source=source,
        transition=transition,
        previous_status=previous_status,
        received_at=now,
    )
    resources = Resources(http=None, secret=_no_secret, clock=_FixedClock(now.timestamp()))
    seq = 1 if previous_status is None else 2
    result = Evaluation(conversion, source, transition, previous_status, data)
    for verdict in explain(rules, conversion, data, conversion.trigger if fires else None):
        planned = Planned(verdict)
        result.planned.append(planned)
        if not verdict.fires:
            continue
        pid = verdict.postback.id
        key = idempotency_key(source, conversion.conversion_id, seq, pid)
        job = Job.for_attempt(
            pid,
            "dry-run",
            key,
            values,
            data,
            now=now.timestamp(),
            rand="00000000-0000-4000-8000-000000000000",
        )
        try:
            action = build_action(verdict.postback.postback.action, resources)
            planned.request = action.preview(job)
        except DeliveryError as err:
            planned.error = err.reason + (f": {err.detail}" if err.detail else "")
            continue
        planned.guard_note = _guard_note(planned.request.url, guard)
    return result


def _guard_note(url: str, guard: Any) -> str | None:
    """Mark a request whose host is an address the outbound guard would refuse (no DNS here)."""
    if guard is None:
        return None
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return None if guard.allowed(host) else f"the outbound guard would refuse {host}"
