"""Red team (issue 15): an affiliate filling the store through the audit trail. Every write of a
postback adds an audit row of up to twice its 64 KiB body, and nothing bounded how often an
affiliate could write: 300 PATCHes in 4 s stored 34 MB. The policy's max_writes_per_minute
(default 60, per affiliate and node) bounds the writes that reach the store; a refused or failed
write does not count, admins are not counted, and one affiliate's budget is its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.affiliates.kit import ADMIN, AFF_A, AFF_B, SETTINGS, Api, ping, rules
from tests.harness import Daemon, FakeClock, Sink, start_daemon

POLICY = "max_postbacks: 100\nmax_writes_per_minute: 5\n"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def daemon(tmp_path: Path, sink: Sink, clock: FakeClock) -> AsyncIterator[Daemon]:
    d = await start_daemon(
        tmp_path, rules(sink, POLICY), settings=SETTINGS, dispatch=False, clock=clock
    )
    yield d
    await d.client.close()


async def test_writes_past_the_minutes_budget_are_429_and_write_nothing(
    daemon: Daemon, sink: Sink, clock: FakeClock
) -> None:
    api = Api(daemon)
    pid = (await api.create(AFF_A, ping(sink)))["id"]
    path = f"/api/v1/postbacks/{pid}"
    for i in range(3):
        assert (await api("PATCH", path, AFF_A, {"goal": f"g{i}"}))[0] == 200
    # Refused writes do not count: a 422 of the policy, a 400, a PATCH that changes nothing.
    assert (await api("POST", "/api/v1/postbacks", AFF_A, ping(sink, offer=9)))[0] == 422
    assert (await api("PATCH", path, AFF_A, {"goal": "g2"}))[0] == 200
    assert (await api("POST", "/api/v1/postbacks", AFF_A, {"offer": 7}))[0] == 400
    assert (await api("POST", f"{path}/status", AFF_A, {"status": "disabled"}))[0] == 200
    # Five written: the sixth, whatever it is, is a 429 and writes nothing.
    dup = {"from_offer": 7, "to_offer": 8, "ids": [pid]}
    for method, target, body in (
        ("PATCH", path, {"goal": "late"}),
        ("POST", "/api/v1/postbacks", ping(sink)),
        ("POST", "/api/v1/postbacks/duplicate", dup),
        ("POST", f"{path}/status", {"status": "active"}),
        ("DELETE", path, {"confirm": pid}),
    ):
        status, answer = await api(method, target, AFF_A, body)
        assert status == 429, (method, target, answer)
        assert "max_writes_per_minute" in answer["error"]
    _, trail = await api("GET", f"{path}/history", AFF_A)
    assert len(trail["history"]) == 5
    assert (await api("GET", "/api/v1/affiliate/limits", AFF_A))[1]["used"] == 1
    # B's budget is its own, an admin is not counted.
    assert (await api("POST", "/api/v1/postbacks", AFF_B, ping(sink, offer=8)))[0] == 201
    assert (await api("POST", f"{path}/status", ADMIN, {"status": "active"}))[0] == 200
    # A minute later A writes again.
    clock.advance(61)
    assert (await api("PATCH", path, AFF_A, {"goal": "later"}))[0] == 200


async def test_a_duplicate_goes_whole_or_not_at_all(daemon: Daemon, sink: Sink) -> None:
    api = Api(daemon)
    ids = [(await api.create(AFF_A, ping(sink, path=f"p{i}")))["id"] for i in range(3)]
    dup = {"from_offer": 7, "to_offer": 8, "ids": ids}
    status, answer = await api("POST", "/api/v1/postbacks/duplicate", AFF_A, dup)
    assert status == 429, answer
    assert (await api("GET", "/api/v1/affiliate/limits", AFF_A))[1]["used"] == 3
