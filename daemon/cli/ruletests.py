"""Rule test cases (`rules.d/tests/*.yaml`), run by `postbackd test` in a rules repository's CI.

A file holds a list of cases under `cases:`::

    cases:
      - name: approved sale from affiliate 42 pings the tracker
        conversion: {conversion_id: T1, offer: 1234, affiliate: 42, status: approved, payout: 12.5}
        previous_status: pending          # optional: the status already stored
        fires: [101, 103]                 # exactly these postback ids fire
        requests:                         # optional: what a fired postback sends
          101:
            url: https://tracker.example.com/pb?tx=T1
            method: GET                   # optional
            body: '{"tx":"T1"}'           # optional
            headers: {X-Key: "****"}      # optional, only the headers named are compared
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from daemon.errors import InputError, Issue, RulesError
from daemon.explain import evaluate
from daemon.loader import TESTS_DIR, RuleSet, is_ignored_name, pydantic_issues
from daemon.models import Status, conversion_from_mapping
from daemon.yamlfile import YamlError, load_yaml

FIXED_NOW = datetime(2026, 1, 1, tzinfo=UTC)  # so rendered requests are reproducible


class ExpectedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None
    method: str | None = None
    body: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    conversion: dict[str, Any]
    previous_status: Status | None = None
    fires: list[StrictInt]
    requests: dict[int, ExpectedRequest] = Field(default_factory=dict)


class CaseFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cases: list[Case] = Field(min_length=1)


@dataclass
class CaseResult:
    file: str
    line: int
    name: str
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def load_cases(rules_dir: Path) -> list[tuple[str, int, Case]]:
    """Every case under rules_dir/tests/, with its file and line; RulesError if any is bad."""
    tests = rules_dir / TESTS_DIR
    found: list[tuple[str, int, Case]] = []
    issues: list[Issue] = []
    if not tests.is_dir():
        return found
    for path in sorted(tests.rglob("*")):
        if not path.is_file() or is_ignored_name(path.name) or path.suffix not in (".yaml", ".yml"):
            continue
        rel = path.relative_to(rules_dir).as_posix()
        try:
            raw = load_yaml(path.read_bytes())
            parsed = CaseFile.model_validate(raw)
        except YamlError as err:
            issues.append(Issue(rel, err.line, err.message))
            continue
        except ValidationError as err:
            issues.extend(pydantic_issues(rel, raw, err))
            continue
        lines = raw["cases"].lines
        found.extend((rel, lines[i], case) for i, case in enumerate(parsed.cases))
    if issues:
        raise RulesError(issues)
    return found


def run_case(rules: RuleSet, file: str, line: int, case: Case) -> CaseResult:
    result = CaseResult(file, line, case.name)
    try:
        conversion, source = conversion_from_mapping(case.conversion)
    except InputError as err:
        result.failures.append(f"conversion: {err.field}: {err.message}")
        return result
    ev = evaluate(
        rules, conversion, source=source, previous_status=case.previous_status, now=FIXED_NOW
    )
    if sorted(ev.fired) != sorted(case.fires):
        why = {p.verdict.postback.id: p.verdict.reason for p in ev.planned if not p.verdict.fires}
        missing = [
            f"{pid} ({why.get(pid) or 'not a postback of this offer'})"
            for pid in sorted(set(case.fires) - set(ev.fired))
        ]
        extra = sorted(set(ev.fired) - set(case.fires))
        if missing:
            result.failures.append("expected to fire but did not: " + ", ".join(missing))
        if extra:
            result.failures.append(f"fired but not expected: {', '.join(map(str, extra))}")
    planned = {p.verdict.postback.id: p for p in ev.planned if p.verdict.fires}
    for pid, expected in sorted(case.requests.items()):
        p = planned.get(pid)
        if p is None:
            result.failures.append(f"postback {pid}: no request (it does not fire)")
        elif p.request is None:
            result.failures.append(f"postback {pid}: cannot render: {p.error}")
        else:
            result.failures.extend(_compare(pid, expected, p.request.as_dict()))
    return result


def _compare(pid: int, expected: ExpectedRequest, got: dict[str, Any]) -> list[str]:
    out = []
    for key in ("url", "method", "body"):
        want = getattr(expected, key)
        if want is not None and want != got[key]:
            out.append(f"postback {pid}: {key}\n    expected: {want}\n    got:      {got[key]}")
    for name, want in expected.headers.items():
        have = {k.lower(): v for k, v in got["headers"].items()}.get(name.lower())
        if have != want:
            out.append(f"postback {pid}: header {name}: expected {want!r}, got {have!r}")
    return out
