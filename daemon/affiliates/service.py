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
  postbacks stay in git), an action type change, a delete whose ``confirm`` is not the id, a
  secret still used by a postback.
- ``PolicyError`` (422): the policy refuses it (action type, ``when:``, offer, destination,
  quota); the message says which rule of the policy.
- ``InputError`` (400): malformed input (unknown keys, wrong types, oversized, control
  characters); ``field`` names the offending key. Rule validation errors read as
  ``validate`` prints them (the loader's messages), e.g. ``action.url: ...``.
- ``StoreError``: the store cannot commit (the API answers 503); nothing is half-written.

Fields of ``create`` (the rule-file postback fields, SPEC 7.1): ``offer`` (required),
``trigger`` (required), ``goal``, ``when`` (only if the policy allows), ``status``
(default ``active``), ``retry``, ``action`` (required, a mapping with ``type``). Not accepted:
``id``, ``affiliate`` for affiliate viewers (taken from the viewer; an admin must give it and
``"*"`` is refused for everyone), ``author``, ``created_at`` (both set by the service).
``update`` takes the same keys but ``offer`` and ``action.type`` cannot change (409 for the
type); ``action`` given in ``update`` replaces the action settings as a whole.

Affiliate secrets are written ``${affiliate_secret:NAME}`` inside action settings (ops secrets,
``${secret:NAME}``, are refused in store postbacks) and resolve only from the secrets of the
postback's own affiliate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from daemon.visibility import Viewer

View = dict[str, Any]
Views = list[View]  # module-level: the method `list` shadows the builtin in the class
Names = list[str]


class AffiliateService:
    """Read and manage postbacks as a viewer (available as ``services.affiliates``).

    All methods are coroutines; a write takes effect on this node before it returns, and on the
    other nodes of the same PostgreSQL store within 2 s.
    """

    async def list(
        self, viewer: Viewer, offer: str | None = None, status: str | None = None
    ) -> Views:
        """Every postback the viewer may see (file and store ones), by id; optionally of one
        offer and/or one status (``active`` | ``disabled``; InputError otherwise)."""
        raise NotImplementedError

    async def get(self, viewer: Viewer, id: int | str) -> View:
        """One postback; NotFoundError when there is none or the viewer may not see it."""
        raise NotImplementedError

    async def create(self, viewer: Viewer, fields: Mapping[str, Any]) -> View:
        """Create a store postback (its id allocated, author and created_at from the viewer).
        An affiliate viewer creates only for itself; PolicyError for what the policy refuses
        (including the quota), InputError for malformed fields."""
        raise NotImplementedError

    async def update(self, viewer: Viewer, id: int | str, changes: Mapping[str, Any]) -> View:
        """Change some fields of a store postback; ConflictError for a file postback (naming its
        file:line) or an action type change."""
        raise NotImplementedError

    async def set_status(self, viewer: Viewer, id: int | str, status: str) -> View:
        """``active`` or ``disabled``. Enabling checks the policy again (PolicyError)."""
        raise NotImplementedError

    async def delete(self, viewer: Viewer, id: int | str, confirm: Any) -> None:
        """Delete a store postback; `confirm` must be its id typed back (ConflictError if not).
        Its queued and retrying deliveries are cancelled; its id is never handed out again."""
        raise NotImplementedError

    async def duplicate(
        self, viewer: Viewer, from_offer: str, to_offer: str, ids: Sequence[int | str]
    ) -> Views:
        """Copies of the chosen postbacks of `from_offer` (any the viewer may see: file ones too)
        attached to `to_offer`, as new store postbacks owned by the viewer's affiliate (for an
        admin: the source postback's affiliate). All are created or none."""
        raise NotImplementedError

    async def offers(self, viewer: Viewer) -> Views:
        """The offers the viewer may attach postbacks to:
        ``[{"offer": "1234", "goals_enabled": true, "goals": ["lead", "sale"]}]`` (goals: those
        named by the offer's postbacks in the rule files)."""
        raise NotImplementedError

    async def history(self, viewer: Viewer, id: int | str) -> Views:
        """The audit trail of a store postback, oldest first:
        ``[{"at": iso, "who": {"id", "name", "affiliate"}, "change": "create" | "update" |
        "status" | "delete" | "policy", "before": View | None, "after": View | None}]``.
        NotFoundError as for get (also for deleted ones the viewer could see)."""
        raise NotImplementedError

    async def limits(self, viewer: Viewer) -> View:
        """What the policy allows this viewer: ``{"actions": [...], "when": bool,
        "max_postbacks": N, "used": N}`` (for an admin, `used` is null)."""
        raise NotImplementedError

    async def set_secret(self, viewer: Viewer, name: str, value: str) -> None:
        """Set one secret of the viewer's affiliate (admins: ForbiddenError; secrets belong to an
        affiliate). The value is never returned again."""
        raise NotImplementedError

    async def list_secret_names(self, viewer: Viewer) -> Names:
        """The names of the viewer's affiliate's secrets (never values)."""
        raise NotImplementedError

    async def delete_secret(self, viewer: Viewer, name: str) -> None:
        """Remove a secret; ConflictError while a postback of the affiliate refers to it."""
        raise NotImplementedError
