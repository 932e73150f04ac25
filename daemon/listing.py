"""The postback list of SPEC 11 and 12: one row per postback with the platform's columns (action
settings with secrets masked), short summaries of conditions and settings, and plain tables."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from daemon.actions.base import MASK
from daemon.loader import LoadedPostback
from daemon.macros import Template
from daemon.rules import Author

COLUMNS = (
    "ID",
    "Trigger",
    "Trigger Settings",
    "Action",
    "Action Settings",
    "Status",
    "Created At",
    "Author",
)
# Table cells longer than these are cut; --format json shows them whole.
SETTINGS_WIDTH = 80
TRIGGER_WIDTH = 60
_SECRET_REF = re.compile(r"\$\{secret:[^}]*\}")
# Setting and header names whose values are credentials whatever they hold.
_SENSITIVE = re.compile(
    r"(authorization|proxy-authorization|cookie|password|passwd|pass|api[-_]?key|x-api-key"
    r"|.*token.*|.*secret.*|.*credential.*|.*private[-_]?key.*)",
    re.IGNORECASE,
)
_COMPARISONS = ("==", "===", "!=", "!==", ">", ">=", "<", "<=")


def postback_row(lp: LoadedPostback) -> dict[str, Any]:
    """One postback as the list shows it (JSON values; secrets masked)."""
    pb = lp.postback
    return {
        "id": pb.id,
        "offer": lp.offer,
        "trigger": pb.trigger.value,
        "trigger_settings": {
            "affiliate": pb.affiliate,
            "goal": pb.goal,
            "goal_evaluated": pb.goal is not None and lp.goals_enabled,
            "when": pb.when.logic if pb.when is not None else None,
        },
        "action": pb.action.type,
        "action_settings": masked_settings(pb.action),
        "status": pb.status,
        "created_at": iso(pb.created_at),
        "author": author_dict(pb.author),
        "file": lp.file,
        "line": lp.line,
    }


def iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def author_dict(author: Author | None) -> dict[str, Any] | None:
    if author is None:
        return None
    return {"id": author.id, "name": author.name, "affiliate": author.affiliate}


def masked_settings(settings: Any) -> dict[str, Any]:
    """The settings as written (defaults left out), every secret and credential as ****."""
    data = settings.model_dump(
        mode="json", by_alias=True, exclude_unset=True, fallback=_source_text
    )
    data.pop("type", None)
    masked: dict[str, Any] = mask(data)
    return masked


def _source_text(value: Any) -> Any:
    """What pydantic cannot serialize on its own: templates inside free-form JSON bodies."""
    return value.source if isinstance(value, Template) else str(value)


def mask(value: Any, key: str = "") -> Any:
    """`${secret:NAME}` as ****; values under credential-like names as ****; URL passwords."""
    if isinstance(value, Mapping):
        return {str(k): mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, key) for v in value]
    if isinstance(value, str):
        if key and _SENSITIVE.fullmatch(key):
            return MASK
        return _mask_url_password(_SECRET_REF.sub(MASK, value))
    return value


def _mask_url_password(text: str) -> str:
    if "://" not in text or "@" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if parts.password is None:
        return text
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{MASK}@{host}"))


def literal_credentials(settings: Mapping[str, Any], prefix: str = "action") -> list[str]:
    """Dotted keys whose name says credential but whose value is written out in the rule
    rather than referenced as ${secret:NAME} (it would sit in git and in every diff)."""
    found = []
    for key, value in settings.items():
        where = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            found.extend(literal_credentials(value, where))
        elif isinstance(value, str) and _SENSITIVE.fullmatch(str(key)) and _literal(value):
            found.append(where)
    return found


def _literal(value: str) -> bool:
    """Text with neither a secret reference nor a macro."""
    return bool(value.strip()) and not _SECRET_REF.search(value) and "{" not in value


# --- summaries for the table --------------------------------------------------------------


def trigger_settings_text(row: Mapping[str, Any]) -> str:
    ts = row["trigger_settings"]
    parts = [f"affiliate {ts['affiliate']}"]
    if ts["goal"] is not None:
        parts.append(f"goal {ts['goal']}" + ("" if ts["goal_evaluated"] else " (goals off)"))
    if ts["when"] is not None:
        parts.append(f"when {summarise_condition(ts['when'])}")
    return ", ".join(parts)


def summarise_condition(logic: Any) -> str:
    """JsonLogic as a short infix expression (`payout >= 5 and sub1 in ["fb", "tt"]`)."""
    if isinstance(logic, Mapping) and len(logic) == 1:
        op, args = next(iter(logic.items()))
        op = str(op)
        if op == "var":
            return str(args[0] if isinstance(args, list) and args else args)
        items = list(args) if isinstance(args, list) else [args]
        if op in _COMPARISONS and len(items) == 2:
            return f"{_term(items[0])} {op} {_term(items[1])}"
        if op in ("and", "or") and items:
            return f" {op} ".join(_term(a) for a in items)
        if op in ("!", "!!") and len(items) == 1:
            return ("not " if op == "!" else "") + _term(items[0])
        if op == "in" and len(items) == 2:
            return f"{_term(items[0])} in {_term(items[1])}"
    if isinstance(logic, list):
        return "[" + ", ".join(_term(a) for a in logic) + "]"
    return json.dumps(logic, separators=(",", ":"), default=str)


def _term(logic: Any) -> str:
    text = summarise_condition(logic)
    if isinstance(logic, Mapping) and len(logic) == 1 and str(next(iter(logic))) in ("and", "or"):
        return f"({text})"
    return text


def action_settings_text(settings: Mapping[str, Any]) -> str:
    """`POST https://... ; headers: X-Api-Key=**** ; json: click_id=..., ...`"""
    rest = dict(settings)
    parts = []
    url = rest.pop("url", None)
    method = rest.pop("method", None)
    if url is not None:
        parts.append(f"{method or 'GET'} {url}")
    elif method is not None:
        rest["method"] = method
    for key, value in rest.items():
        if isinstance(value, Mapping):
            inner = ", ".join(f"{k}={_compact(v)}" for k, v in value.items())
            parts.append(f"{key}: {inner}")
        else:
            parts.append(f"{key}={_compact(value)}")
    return "; ".join(parts)


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def author_text(author: Mapping[str, Any] | None) -> str:
    if author is None:
        return "-"
    who = f"{author['name']} ({author['id']}"
    return who + (f", affiliate {author['affiliate']})" if author.get("affiliate") else ")")


def table_cells(row: Mapping[str, Any]) -> list[str]:
    """The eight columns of one row, as text."""
    return [
        str(row["id"]),
        row["trigger"],
        cut(trigger_settings_text(row), TRIGGER_WIDTH),
        row["action"],
        cut(action_settings_text(row["action_settings"]), SETTINGS_WIDTH),
        row["status"],
        row["created_at"] or "-",
        author_text(row["author"]),
    ]


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, a header line first (like `kubectl get`)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
