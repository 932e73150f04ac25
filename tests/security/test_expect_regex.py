"""Issue 13 item 7, as the attack: a destination answers `aaaa…a!` to a postback whose `expect`
is `^(a+)+$`. With a backtracking engine each character doubled the time, on the event loop:
`/healthz` froze. `expect` runs in RE2 (linear time), so the attempt ends at once as a plain
mismatch and the daemon keeps answering; patterns RE2 cannot run are refused at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import RulesError
from daemon.loader import load_rules
from tests.harness import Sink, wait_for
from tests.security.support import start

HOSTILE_BODY = "a" * 5000 + "!"  # 2**5000 steps for a backtracking engine


def rule(url: str, expect: str) -> str:
    return f"""\
offer: 1
postbacks:
  - id: 4
    trigger: conversion_done
    affiliate: "*"
    action: {{type: ping_url, url: "{url}/pb?tx={{conversion_id}}", expect: '{expect}'}}
"""


async def test_a_catastrophic_expect_against_a_hostile_body_does_not_stall(
    tmp_path: Path,
) -> None:
    sink = await Sink().start()
    sink.script = [(200, HOSTILE_BODY, {})]
    daemon = await start(tmp_path, {"o.yaml": rule(sink.url, "^(a+)+$")}, dispatch=True)
    try:
        await daemon.post(conversion_id="R1", offer=1, affiliate=7, status="approved")
        await wait_for(lambda: len(sink.received) == 1)
        health = await daemon.client.get("/healthz")
        assert health.status == 200
        await daemon.services.dispatcher.drain()
        [row] = await daemon.deliveries()
        assert row.state == "dead"
        assert row.last_reason == "unexpected_body"
    finally:
        await daemon.client.close()
        await sink.close()


@pytest.mark.parametrize("pattern", [r"^(a)\1$", "(?=ok)", "(?<!x)ok", "(a{1000}){1000}"])
def test_patterns_re2_cannot_run_in_linear_time_are_refused_at_load(
    tmp_path: Path, pattern: str
) -> None:
    (tmp_path / "o.yaml").write_text(rule("https://t.example.com", pattern))
    with pytest.raises(RulesError) as caught:
        load_rules(tmp_path, git=False)
    [issue] = caught.value.issues
    assert str(issue).startswith(
        "o.yaml:6: postback 4: action.expect: expect is not a valid regular expression: "
    )
    assert str(issue).endswith("(RE2 syntax: no backreferences or lookarounds)")
