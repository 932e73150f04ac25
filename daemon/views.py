"""One JSON shape per object shown to people and programs (issue 18): a delivery is the same
object in the HTTP API (`daemon.api_views.delivery_view`) and in `postbackd deliveries ...
--format json`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from daemon.store.base import DeliveryRow


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def delivery_json(row: DeliveryRow) -> dict[str, Any]:
    """A delivery as the API and the command line show it."""
    return {
        "delivery_id": row.delivery_id,
        "postback_id": row.postback_id,
        "action": row.action,
        "destination": row.destination,
        "source": row.source,
        "conversion_id": row.conversion_id,
        "arrival_seq": row.arrival_seq,
        "idempotency_key": row.idempotency_key,
        "state": row.state.value,
        "attempts": row.attempts,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
        "next_attempt_at": iso(row.next_attempt_at),
        "last_reason": row.last_reason,
    }
