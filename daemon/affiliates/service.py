"""The one service that the HTTP API and the web console call to read and manage postbacks as
a given viewer (an admin or a user of one affiliate).

Every method takes the caller's :class:`~daemon.visibility.Viewer` first and returns JSON-ready
dicts in ONE shape, the shape ``GET /api/v1/postbacks/{id}`` answers (see :func:`postback_view`)::

    {
      "id": 1000000007,                 # store postbacks: >= 1,000,000,000; file ones below
      "offer": "1234",
      "trigger": "conversion_done",
      "trigger_settings": {"affiliate": "42", "goal": "lead", "goal_evaluated": true,
                           "when": null},
      "action": "ping_url",
      "action_settings": {"url": "https://t.example/pb?cid={click_id}&k=****", ...},  # masked
      "status": "active" | "disabled",
      "status_reason": null | "policy: action type smtp is not allowed",   # why it is disabled
      "created_at": "2026-12-06T16:00:00Z",
      "author": {"id": "token-name", "name": "...", "affiliate": "42"},
      "source": "store" | "file",       # where it lives
      "file": "offers/1234.yaml" | null,  # file postbacks only
      "line": 12 | null,                  # file postbacks only
      "updated_at": "..." | null,         # store postbacks only
    }

Secrets are masked everywhere (``****``); an affiliate secret's value is never returned.

Errors (all in :mod:`daemon.errors`, subclasses of ``InputError`` so the API answers them as
``{"error": ..., "field": ...}`` with their ``status``):

- ``NotFoundError`` (404): no such postback, or one the viewer may not see (another affiliate's,
  an admin's): the same answer, word for word.
- ``ConflictError`` (409): a write on a file postback (message names its ``file:line``: file
  postbacks stay in git), an action type or offer change, a write that lost a race with another
  (read it again), a secret still used by a postback.
- ``ForbiddenError`` (403): an admin creating or duplicating, an affiliate naming another
  affiliate or ``*``, an affiliate enabling a postback an admin disabled.
- ``PolicyError`` (422): the policy refuses it (action type, ``when:``, offer, destination,
  quota); the message says which rule of the policy.
- ``InputError`` (400): a delete whose ``confirm`` is not the id; malformed input (unknown
  keys, wrong types, oversized, control characters); ``field`` names the offending key. Rule
  validation errors read as ``validate`` prints them, e.g. ``action.url: ...``.
- ``StoreError``: the store cannot commit (the API answers 503); nothing is half-written.

Fields of ``create`` (the rule-file postback fields, SPEC 7.1): ``offer`` (required),
``trigger`` (required), ``goal``, ``when`` (only if the policy allows), ``status``
(default ``active``), ``retry``, ``action`` (required, a mapping with ``type``), and
``affiliate`` only if it is the viewer's own (``"*"`` or another affiliate: ForbiddenError, 403).
Not accepted (400): ``id``, ``author``, ``created_at`` (set by the service). Only affiliate
viewers create and duplicate (an admin gets ForbiddenError: ops keep their postbacks in git);
an admin may update, enable/disable, delete and read every store postback.
``update`` takes the same keys but ``offer`` and ``action.type`` cannot change (409 for the
type); ``action`` given in ``update`` replaces the action settings as a whole.

Affiliate secrets are written ``${affiliate_secret:NAME}`` inside action settings (ops secrets,
``${secret:NAME}``, are refused in store postbacks) and resolve only from the secrets of the
postback's own affiliate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC
from typing import Any

from daemon.affiliates import inputs
from daemon.affiliates.core import (
    POLICY_WHO,
    ServiceCore,
    masked,
    reason_for,
    restore_masked,
    secrets_of,
    who,
)
from daemon.affiliates.records import BODY_KEYS, file_view
from daemon.errors import ConflictError, InputError, NotFoundError, PolicyError
from daemon.log import get_logger
from daemon.store.affiliate_types import FIRST_STORE_ID, PostbackChange, StoredPostback
from daemon.visibility import Viewer, visible_to

log = get_logger("postbackd.affiliates")

View = dict[str, Any]
Views = list[View]  # module-level: the method `list` shadows the builtin in the class
HISTORY_PAGE = 100  # audit rows per page of a history, at most
Names = list[str]


class AffiliateService(ServiceCore):
    """Read and manage postbacks as a viewer (available as ``services.affiliates``).

    All methods are coroutines; a write takes effect on this node before it returns, and on the
    other nodes of the same PostgreSQL store within 2 s.
    """

    async def list(
        self, viewer: Viewer, offer: str | None = None, status: str | None = None
    ) -> Views:
        """Every postback the viewer may see (file and store ones), by id; optionally of one
        offer and/or one status (``active`` | ``disabled``; InputError otherwise)."""
        if status is not None:
            inputs.status(status)
        if offer is not None:
            offer = inputs.id_text(offer, "offer")
        out = [
            file_view(lp)
            for lp in self._file_postbacks(viewer, offer)
            if visible_to(lp.postback, viewer) and (status is None or lp.postback.status == status)
        ]
        out.extend(
            self._view(e)
            for e in self._visible_entries(viewer)
            if (offer is None or e.stored.offer == offer)
            and (status is None or e.stored.status == status)
        )
        return sorted(out, key=lambda v: int(v["id"]))

    async def get(self, viewer: Viewer, id: int | str) -> View:
        """One postback; NotFoundError when there is none or the viewer may not see it."""
        pid = self._pid(id)
        entry = self.index.entries.get(pid)
        if entry is not None and self._sees(viewer, entry.stored):
            return self._view(entry)
        return file_view(self._file_postback(viewer, pid))

    async def offers(self, viewer: Viewer) -> Views:
        """The offers the viewer may attach postbacks to:
        ``[{"offer": "1234", "goals_enabled": true, "goals": ["lead", "sale"]}]`` (goals: those
        named by the offer's postbacks in the rule files)."""
        policy = self.index.policy.policy
        rules = self.index.file_rules or self.reloader.runtime.rules
        out = []
        for offer, enabled in sorted(self.index.offers_with_files().items()):
            if not policy.offer_allowed(offer, (offer,)):
                continue
            goals = {
                lp.postback.goal
                for lp in rules.offers.get(offer, ())
                if lp.id < FIRST_STORE_ID and lp.postback.goal is not None
            }
            out.append({"offer": offer, "goals_enabled": enabled, "goals": sorted(goals)})
        return out

    async def limits(self, viewer: Viewer) -> View:
        """What the policy allows this viewer: ``{"actions": [...], "when": bool,
        "max_postbacks": N, "offers": "*" | [...], "used": N}`` (for an admin, `used` is null)."""
        body = self.index.policy.limits()
        body["used"] = None if viewer.is_admin else self._used(viewer.affiliate or "")
        return body

    async def history(
        self, viewer: Viewer, id: int | str, after: int = 0, limit: int = HISTORY_PAGE
    ) -> View:
        """The audit trail of a store postback, oldest first, a page at a time (every PATCH adds
        a row of up to twice the body: unpaged, 300 PATCHes made a 34 MB answer; red team):
        ``{"history": [{"at": iso, "who": {"id", "name", "affiliate"}, "change": "create" |
        "update" | "status" | "delete" | "policy", "before": {...} | None, "after": {...} |
        None, "seq": N}], "next_after": N | None}`` (the stored row: id, affiliate, offer,
        status, status_reason, body; secrets masked); the rows after `after` (a `seq`), at most
        `limit` (1 to HISTORY_PAGE); `next_after` gives the next page.
        NotFoundError as for get (also for deleted ones the viewer could see); ConflictError for a
        file postback (its history is in git)."""
        pid = self._pid(id)
        first = await self.store.affiliate_history(pid, 0, 1) if pid >= FIRST_STORE_ID else []
        owner = next((r.before or r.after or {} for r in first), {}).get("affiliate")
        if not first or not (viewer.is_admin or owner == viewer.affiliate):
            lp = self._file_postback(viewer, pid)
            raise ConflictError(
                f"postback {pid} lives in {lp.file}:{lp.line}: its history is git's"
            )
        rows = await self.store.affiliate_history(pid, after, limit + 1)
        page = [
            {
                "at": r.at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                "who": r.who,
                "change": r.change,
                "before": masked(r.before),
                "after": masked(r.after),
                "seq": r.seq,
            }
            for r in rows[:limit]
        ]
        return {"history": page, "next_after": rows[limit - 1].seq if len(rows) > limit else None}

    # --- writes -----------------------------------------------------------------------------

    async def create(self, viewer: Viewer, fields: Mapping[str, Any]) -> View:
        """Create a store postback (its id allocated, author and created_at from the viewer).
        An affiliate viewer creates only for itself; PolicyError for what the policy refuses
        (including the quota), InputError for malformed fields."""
        affiliate = self._affiliate_only(viewer, "create")
        fields = inputs.known_keys(fields, inputs.CREATE_KEYS)
        if "affiliate" in fields:
            inputs.own_affiliate(fields["affiliate"], affiliate)
        if "offer" not in fields:
            raise InputError("missing required key 'offer'", "offer")
        offer = inputs.id_text(fields["offer"], "offer")
        status = inputs.status(fields.get("status", "active"))
        body = {k: fields[k] for k in BODY_KEYS if k in fields and fields[k] is not None}
        if "action" in body:
            body["action"] = inputs.action_of(body["action"])
        body["author"] = {**who(viewer).as_dict(), "affiliate": affiliate}
        change = PostbackChange(offer, status, body)
        self._check(affiliate, change)
        row = await self._create(viewer, affiliate, change)
        log.info("affiliate_postback_created", postback_id=row.id, affiliate=affiliate, offer=offer)
        return self._view(self.index.entries[row.id])

    async def update(self, viewer: Viewer, id: int | str, changes: Mapping[str, Any]) -> View:
        """Change some fields of a store postback (`null` removes goal, when or retry);
        ConflictError for a file postback (naming its file:line), an offer or action type
        change."""
        entry = self._writable(viewer, id)
        if isinstance(changes, Mapping) and "offer" in changes:
            if inputs.id_text(changes["offer"], "offer") != entry.stored.offer:
                raise ConflictError("the offer of a postback cannot change: duplicate it", "offer")
            changes = {k: v for k, v in changes.items() if k != "offer"}
        changes = inputs.known_keys(changes, inputs.UPDATE_KEYS)
        body = dict(entry.stored.body)
        for key in BODY_KEYS:
            if key in changes:
                if changes[key] is None and key in ("goal", "when", "retry"):
                    body.pop(key, None)
                else:
                    body[key] = changes[key]
        if "action" in changes:
            action = inputs.action_of(changes["action"])
            body["action"] = restore_masked(action, entry.stored.body.get("action") or {})
            old_type = entry.stored.body.get("action", {}).get("type")
            if body["action"]["type"] != old_type:
                raise ConflictError(
                    f"the action type cannot change ({old_type}): create a new postback",
                    "action.type",
                )
        status = inputs.status(changes.get("status", entry.stored.status))
        self._may_enable(viewer, entry, status)
        change = PostbackChange(entry.stored.offer, status, body, reason_for(viewer, status, entry))
        if body == entry.stored.body and status == entry.stored.status:
            return self._view(entry)  # nothing changes: nothing is written
        self._check(entry.stored.affiliate, change, pid=entry.stored.id)
        row = await self._update(viewer, entry, change, "update")
        return self._view(self.index.entries[row.id])

    async def set_status(self, viewer: Viewer, id: int | str, status: str) -> View:
        """``active`` or ``disabled``. Enabling checks the policy again (PolicyError); an
        affiliate cannot enable what an admin disabled (ForbiddenError)."""
        entry = self._writable(viewer, id)
        status = inputs.status(status)
        self._may_enable(viewer, entry, status)
        body = entry.stored.body
        change = PostbackChange(entry.stored.offer, status, body, reason_for(viewer, status, entry))
        if status == entry.stored.status and change.status_reason == entry.stored.status_reason:
            return self._view(entry)
        if status == "active":
            self._check(entry.stored.affiliate, change, pid=entry.stored.id)
        row = await self._update(viewer, entry, change, "status")
        return self._view(self.index.entries[row.id])

    async def delete(self, viewer: Viewer, id: int | str, confirm: Any) -> None:
        """Delete a store postback; `confirm` must be its id typed back (InputError if not).
        Its queued and retrying deliveries are cancelled; its id is never handed out again."""
        entry = self._writable(viewer, id)
        try:
            typed = inputs.postback_id(confirm, "confirm")
        except InputError:
            typed = None
        if typed != entry.stored.id:
            raise InputError(f"type the postback's id ({entry.stored.id}) to confirm", "confirm")
        now = self._moment()
        if not await self._counted(
            viewer.affiliate,
            self.store.delete_affiliate_postback(
                entry.stored.id, entry.stored.change_seq, who(viewer), now
            ),
        ):
            raise ConflictError("the postback changed meanwhile: read it again")
        tomb = StoredPostback(**{**entry.stored.__dict__, "status": "deleted"})
        self._took([tomb])
        log.info("affiliate_postback_deleted", postback_id=entry.stored.id)

    async def duplicate(
        self, viewer: Viewer, from_offer: str, to_offer: str, ids: Sequence[int | str]
    ) -> Views:
        """Copies of the chosen postbacks of `from_offer` (any the viewer may see: file ones
        too) attached to `to_offer`, as new store postbacks of the viewer's affiliate. Every copy
        is checked before the first is written."""
        affiliate = self._affiliate_only(viewer, "duplicate")
        source = inputs.id_text(from_offer, "from_offer")
        target = inputs.id_text(to_offer, "to_offer")
        if not isinstance(ids, list) or not ids or len(ids) > inputs.MAX_IDS:
            raise InputError(f"ids must be a list of 1 to {inputs.MAX_IDS} postback ids", "ids")
        changes = []
        for raw in ids:
            original = await self.get(viewer, inputs.postback_id(raw, "ids"))
            if original["offer"] != source:
                raise NotFoundError(f"no postback {original['id']} in offer {source}")
            body = self._copy_body(original)
            body["author"] = {**who(viewer).as_dict(), "affiliate": affiliate}
            change = PostbackChange(target, original["status"], body)
            self._check(affiliate, change)
            changes.append(change)
        room = self.index.policy.policy.max_postbacks - self._used(affiliate)
        if len(changes) > room:
            raise PolicyError(
                f"{len(changes)} copies would exceed max_postbacks "
                f"({self.index.policy.policy.max_postbacks}); room for {max(room, 0)}"
            )
        self._budget(affiliate, len(changes))  # all the copies, or none
        made = [await self._create(viewer, affiliate, change) for change in changes]
        return [self._view(self.index.entries[row.id]) for row in made]

    # --- secrets ----------------------------------------------------------------------------

    async def set_secret(self, viewer: Viewer, name: str, value: str) -> None:
        """Set one secret of the viewer's affiliate (admins: ForbiddenError; secrets belong to an
        affiliate). The value is never returned again."""
        affiliate = self._affiliate_only(viewer, "keep secrets")
        name, value = inputs.secret_value(name, value)
        await self.store.set_affiliate_secret(affiliate, name, value, self._moment())
        self.index.secrets.apply_one(affiliate, name, value)
        log.info("affiliate_secret_set", affiliate=affiliate, secret=name)

    async def list_secret_names(self, viewer: Viewer) -> Names:
        """The names of the viewer's affiliate's secrets (never values)."""
        affiliate = self._affiliate_only(viewer, "keep secrets")
        return await self.store.affiliate_secret_names(affiliate)

    async def delete_secret(self, viewer: Viewer, name: str) -> None:
        """Remove a secret; ConflictError while a postback of the affiliate refers to it,
        NotFoundError when it is not set."""
        affiliate = self._affiliate_only(viewer, "keep secrets")
        name, _ = inputs.secret_value(name, "-")
        users = [
            e.stored.id for e in self.index.owned_by(affiliate) if name in secrets_of(e.stored)
        ]
        if users:
            raise ConflictError(f"secret {name} is used by postback(s) {users}", "name")
        if not await self.store.set_affiliate_secret(affiliate, name, None, self._moment()):
            raise NotFoundError(f"no secret {name}")
        self.index.secrets.apply_one(affiliate, name, None)

    # --- policy -----------------------------------------------------------------------------

    async def enforce_policy(self) -> int:
        """Disable (with the reason on each, never delete) the active store postbacks that the
        current policy or rules no longer allow; how many were disabled."""
        done = 0
        for entry in self.index.blocked():
            reason = entry.problem
            change = PostbackChange(entry.stored.offer, "disabled", entry.stored.body, reason)
            row = await self.store.update_affiliate_postback(
                entry.stored.id,
                entry.stored.change_seq,
                change,
                POLICY_WHO,
                "policy",
                self._moment(),
            )
            if row is not None:
                self._took([row])
                done += 1
                log.warning("affiliate_postback_disabled", postback_id=row.id, reason=reason)
        return done
