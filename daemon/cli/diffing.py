"""What a rules change does to real traffic: a sample of conversions evaluated against the rules
at a base commit and now, and the deliveries the change adds, removes or changes."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from daemon.cli.ruletests import FIXED_NOW
from daemon.errors import InputError
from daemon.explain import Evaluation, evaluate
from daemon.loader import RuleSet
from daemon.models import Conversion, Status, conversion_from_mapping
from daemon.userjson import json_value

REQUEST_PARTS = ("method", "url", "headers", "body")
Kind = Literal["added", "removed", "changed"]
KINDS: tuple[Kind, ...] = ("added", "removed", "changed")


class SampleError(ValueError):
    """A line of the conversions file that is not a conversion (names `file:line`)."""


@dataclass(frozen=True)
class Sample:
    line: int
    conversion: Conversion
    source: str
    previous_status: Status | None


@dataclass(frozen=True)
class Outcome:
    """One postback for one sample conversion: the request it would send, or why it cannot."""

    request: dict[str, Any] | None
    error: str | None = None


@dataclass(frozen=True)
class Effect:
    kind: Kind
    postback_id: int
    sample: Sample
    before: Outcome | None
    after: Outcome | None
    parts: tuple[str, ...] = ()  # for `changed`: method, url, headers, body, error
    why_not: str | None = None  # for `removed`: why it no longer fires


@dataclass
class Report:
    base: str
    samples: int
    effects: list[Effect] = field(default_factory=list)
    rule_changes: dict[int, str] = field(default_factory=dict)  # id -> added|removed|changed

    @property
    def unexercised(self) -> dict[int, str]:
        """Rule changes that no conversion of the sample reached."""
        seen = {e.postback_id for e in self.effects}
        return {pid: kind for pid, kind in self.rule_changes.items() if pid not in seen}


def read_samples(path: Path) -> list[Sample]:
    """One JSON object per line (the explain format, plus an optional `previous_status`)."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SampleError(f"{path}: cannot read: {err}") from err
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        samples.append(_sample(f"{path}:{number}", number, line))
    if not samples:
        raise SampleError(f"{path}: no conversions (one JSON object per line)")
    return samples


def _sample(where: str, number: int, line: str) -> Sample:
    try:
        obj = json_value(line)
    except json.JSONDecodeError as err:
        raise SampleError(f"{where}: not JSON: {err.msg}") from err
    except ValueError as err:
        raise SampleError(f"{where}: not JSON: {err}") from err
    if not isinstance(obj, dict):
        raise SampleError(f"{where}: expected a JSON object")
    previous = obj.pop("previous_status", None)
    try:
        status = Status(previous) if previous is not None else None
    except ValueError as err:
        raise SampleError(f"{where}: previous_status: unknown status {previous!r}") from err
    try:
        conversion, source = conversion_from_mapping(obj)
    except InputError as err:
        raise SampleError(f"{where}: {err.field}: {err.message}") from err
    return Sample(number, conversion, source, status)


def diff(base: RuleSet, head: RuleSet, samples: Iterable[Sample], ref: str) -> Report:
    """Every delivery that differs between `base` and `head` for each sample conversion."""
    samples = list(samples)
    report = Report(ref, len(samples), rule_changes=rule_changes(base, head))
    for sample in samples:
        now = _evaluate(head, sample)
        before, after, reasons = _outcomes(_evaluate(base, sample)), _outcomes(now), _reasons(now)
        for pid in sorted(set(before) | set(after)):
            effect = _effect(pid, sample, before.get(pid), after.get(pid), reasons.get(pid))
            if effect is not None:
                report.effects.append(effect)
    return report


def _evaluate(rules: RuleSet, sample: Sample) -> Evaluation:
    return evaluate(
        rules,
        sample.conversion,
        source=sample.source,
        previous_status=sample.previous_status,
        now=FIXED_NOW,  # the same timestamp macro on both sides
    )


def _outcomes(ev: Evaluation) -> dict[int, Outcome]:
    return {
        p.verdict.postback.id: Outcome(p.request.as_dict() if p.request else None, p.error)
        for p in ev.planned
        if p.verdict.fires
    }


def _reasons(ev: Evaluation) -> dict[int, str]:
    return {p.verdict.postback.id: p.verdict.reason or "" for p in ev.planned}


def _effect(
    pid: int, sample: Sample, before: Outcome | None, after: Outcome | None, reason: str | None
) -> Effect | None:
    if before is None and after is not None:
        return Effect("added", pid, sample, None, after)
    if after is None and before is not None:
        return Effect("removed", pid, sample, before, None, why_not=reason or "postback removed")
    assert before is not None
    assert after is not None
    parts = changed_parts(before, after)
    return Effect("changed", pid, sample, before, after, parts) if parts else None


def changed_parts(before: Outcome, after: Outcome) -> tuple[str, ...]:
    old, new = before.request or {}, after.request or {}
    parts = [p for p in REQUEST_PARTS if old.get(p) != new.get(p)]
    if before.error != after.error:
        parts.append("error")
    return tuple(parts)


def rule_changes(base: RuleSet, head: RuleSet) -> dict[int, str]:
    out = {}
    for pid in sorted(set(base.postbacks) | set(head.postbacks)):
        old, new = base.postbacks.get(pid), head.postbacks.get(pid)
        if old is None:
            out[pid] = "added"
        elif new is None:
            out[pid] = "removed"
        elif (old.postback, old.offer, old.goals_enabled) != (
            new.postback,
            new.offer,
            new.goals_enabled,
        ):
            out[pid] = "changed"
    return out


# --- output -------------------------------------------------------------------------------


def report_json(report: Report) -> dict[str, Any]:
    counts = {k: sum(e.kind == k for e in report.effects) for k in KINDS}
    return {
        "base": report.base,
        "conversions": report.samples,
        "summary": counts,
        "effects": [
            {
                "kind": e.kind,
                "postback": e.postback_id,
                "conversion_id": e.sample.conversion.conversion_id,
                "source": e.sample.source,
                "line": e.sample.line,
                "parts": list(e.parts),
                "before": _outcome_json(e.before),
                "after": _outcome_json(e.after),
                "why_not": e.why_not,
            }
            for e in report.effects
        ],
        "unexercised": [{"postback": p, "change": k} for p, k in report.unexercised.items()],
    }


def _outcome_json(outcome: Outcome | None) -> dict[str, Any] | None:
    return None if outcome is None else {"request": outcome.request, "error": outcome.error}


def report_text(report: Report, examples: int = 3) -> str:
    """A short summary: per postback, what changes for how many conversions, with one example."""
    effects = report.effects
    head = (
        f"{len(effects)} delivery change(s) on {report.samples} conversion(s) against "
        f"{report.base}: "
        + ", ".join(
            f"{sum(e.kind == k for e in effects)} {k}" for k in ("added", "removed", "changed")
        )
    )
    lines = [head]
    groups: dict[tuple[int, Kind], list[Effect]] = {}
    for e in effects:
        groups.setdefault((e.postback_id, e.kind), []).append(e)
    for (pid, kind), group in sorted(groups.items()):
        ids = ", ".join(e.sample.conversion.conversion_id for e in group[:examples])
        more = f" and {len(group) - examples} more" if len(group) > examples else ""
        lines.append(f"postback {pid} {kind} for {len(group)} conversion(s): {ids}{more}")
        lines.extend(f"    {line}" for line in _detail(group[0]))
    if report.unexercised:
        listed = ", ".join(f"{p} ({k})" for p, k in report.unexercised.items())
        lines.append(f"rule changes no sample conversion reached: {listed}")
    if not effects and not report.rule_changes:
        lines.append("no rule changes")
    return "\n".join(lines)


def _detail(effect: Effect) -> list[str]:
    if effect.kind == "added":
        return ["+ " + _request_line(effect.after)]
    if effect.kind == "removed":
        return ["- " + _request_line(effect.before), f"now: {effect.why_not}"]
    assert effect.before is not None
    assert effect.after is not None
    old, new = effect.before.request or {}, effect.after.request or {}
    out = []
    for part in effect.parts:
        if part == "headers":
            out.extend(_header_changes(old.get("headers") or {}, new.get("headers") or {}))
        elif part == "error":
            out.append(f"error: {effect.before.error or '-'} -> {effect.after.error or '-'}")
        else:
            out.append(f"{part}: {old.get(part)} -> {new.get(part)}")
    return out


def _request_line(outcome: Outcome | None) -> str:
    if outcome is None or outcome.request is None:
        return f"cannot render: {outcome.error if outcome else '?'}"
    req = outcome.request
    body = f" body {req['body']}" if req.get("body") is not None else ""
    return f"{req['method']} {req['url']}{body}"


def _header_changes(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    out = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            out.append(f"header {name}: {old.get(name, '(none)')} -> {new.get(name, '(none)')}")
    return out
