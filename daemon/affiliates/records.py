"""A store postback as the rules see it: its stored body checked by the loader's own validation
(a rule-file-shaped mapping through :class:`~daemon.rules.RuleFile`, so errors read as
`validate` prints them), its secret references, and the one JSON view of every postback."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from daemon.actions import BUILDERS
from daemon.errors import InputError
from daemon.listing import iso, mask, postback_row
from daemon.loader import LoadedPostback, pydantic_issues
from daemon.rules import Postback, RuleFile
from daemon.secrets import AFFILIATE_PREFIX, valid_secret_name
from daemon.store.affiliate_types import StoredPostback

STORE_FILE = "(store)"  # LoadedPostback.file of a store postback
BODY_KEYS = ("trigger", "goal", "when", "retry", "action")
_AFFILIATE_SECRET = re.compile(r"\$\{affiliate_secret:([^}]*)\}")
_OPS_SECRET = re.compile(r"\$\{\s*secret\s*:")
# A macro reference as the template parser reads it (`{{` and `}}` are literal braces).
_MACRO_REF = re.compile(r"\{\{|\}\}|\$?\{[^{}]*\}")
# Each macro renders a conversion value of up to 1 KiB (3 KiB URL-encoded), and every attempt
# stores what it sent: 600 `{sub1}` in a 47 KB postback made one conversion store 9 MB (red
# team, issue 15). A postback URL uses a handful.
MAX_MACROS = 40


@dataclass(frozen=True)
class StoreLoadedPostback(LoadedPostback):
    """A store postback in the rule set: the stored row it was built from rides along."""

    stored: StoredPostback


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{where}[{i}]")


def secret_names(action: Any) -> set[str]:
    """The affiliate secrets an action refers to; InputError for an ops `${secret:...}` or a
    malformed reference."""
    found: set[str] = set()
    for where, text in _strings(action, "action"):
        if _OPS_SECRET.search(text):
            raise InputError(
                "${secret:...} names an ops secret, out of an affiliate's reach: "
                "use ${affiliate_secret:NAME} for your own",
                where,
            )
        for name in _AFFILIATE_SECRET.findall(text):
            if not valid_secret_name(name):
                raise InputError(f"{name[:64]!r} is not a valid secret name", where)
            found.add(name)
    return found


def macro_count(action: Any) -> int:
    """How many macro references the action's strings hold, repeats counted."""
    return sum(
        1
        for _, text in _strings(action, "action")
        for m in _MACRO_REF.finditer(text)
        if m.group() not in ("{{", "}}") and not m.group().startswith("$")
    )


def _translate(value: Any) -> Any:
    """`${affiliate_secret:NAME}` becomes `${secret:affiliate_secret.NAME}`: the action of a
    store postback is built with a resolver that knows only its own affiliate's secrets, and
    the prefix keeps the ops resolver from ever answering it (an admin's send-test of the
    postback sent the ops secret NAME to the affiliate's destination; red team)."""
    if isinstance(value, str):
        return _AFFILIATE_SECRET.sub(
            lambda m: "${secret:" + AFFILIATE_PREFIX + m.group(1) + "}", value
        )
    if isinstance(value, Mapping):
        return {k: _translate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_translate(v) for v in value]
    return value


def build_postback(stored: StoredPostback, goals_enabled: bool) -> StoreLoadedPostback:
    """The store row as a rule-file postback, validated by the loader's models; InputError
    (the loader's message, `field` its dotted key) when it is not valid."""
    secret_names(stored.body.get("action"))
    if (count := macro_count(stored.body.get("action"))) > MAX_MACROS:
        raise InputError(
            f"{count} macro references: an affiliate postback may hold at most {MAX_MACROS}",
            "action",
        )
    item = {k: _translate(v) if k == "action" else v for k, v in stored.body.items()}
    item.update(
        id=stored.id,
        affiliate=stored.affiliate,
        status="active" if stored.status == "active" else "disabled",
        created_at=stored.created_at,
    )
    raw = {"offer": stored.offer, "goals_enabled": goals_enabled, "postbacks": [item]}
    try:
        rule_file = RuleFile.model_validate(raw)
    except ValidationError as err:
        issue = next(pydantic_issues(STORE_FILE, raw, err))
        detail = err.errors(include_url=False)[0]
        loc = [str(p) for p in detail["loc"] if not isinstance(p, int)]
        loc = loc[1:] if loc[:1] == ["postbacks"] else loc
        if loc[:1] == ["action"] and len(loc) > 1 and loc[1] in BUILDERS:
            del loc[1]  # the union's tag is not a key the caller wrote
        field = ".".join(loc) or None
        raise InputError(issue.message, field) from err
    postback: Postback = rule_file.postbacks[0]
    return StoreLoadedPostback(postback, rule_file.offer, goals_enabled, STORE_FILE, 0, stored)


def store_view(stored: StoredPostback, goals_enabled: bool) -> dict[str, Any]:
    """A store postback in the one JSON shape (secret references shown, values never held)."""
    body = stored.body
    action = dict(body.get("action") or {})
    kind = action.pop("type", None)
    goal = body.get("goal")
    return {
        "id": stored.id,
        "offer": stored.offer,
        "trigger": body.get("trigger"),
        "trigger_settings": {
            "affiliate": stored.affiliate,
            "goal": goal,
            "goal_evaluated": goal is not None and goals_enabled,
            "when": body.get("when"),
        },
        "action": kind,
        "action_settings": mask(action),
        "status": stored.status,
        "status_reason": stored.status_reason,
        "created_at": iso(stored.created_at),
        "author": body.get("author"),
        "source": "store",
        "file": None,
        "line": None,
        "updated_at": iso(stored.updated_at),
    }


def file_view(lp: LoadedPostback) -> dict[str, Any]:
    """A file postback in the same shape."""
    row = postback_row(lp)
    row.update(status_reason=None, source="file", updated_at=None)
    return row


def view(lp: LoadedPostback) -> dict[str, Any]:
    if isinstance(lp, StoreLoadedPostback):
        return store_view(lp.stored, lp.goals_enabled)
    return file_view(lp)
