"""What the console shows, decided apart from any I/O: the product's labels, postback table rows
(daemon.listing's rows and summaries), table filters, repository links and success rates."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from daemon.listing import (
    COLUMNS,
    action_settings_text,
    author_text,
    postback_row,
    trigger_settings_text,
)
from daemon.loader import LoadedPostback, RuleSet
from daemon.store.base import DeliveryRow, DeliveryState

# The platform's words where the title case of the type is not what it shows.
_LABELS = {
    "dnpl": "DNPL",
    "edelivery_contact_list": "eDelivery Contact List",
    "edelivery_unsubscribe": "eDelivery Unsubscribe",
    "five9_list": "Five9 List",
    "lms_post_lead": "LMS Post Lead",
    "smtp": "Email",
    "trustedform_claim": "TrustedForm Claim",
    "in_flight": "In flight",
}
PAGE_SIZE = 100
TABLE_COLUMNS = COLUMNS


def label(value: str | None) -> str:
    """`conversion_done` -> "Conversion Done", `ping_url` -> "Ping Url" (the product's labels)."""
    if not value:
        return "-"
    return _LABELS.get(value) or " ".join(w.capitalize() for w in value.split("_"))


def when(moment: datetime | str | None) -> str:
    """A time as the console prints it: UTC, to the second."""
    if moment is None:
        return "-"
    if isinstance(moment, str):
        try:
            parsed = datetime.fromisoformat(moment.replace("Z", "+00:00"))
        except ValueError:
            return moment
        moment = parsed
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


FILTERS: dict[str, Callable[..., Any]] = {"label": label, "when": when, "pretty": pretty}


# --- the postback table ------------------------------------------------------------------------


def postback_id(text: str) -> int | None:
    """A postback id as the console takes one from a URL or a query (ASCII digits, fewer than
    19 of them: it fits the store's 64-bit ids); None for anything else."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None


@dataclass(frozen=True)
class PostbackFilter:
    status: str | None = None
    trigger: str | None = None
    affiliate: str | None = None
    action: str | None = None

    def keeps(self, lp: LoadedPostback) -> bool:
        pb = lp.postback
        return (
            (self.status is None or pb.status == self.status)
            and (self.trigger is None or pb.trigger.value == self.trigger)
            and (self.affiliate is None or self.affiliate in (pb.affiliate, pb.owner_affiliate))
            and (self.action is None or pb.action.type == self.action)
        )


def table_row(lp: LoadedPostback, repository_url: str | None) -> dict[str, Any]:
    """One postback as the console's table shows it: listing's row plus its text cells."""
    row = postback_row(lp)
    row["trigger_text"] = trigger_settings_text(row)
    row["action_text"] = action_settings_text(row["action_settings"])
    row["author_text"] = author_text(row["author"])
    row["owner"] = lp.postback.owner_affiliate
    if is_store(lp):
        row["file"] = row["line"] = None
    row["where"] = f"{lp.file}:{lp.line}"
    row["repo_link"] = repo_link(repository_url, lp.file, lp.line)
    return row


def is_store(lp: LoadedPostback) -> bool:
    """A postback kept in the store (managed in the console) rather than in a rule file."""
    return getattr(lp, "stored", None) is not None


def repo_link(repository_url: str | None, file: str, line: int) -> str | None:
    if not repository_url:
        return None
    return f"{repository_url.rstrip('/')}/{quote(file)}#L{line}"


def page_of(
    postbacks: Iterable[LoadedPostback], flt: PostbackFilter, after: int | None, size: int
) -> tuple[list[LoadedPostback], int | None]:
    """One page of the postbacks `flt` keeps, by id after `after`; the next page's `after`."""
    found: list[LoadedPostback] = []
    for lp in postbacks:  # sorted by id
        if after is not None and lp.id <= after:
            continue
        if flt.keeps(lp):
            found.append(lp)
            if len(found) > size:
                break
    more = len(found) > size
    found = found[:size]
    return found, (found[-1].id if more and found else None)


@dataclass(frozen=True)
class OfferSummary:
    offer: str
    active: int
    disabled: int
    goals_enabled: bool
    affiliate_postbacks: int


def offer_summaries(offers: Mapping[str, Sequence[LoadedPostback]]) -> list[OfferSummary]:
    out = []
    for offer, postbacks in offers.items():
        active = sum(1 for lp in postbacks if lp.postback.active)
        owned = sum(1 for lp in postbacks if lp.postback.owner_affiliate is not None)
        goals = any(lp.goals_enabled for lp in postbacks)
        out.append(OfferSummary(offer, active, len(postbacks) - active, goals, owned))
    return sorted(out, key=lambda s: (len(s.offer), s.offer))


@dataclass(frozen=True)
class PostbackIndex:
    """The ids of one rule set's postbacks by action type and by affiliate (the one they match,
    and the one whose user wrote them), for the delivery filters."""

    by_action: Mapping[str, frozenset[int]]
    by_affiliate: Mapping[str, frozenset[int]]

    @classmethod
    def of(cls, rules: RuleSet) -> PostbackIndex:
        actions: dict[str, set[int]] = {}
        affiliates: dict[str, set[int]] = {}
        for pid, lp in rules.postbacks.items():
            pb = lp.postback
            actions.setdefault(pb.action.type, set()).add(pid)
            for who in {pb.affiliate, pb.owner_affiliate} - {None}:
                affiliates.setdefault(str(who), set()).add(pid)
        return cls(
            {k: frozenset(v) for k, v in actions.items()},
            {k: frozenset(v) for k, v in affiliates.items()},
        )


# --- deliveries ----------------------------------------------------------------------------------


def success_rate(rows: Sequence[DeliveryRow]) -> tuple[int, int, int | None]:
    """(succeeded, finished, percent) over the deliveries that have ended."""
    finished = [r for r in rows if r.state in (DeliveryState.SUCCEEDED, DeliveryState.DEAD)]
    ok = sum(1 for r in finished if r.state is DeliveryState.SUCCEEDED)
    percent = round(100 * ok / len(finished)) if finished else None
    return ok, len(finished), percent


# The times a console filter may name: a window or cursor arithmetic stays inside datetime.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def parse_time(text: str, field: str) -> datetime:
    """`2026-11-27`, `2026-11-27T19:02` or with seconds and a zone (UTC when none)."""
    from daemon.errors import InputError

    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        # In UTC here: a zone's offset can carry year 1 or 9999 past what datetime holds.
        moment = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError) as err:
        raise InputError("not a date or time (YYYY-MM-DD or YYYY-MM-DDTHH:MM)", field) from err
    if not EARLIEST <= moment <= LATEST:
        raise InputError("a time between 1970 and 9000 (UTC)", field)
    return moment
