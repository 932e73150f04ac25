"""Red team (issue 15): an affiliate making the daemon do expensive work. A template of hundreds
of macros turned one conversion (whose sub values the affiliate controls through its clicks)
into megabytes rendered and stored per attempt; the macros of an affiliate postback are bounded
now. Duplicate's ids and the body are bounded already."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.affiliates.records import MAX_MACROS
from daemon.affiliates.service import HISTORY_PAGE
from tests.affiliates.kit import AFF_A, AFF_B, SETTINGS, Api, ping, rules
from tests.harness import Daemon, Sink, start_daemon


@pytest.fixture
async def api(tmp_path: Path, sink: Sink) -> AsyncIterator[Api]:
    policy = "max_writes_per_minute: 1000\n"  # the history test writes 106 times
    d: Daemon = await start_daemon(tmp_path, rules(sink, policy), settings=SETTINGS, dispatch=False)
    yield Api(d)
    await d.client.close()


async def used(api: Api) -> int:
    _, limits = await api("GET", "/api/v1/affiliate/limits", AFF_A)
    count: int = limits["used"]
    return count


async def test_a_template_of_hundreds_of_macros_is_refused(api: Api, sink: Sink) -> None:
    amplifier = ping(sink, path="big")
    amplifier["action"]["url"] += "&a=" + "{sub1}" * 600
    amplifier["action"]["headers"] = {f"X-H{i}": "{sub1}" * 600 for i in range(12)}
    status, answer = await api("POST", "/api/v1/postbacks", AFF_A, amplifier)
    assert status == 400, answer
    assert answer["field"] == "action"
    assert f"at most {MAX_MACROS}" in answer["error"]
    # At the bound (the URL's own {conversion_id} counts), and one past it; literal braces and
    # secrets are not macros.
    at_bound = ping(sink, path="ok")
    at_bound["action"]["url"] += "&b={{x}}" + "&s={sub1}" * (MAX_MACROS - 1)
    made = await api.create(AFF_A, at_bound)
    past = {"action": {**at_bound["action"], "url": at_bound["action"]["url"] + "{sub2}"}}
    status, answer = await api("PATCH", f"/api/v1/postbacks/{made['id']}", AFF_A, past)
    assert (status, answer["field"]) == (400, "action")
    assert await used(api) == 1


async def test_duplicate_with_thousands_of_ids_is_refused_before_any_work(
    api: Api, sink: Sink
) -> None:
    made = await api.create(AFF_A, ping(sink))
    body = {"from_offer": 7, "to_offer": 8, "ids": [made["id"]] * 5000}
    status, answer = await api("POST", "/api/v1/postbacks/duplicate", AFF_A, body)
    assert (status, answer["field"]) == (400, "ids")
    assert await used(api) == 1


async def test_a_long_history_is_read_a_page_at_a_time(api: Api, sink: Sink) -> None:
    made = await api.create(AFF_A, ping(sink))
    path = f"/api/v1/postbacks/{made['id']}"
    for i in range(HISTORY_PAGE + 5):  # each PATCH adds a row of up to twice the 64 KiB body
        assert (await api("PATCH", path, AFF_A, {"goal": f"g{i}"}))[0] == 200
    status, page = await api("GET", f"{path}/history", AFF_A)
    assert status == 200
    assert len(page["history"]) == HISTORY_PAGE
    assert page["history"][0]["change"] == "create"
    status, rest = await api("GET", f"{path}/history?after={page['next_after']}", AFF_A)
    assert (status, rest["next_after"]) == (200, None)
    assert [h["after"]["body"]["goal"] for h in rest["history"]] == [
        f"g{i}" for i in range(HISTORY_PAGE - 1, HISTORY_PAGE + 5)
    ]
    status, small = await api("GET", f"{path}/history?limit=2", AFF_A)
    assert [h["seq"] for h in small["history"]] == [h["seq"] for h in page["history"][:2]]
    assert small["next_after"] == small["history"][1]["seq"]
    for query in ("limit=0", f"limit={HISTORY_PAGE + 1}", "after=x", "after=-1", "page=2"):
        status, answer = await api("GET", f"{path}/history?{query}", AFF_A)
        assert status == 400, (query, answer)
    # Paging reveals nothing of another's: B's answer is the 404 of an id that does not exist.
    status, answer = await api("GET", f"{path}/history?after=1", AFF_B)
    assert (status, answer["error"]) == (404, f"no postback {made['id']}")
