"""The files kept beside the rules that are not rules (issue 18): the optional catalogue of
offers, goals and affiliates, and the record of retired postback ids.

``rules.d/catalogue.yaml`` (optional; when absent nothing about offers, goals or affiliates is
checked)::

    offers:
      1234: {name: Solar Leads, goals_enabled: true, goals: [lead, sale]}
    affiliates:
      42: Partner 42

``rules.d/retired-ids.yaml`` (appended by ``postbackd rules delete``; an id listed here can never
be used again, and an entry can never be removed)::

    retired:
      - 103  # deleted 2026-12-06T10:00:00Z by ops@example.com

Both are read through the loader's capped reader and YAML rules; the loader leaves them (and
H4's affiliates.yaml policy file) out of the rule files (``loader.NOT_RULE_FILES``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError

from daemon.errors import Issue, RulesError
from daemon.loader import CATALOGUE_FILE as CATALOGUE_FILE  # its file names: the loader's
from daemon.loader import RETIRED_FILE as RETIRED_FILE
from daemon.loader import pydantic_issues, read_capped
from daemon.rules import Id
from daemon.yamlfile import YamlError, YMap, load_yaml

_EMPTY_LIST = re.compile(r"^retired:[ \t]*\[[ \t]*\][ \t]*$", re.MULTILINE)
_RETIRED_HEADER = (
    "# Ids of deleted postbacks: never used again (postbackd rules delete appends here;\n"
    "# postbackd validate refuses a rule that uses one, and an entry that disappears).\n"
    "retired:\n"
)


def _keys_as_text(value: Any) -> Any:
    """Mapping keys written as numbers (`1234:`) are ids like any other."""
    if isinstance(value, dict):
        return {
            str(k).strip() if not isinstance(k, str) else k.strip(): v for k, v in value.items()
        }
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OfferEntry(_Model):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    goals_enabled: StrictBool | None = None
    goals: list[Id] = Field(default_factory=list)


class Catalogue(_Model):
    offers: Annotated[dict[Id, OfferEntry], BeforeValidator(_keys_as_text)] = Field(
        default_factory=dict
    )
    affiliates: Annotated[
        dict[Id, Annotated[str, Field(min_length=1, max_length=200)]],
        BeforeValidator(_keys_as_text),
    ] = Field(default_factory=dict)

    def offer_name(self, offer: str) -> str | None:
        entry = self.offers.get(offer)
        return entry.name if entry else None

    def affiliate_name(self, affiliate: str) -> str | None:
        return self.affiliates.get(affiliate)


def _read(root: Path, name: str) -> tuple[Any, bool]:
    """The YAML of root/name (None when empty), and whether the file exists."""
    path = root / name
    if not path.is_file():
        return None, False
    issues: list[Issue] = []
    data = read_capped(path, name, issues)
    if data is None:
        raise RulesError(issues)
    try:
        return load_yaml(data), True
    except YamlError as err:
        raise RulesError([Issue(name, err.line, err.message)]) from err


def load_catalogue(root: Path) -> Catalogue | None:
    """The catalogue of `root`, or None when there is none; RulesError when it is invalid."""
    raw, exists = _read(root, CATALOGUE_FILE)
    if not exists:
        return None
    if raw is None:
        return Catalogue()
    if not isinstance(raw, YMap):
        raise RulesError([Issue(CATALOGUE_FILE, 1, "the catalogue must be a mapping")])
    try:
        return Catalogue.model_validate(raw)
    except ValidationError as err:
        raise RulesError(list(pydantic_issues(CATALOGUE_FILE, raw, err))) from err


def load_retired(root: Path) -> dict[int, int]:
    """Retired id -> the line that retires it; RulesError when the file is invalid."""
    raw, exists = _read(root, RETIRED_FILE)
    if not exists or raw is None:
        return {}
    items = raw.get("retired") if isinstance(raw, YMap) else None
    if not isinstance(raw, YMap) or set(raw) - {"retired"}:
        raise RulesError([Issue(RETIRED_FILE, 1, "expected one key, `retired:`, a list of ids")])
    if items is None:
        return {}
    if not isinstance(items, list):
        raise RulesError([Issue(RETIRED_FILE, raw.lines["retired"], "`retired` is not a list")])
    found: dict[int, int] = {}
    issues = []
    for n, item in enumerate(items):
        line = items.lines[n] if hasattr(items, "lines") else 1
        if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            issues.append(Issue(RETIRED_FILE, line, f"not a postback id: {item!r}"))
            continue
        found.setdefault(int(item), line)
    if issues:
        raise RulesError(issues)
    return found


def retire_text(current: str | None, ids: list[int], who: str, now: datetime) -> str:
    """The retired-ids file with `ids` appended (created with its header when absent)."""
    text = current if current is not None else _RETIRED_HEADER
    text = _EMPTY_LIST.sub("retired:", text)  # `retired: []` becomes a block list
    if text and not text.endswith("\n"):
        text += "\n"
    if "retired:" not in text:
        text += "retired:\n"
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    by = f" by {who}" if who else ""
    return text + "".join(f"  - {pid}  # deleted {stamp}{by}\n" for pid in ids)
