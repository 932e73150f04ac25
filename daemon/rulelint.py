"""Mistakes a rule set can load with but should not ship with (issue 18), found before merge by
`postbackd validate` and by the `rules` editing commands.

Errors: a retired id used again or taken off the record, and, when a catalogue exists, an offer,
goal or affiliate it does not know (each with a suggestion), or goals_enabled that disagrees with
it. Warnings: a condition that reads a `var` no source can produce (with a suggestion). Pure
decisions over loaded values: the callers read the files.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.catalogue import CATALOGUE_FILE, RETIRED_FILE, Catalogue
from daemon.errors import Issue
from daemon.loader import LoadedPostback, RuleSet
from daemon.models import CANONICAL_FIELDS, CONTEXT_FIELDS
from daemon.rules import ANY_AFFILIATE

# What a condition may read: the canonical fields, the context, and `extra` (anything a source
# passes through unmapped, so any `extra.NAME` is accepted).
KNOWN_VARS = frozenset(CANONICAL_FIELDS) | frozenset(CONTEXT_FIELDS) | {"extra"}
# Operators whose second argument runs on each item of the first (its vars are the item's).
_SCOPED = frozenset({"map", "filter", "reduce", "all", "some", "none"})


@dataclass
class Findings:
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)


def suggest(name: str, known: Iterable[str], cutoff: float = 0.5) -> str:
    """` (did you mean 'payout'?)`, or nothing when no known name is close (short ids need a
    low cutoff: 24 for 42; field names a higher one: not transition for reason)."""
    close = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def vars_of(logic: Any) -> Iterator[str]:
    """Every `var` name a condition reads at the top level of the data (iteratively)."""
    stack = [logic]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict) or len(node) != 1:
            continue
        op, args = next(iter(node.items()))
        if op == "var":
            name = args[0] if isinstance(args, list) and args else args
            if isinstance(name, str) and name:
                yield name
            if isinstance(args, list):
                stack.extend(args[1:])
        elif op in _SCOPED and isinstance(args, list):
            stack.append(args[0] if args else None)
            stack.extend(args[2:])  # reduce's initial value
        else:
            stack.append(args)


def check_vars(rules: RuleSet, params: Mapping[str, str] | None = None) -> list[Issue]:
    """Warnings for vars no source produces. `params`: inbound parameter -> the canonical field
    a source maps it to (from webhooks/*.yaml), for a better hint."""
    found = []
    for lp in rules.postbacks.values():
        when = lp.postback.when
        if when is None:
            continue
        for name in sorted(set(vars_of(when.logic))):
            head = name.split(".", 1)[0]
            if head in KNOWN_VARS:
                continue
            hint = suggest(head, KNOWN_VARS, 0.75) or (
                f" (a parameter a source passes through unmapped is read as 'extra.{head}')"
            )
            if params and head in params:
                hint = f" (a source maps parameter {head!r} to {params[head]!r}: read that)"
            found.append(
                Issue(
                    lp.file, lp.line, f"when reads {name!r}, which no source provides{hint}", lp.id
                )
            )
    return found


def check_retired(
    rules: RuleSet, retired: Mapping[int, int], base_retired: Iterable[int] = ()
) -> list[Issue]:
    """A retired id used again; an id retired at the base that is no longer on the record."""
    issues = [
        Issue(
            lp.file,
            lp.line,
            f"id {pid} was retired (deleted; {RETIRED_FILE}:{retired[pid]}): ids are never "
            "reused, use a new id",
            pid,
        )
        for pid, lp in rules.postbacks.items()
        if pid in retired
    ]
    for pid in sorted(set(base_retired) - set(retired)):
        issues.append(
            Issue(RETIRED_FILE, 1, f"id {pid} was retired and is no longer listed: keep it")
        )
    return issues


def check_catalogue(rules: RuleSet, catalogue: Catalogue) -> list[Issue]:
    """Unknown offers, goals and affiliates, and goals_enabled that disagrees, when the
    catalogue exists."""
    issues: list[Issue] = []
    for lp in rules.postbacks.values():
        issues.extend(_catalogue_issues(lp, catalogue))
    for offer, postbacks in rules.offers.items():
        entry = catalogue.offers.get(offer)
        if entry is None or entry.goals_enabled is None or not postbacks:
            continue
        lp = postbacks[0]
        if lp.goals_enabled != entry.goals_enabled:
            state = "on" if entry.goals_enabled else "off"
            issues.append(
                Issue(
                    lp.file,
                    1,
                    f"offer {offer}: goals are {state} in {CATALOGUE_FILE} but "
                    f"goals_enabled is {str(lp.goals_enabled).lower()} here "
                    f"(postbackd rules goals {'enable' if entry.goals_enabled else 'disable'} "
                    f"--offer {offer} sets both)",
                )
            )
    return issues


def _catalogue_issues(lp: LoadedPostback, catalogue: Catalogue) -> Iterator[Issue]:
    pb = lp.postback
    entry = catalogue.offers.get(lp.offer)
    if entry is None:
        hint = suggest(lp.offer, catalogue.offers)
        yield Issue(lp.file, lp.line, f"unknown offer {lp.offer!r}{hint}", lp.id)
    elif pb.goal is not None and pb.goal not in entry.goals:
        known = ", ".join(entry.goals) or "none"
        hint = suggest(pb.goal, entry.goals)
        yield Issue(
            lp.file,
            lp.line,
            f"unknown goal {pb.goal!r} for offer {lp.offer}{hint} (its goals: {known})",
            lp.id,
        )
    if pb.affiliate != ANY_AFFILIATE and pb.affiliate not in catalogue.affiliates:
        hint = suggest(pb.affiliate, catalogue.affiliates)
        yield Issue(lp.file, lp.line, f"unknown affiliate {pb.affiliate!r}{hint}", lp.id)


def lint(
    rules: RuleSet,
    *,
    catalogue: Catalogue | None,
    retired: Mapping[int, int],
    base_retired: Iterable[int] = (),
    params: Mapping[str, str] | None = None,
) -> Findings:
    errors = check_retired(rules, retired, base_retired)
    if catalogue is not None:
        errors.extend(check_catalogue(rules, catalogue))
    return Findings(errors, check_vars(rules, params))
