"""One object for equal parts of many postbacks (memory and load time of big rule sets).

A rule set of 100,000 postbacks repeats the same few authors, actions and creation times
thousands of times. The models are immutable (frozen), so postbacks whose parts are equal can
hold the very same part objects: about a third of the objects of a postback go, the parsed-rules
cache (daemon.rulecache) pickles each shared part once, and a runtime builds one action object
per distinct action (daemon.reload.build_runtime). Conditions and templates are shared where
they are compiled (daemon.conditions, daemon.macros, daemon.urltemplate).

Parts are compared by their pickled form, which holds every field value exactly (secrets
included, never masked), so two parts are shared only when nothing about them differs.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any

from daemon.rules import RuleFile

_MAX = 1 << 17  # parts remembered; past that the pool starts again (only sharing is lost)


class Pool:
    """Equal parts seen so far, by kind and exact content."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, bytes], Any] = {}
        self._sets: dict[frozenset[str], set[str]] = {}

    def fields_set(self, given: set[str]) -> set[str]:
        return self._sets.setdefault(frozenset(given), given)

    def share(self, kind: str, value: Any) -> Any:
        try:
            key = (kind, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        except (pickle.PicklingError, TypeError, AttributeError):
            return value  # not comparable this way: kept as it is
        found = self._parts.get(key)
        if found is not None:
            return found
        if len(self._parts) >= _MAX:
            self._parts.clear()
        self._parts[key] = value
        return value


def share_parts(rule_file: RuleFile, pool: Pool) -> None:
    """Replace each postback's author, action and creation time by the pool's equal object,
    and intern its short strings. The models are frozen: their fields are set in place (same
    values, other objects), which is what pydantic itself does when it builds them."""
    for postback in rule_file.postbacks:
        fields = postback.__dict__
        for name, kind in (("author", "author"), ("action", "action"), ("retry", "retry")):
            value = fields.get(name)
            if value is not None:
                fields[name] = pool.share(kind, value)
        created = fields.get("created_at")
        if created is not None:
            fields["created_at"] = pool.share("time", created)
        for name in ("affiliate", "goal"):
            value = fields.get(name)
            if type(value) is str and len(value) <= 64:
                fields[name] = sys.intern(value)
        # Which fields the file set: a set of its own per model (about 700 bytes) otherwise.
        # Shared, never changed: pydantic writes it only when a field is assigned (frozen here)
        # and model_copy copies it first.
        given = postback.__pydantic_fields_set__
        object.__setattr__(postback, "__pydantic_fields_set__", pool.fields_set(given))
