"""`postbackd send-test`: one real attempt of one postback with a sample conversion, through the
real action and the outbound guard, recorded nowhere."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from daemon.actions import build_action
from daemon.actions.base import Job, RequestRecord, Resources
from daemon.errors import DeliveryError
from daemon.guard import Guard
from daemon.loader import LoadedPostback, RuleSet
from daemon.matching import explain
from daemon.models import (
    Conversion,
    Status,
    Transition,
    Trigger,
    arrival_view,
    rule_data,
)
from daemon.outbound import OutboundHttp, Resolver
from daemon.rules import ANY_AFFILIATE
from daemon.secrets import SecretResolver
from daemon.settings import Settings
from daemon.store.base import idempotency_key

SOURCE = "send-test"
_STATUS_OF = {
    Trigger.DONE: Status.APPROVED,
    Trigger.REJECT: Status.REJECTED,
    Trigger.PENDING: Status.PENDING,
}


@dataclass(frozen=True)
class SendResult:
    request: RequestRecord | None
    response_status: int | None
    response_excerpt: str | None
    error: DeliveryError | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.error is None


def sample_conversion(lp: LoadedPostback, now: datetime) -> dict[str, Any]:
    """A harmless conversion that matches the postback's trigger settings (reserved example
    addresses and a fictional phone number, so nothing reaches a real person)."""
    pb = lp.postback
    obj: dict[str, Any] = {
        "conversion_id": f"send-test-{int(now.timestamp())}",
        "offer": lp.offer,
        "affiliate": "1" if pb.affiliate == ANY_AFFILIATE else pb.affiliate,
        "status": _STATUS_OF[pb.trigger].value,
        "click_id": "send-test-click",
        "payout": "1.00",
        "revenue": "2.00",
        "currency": "USD",
        "email": "send-test@example.com",
        "phone": "+15555550100",
        "first_name": "Send",
        "last_name": "Test",
        "sub1": "send-test",
    }
    if pb.goal is not None:
        obj["goal"] = pb.goal
    return obj


def would_fire(rules: RuleSet, lp: LoadedPostback, conversion: Conversion) -> str | None:
    """None when the postback fires for this conversion, else the first check that fails."""
    data = rule_data(
        conversion,
        source=SOURCE,
        transition=Transition.NEW,
        previous_status=None,
        received_at=datetime.now(UTC),
    )
    for verdict in explain(rules, conversion, data, conversion.trigger):
        if verdict.postback.id == lp.id:
            return None if verdict.fires else verdict.reason
    return f"the conversion's offer is {conversion.offer}, the postback's is {lp.offer}"


async def send_once(
    settings: Settings,
    lp: LoadedPostback,
    conversion: Conversion,
    environ: Mapping[str, str],
    *,
    resolver: Resolver | None = None,
) -> SendResult:
    """Render the postback for `conversion` and make one attempt through its action."""
    now = time.time()
    http = OutboundHttp(
        guard=Guard(settings.outbound.allow_cidrs),
        resolver=resolver,
        timeout=settings.outbound.timeout,
    )
    secrets = SecretResolver(
        credentials_dir=environ.get("CREDENTIALS_DIRECTORY"),
        secrets_dir=settings.secrets_path,
        environ=environ,
    )
    resources = Resources(
        http=http, secret=secrets, clock=_Clock(), timeout=settings.outbound.timeout
    )
    job = _job(lp, conversion, now)
    error: DeliveryError | None = None
    started = time.monotonic()
    async with http:
        try:
            await build_action(lp.postback.action, resources).send(job)
        except DeliveryError as err:
            error = err
    return SendResult(
        job.record.request,
        job.record.response_status,
        job.record.response_excerpt,
        error,
        int((time.monotonic() - started) * 1000),
    )


def _job(lp: LoadedPostback, conversion: Conversion, now: float) -> Job:
    data, values = arrival_view(
        conversion,
        source=SOURCE,
        transition=Transition.NEW,
        previous_status=None,
        received_at=datetime.fromtimestamp(now, UTC),
    )
    delivery_id = f"send-test-{uuid.uuid4().hex[:12]}"
    key = idempotency_key(SOURCE, conversion.conversion_id, 1, lp.id)
    return Job.for_attempt(lp.id, delivery_id, key, values, data, now=now, rand=str(uuid.uuid4()))


class _Clock:
    def now(self) -> float:
        return time.time()
