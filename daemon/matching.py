"""Which postbacks fire for one arrival (SPEC 7.2), through the (offer, trigger) index.

The cost per conversion is the number of active postbacks of its offer and trigger, whatever the
size of `rules.d/`; store postbacks add only those of the conversion's own affiliate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from daemon.conditions import compile_condition, is_truthy, prepare_data, prepare_plain
from daemon.errors import ConditionError, ConditionEvalError
from daemon.loader import LoadedPostback, RuleSet
from daemon.log import get_logger
from daemon.models import Conversion, RuleData, Trigger
from daemon.rules import ANY_AFFILIATE

log = get_logger("postbackd.matching")


def match(rules: RuleSet, conversion: Conversion, data: Mapping[str, Any]) -> list[LoadedPostback]:
    """Every active postback that fires for this conversion's trigger, by id."""
    fired = []
    goal = conversion.fields.get("goal")
    prepared: Any = None  # converted once for every condition of this conversion
    handle: Any = None  # prepared's engine data
    candidates = rules.active.get((conversion.offer, conversion.trigger), ())
    if rules.by_affiliate:  # store postbacks of this conversion's affiliate (ids above files')
        own = (conversion.offer, conversion.trigger, conversion.affiliate)
        candidates += rules.by_affiliate.get(own, ())
    affiliate = conversion.affiliate
    # Rule data's members that are not null, when the engine would take them as they are: what
    # a condition's text_test reads (the engine then need not be given the data at all).
    members = data.present if type(data) is RuleData and data.plain else None
    for lp in candidates:
        pb = lp.postback
        if pb.affiliate != ANY_AFFILIATE and pb.affiliate != affiliate:
            continue
        if lp.goals_enabled and pb.goal is not None and pb.goal != goal:
            continue
        condition = pb.when  # (Postback.condition, without its property call)
        if condition is not None:
            test = condition.text_test
            if test is not None and members is not None:
                holds = test(members)
                if holds is not None:  # decided without the engine
                    if holds:
                        fired.append(lp)
                    continue
            if prepared is None:
                prepared = _prepare(data)
                handle = None if prepared is _UNUSABLE else prepared.handle
            if prepared is _UNUSABLE:
                continue
            evaluate = condition.evaluate
            if evaluate is None:  # a literal
                if not condition.truthy(prepared):
                    continue
            else:
                # Condition.truthy inlined: the engine called directly. A failure is left to
                # truthy, which evaluates again (the same data, the same error: evaluation is
                # pure) and logs it as it always did.
                try:
                    result = evaluate(handle)
                    holds = result if type(result) is bool else is_truthy(result)
                except Exception:
                    holds = condition.truthy(prepared)
                if not holds:
                    continue
        fired.append(lp)
    return fired


_UNUSABLE = object()


def _prepare(data: Mapping[str, Any]) -> Any:
    # Rule data carries its members that are not null (what prepare_data would keep of it).
    present, plain = (data.present, data.plain) if type(data) is RuleData else (None, False)
    try:
        if present is not None and plain:  # what the engine takes as it is: no walk
            return prepare_plain(present)
        return prepare_data(data if present is None else present)
    except ConditionEvalError as err:  # data no condition may read: none of them fires
        log.warning("condition_error", error_type=err.error_type, operator=None)
        return _UNUSABLE


@dataclass(frozen=True)
class Verdict:
    postback: LoadedPostback
    fires: bool
    reason: str | None = None  # the first check that failed


def explain(
    rules: RuleSet, conversion: Conversion, data: Mapping[str, Any], trigger: Trigger | None
) -> list[Verdict]:
    """For every postback of the conversion's offer: does it fire, and if not, why not.
    `trigger` is None when the arrival fires nothing (duplicate or stale)."""
    return [
        _verdict(lp, conversion, data, trigger) for lp in rules.offers.get(conversion.offer, ())
    ]


def _verdict(
    lp: LoadedPostback, conversion: Conversion, data: Mapping[str, Any], trigger: Trigger | None
) -> Verdict:
    pb = lp.postback
    goal = conversion.fields.get("goal")
    if not pb.active:
        return Verdict(lp, False, "postback is disabled")
    if trigger is None:
        return Verdict(lp, False, "this arrival fires no trigger")
    if pb.trigger != trigger:
        return Verdict(
            lp, False, f"trigger is {pb.trigger.value}, the arrival's is {trigger.value}"
        )
    if pb.affiliate != ANY_AFFILIATE and pb.affiliate != conversion.affiliate:
        return Verdict(
            lp, False, f"affiliate is {pb.affiliate}, the conversion's is {conversion.affiliate}"
        )
    if lp.goals_enabled and pb.goal is not None and pb.goal != goal:
        return Verdict(lp, False, f"goal is {pb.goal}, the conversion's is {goal or '(none)'}")
    if pb.condition is not None and not pb.condition.truthy(data):
        return Verdict(lp, False, f"when is false: {_failing_clause(pb.condition.logic, data)}")
    return Verdict(lp, True)


def _failing_clause(logic: Any, data: Mapping[str, Any]) -> str:
    """For a top-level `and`, the first clause that is false; else the whole condition."""
    if isinstance(logic, dict) and list(logic) == ["and"] and isinstance(logic["and"], list):
        for clause in logic["and"]:
            try:
                if not compile_condition(clause).truthy(data):
                    return json.dumps(clause, separators=(",", ":"))
            except ConditionError:
                break
    return json.dumps(logic, separators=(",", ":"))
