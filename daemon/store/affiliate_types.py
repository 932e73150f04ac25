"""The rows of affiliate postbacks in the store (issue 15), shared by the contract and both
backends.

Data model (migration 0003):
- affiliate_postback: one row per store postback, ids from 1,000,000,000 up, never reused. The
  body is the rule-file postback as JSON without id, offer and status (columns of their own);
  a deleted postback stays as a tombstone (status ``deleted``) so that other nodes learn of it.
- affiliate_audit: one row per change (who, when, the row before and after).
- affiliate_secret: the values an affiliate marked secret, apart from its postbacks (NULL once
  deleted).
- affiliate_state: one version counter, bumped by every change; each postback and secret row
  keeps the version of its last change (``change_seq``), so a node fetches what changed since
  the version it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

FIRST_STORE_ID = 1_000_000_000  # file postbacks stay below; store postbacks start here
LIVE_STATUSES = ("active", "disabled")
NOTIFY_CHANNEL = "postbackd_affiliates"


@dataclass(frozen=True)
class PostbackChange:
    """What a write sets on a store postback."""

    offer: str
    status: str  # active | disabled
    body: dict[str, Any]
    status_reason: str | None = None


@dataclass(frozen=True)
class StoredPostback:
    id: int
    affiliate: str
    offer: str
    status: str  # active | disabled | deleted
    status_reason: str | None
    body: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    change_seq: int

    def snapshot(self) -> dict[str, Any]:
        """The row as the audit trail keeps it (JSON)."""
        return {
            "id": self.id,
            "affiliate": self.affiliate,
            "offer": self.offer,
            "status": self.status,
            "status_reason": self.status_reason,
            "body": self.body,
        }


@dataclass(frozen=True)
class Who:
    """The author of a change: a token's name, and the affiliate of its user (None: admin)."""

    id: str
    name: str
    affiliate: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "affiliate": self.affiliate}


@dataclass(frozen=True)
class AuditRow:
    postback_id: int
    at: datetime
    who: dict[str, Any]
    change: str  # create | update | status | delete | policy
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    seq: int = 0  # the audit row's own id: `after` of the next page of a history


@dataclass(frozen=True)
class StoredSecret:
    affiliate: str
    name: str
    value: str | None  # None: deleted
    change_seq: int


@dataclass(frozen=True)
class AffiliateChanges:
    """Everything that changed after a version, as of `version`."""

    version: int
    postbacks: list[StoredPostback] = field(default_factory=list)
    secrets: list[StoredSecret] = field(default_factory=list)


class QuotaExceeded(Exception):
    """Raised by the store when a create would take an affiliate over its maximum."""

    def __init__(self, count: int) -> None:
        self.count = count
        super().__init__(f"{count} postbacks already")
