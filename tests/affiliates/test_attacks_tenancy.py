"""Red team (issue 15): what already held when tried as a hostile affiliate, one compact test
each: no token on the new endpoints, B's view of A's deliveries (filters, cursor, ids), the
quota under many concurrent writes, concurrent PATCH/DELETE, ids after a delete, secrets."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.store.affiliate_types import FIRST_STORE_ID
from tests.affiliates.kit import AFF_A, AFF_B, SETTINGS, Api, ping, rules
from tests.harness import Daemon, Sink, start_daemon

POLICY = "actions: [ping_url]\nmax_postbacks: 3\n"


@pytest.fixture
async def daemon(tmp_path: Path, sink: Sink) -> AsyncIterator[Daemon]:
    d = await start_daemon(tmp_path, rules(sink, POLICY), settings=SETTINGS, dispatch=False)
    yield d
    await d.client.close()


async def test_every_new_endpoint_needs_a_token(daemon: Daemon) -> None:
    api = Api(daemon)
    pid = FIRST_STORE_ID
    calls: list[tuple[str, str, Any]] = [
        ("POST", "/api/v1/postbacks", {"offer": 7}),
        ("POST", "/api/v1/postbacks/duplicate", {"from_offer": 7, "to_offer": 8, "ids": [1]}),
        ("PATCH", f"/api/v1/postbacks/{pid}", {"goal": "x"}),
        ("DELETE", f"/api/v1/postbacks/{pid}", {"confirm": pid}),
        ("POST", f"/api/v1/postbacks/{pid}/status", {"status": "disabled"}),
        ("GET", f"/api/v1/postbacks/{pid}/history", None),
        ("GET", "/api/v1/affiliate/offers", None),
        ("GET", "/api/v1/affiliate/limits", None),
        ("GET", "/api/v1/affiliate/secrets", None),
        ("PUT", "/api/v1/affiliate/secrets/key", {"value": "v"}),
        ("DELETE", "/api/v1/affiliate/secrets/key", None),
    ]
    for method, path, body in calls:
        for token in (None, "not-a-token"):
            status, _ = await api(method, path, token, body)
            assert status == 401, (method, path, token)


async def test_b_never_sees_a_s_deliveries(daemon: Daemon, sink: Sink) -> None:
    api = Api(daemon)
    mine = await api.create(AFF_A, ping(sink))
    await api.create(AFF_A, ping(sink, path="second"))
    await daemon.post(conversion_id="c1", offer=7, affiliate=42, status="approved")
    [row] = await daemon.deliveries(postback_ids=[mine["id"]])
    status, listed = await api("GET", "/api/v1/deliveries?limit=1", AFF_A)
    assert status == 200
    assert listed["next_cursor"]
    for query in (f"postback={mine['id']}", "conversion=c1", "", f"cursor={listed['next_cursor']}"):
        status, body = await api("GET", f"/api/v1/deliveries?{query}", AFF_B)
        assert (status, body["deliveries"]) == (200, []), query
    absent = "0" * 32
    for delivery in (row.delivery_id, absent):
        status, body = await api("GET", f"/api/v1/deliveries/{delivery}", AFF_B)
        assert (status, body) == (404, {"error": f"no delivery {delivery}", "field": None})
        status, _ = await api("POST", f"/api/v1/deliveries/{delivery}/retry", AFF_B)
        assert status == 403


async def test_the_quota_holds_exactly_under_concurrent_creates_and_duplicates(
    daemon: Daemon, sink: Sink
) -> None:
    api = Api(daemon)
    first = await api.create(AFF_A, ping(sink))
    dup = {"from_offer": 7, "to_offer": 8, "ids": [first["id"]]}
    answers = await asyncio.gather(
        *(api("POST", "/api/v1/postbacks", AFF_A, ping(sink, path=f"p{i}")) for i in range(20)),
        *(api("POST", "/api/v1/postbacks/duplicate", AFF_A, dup) for _ in range(10)),
    )
    assert sorted({status for status, _ in answers}) == [201, 422]
    assert sum(status == 201 for status, _ in answers) == 2
    _, listed = await api("GET", "/api/v1/postbacks", AFF_A)
    assert len([p for p in listed["postbacks"] if p["source"] == "store"]) == 3
    assert len((await daemon.services.store.affiliate_changes(0)).postbacks) == 3


async def test_concurrent_patch_and_delete_leave_a_consistent_trail(
    daemon: Daemon, sink: Sink
) -> None:
    api = Api(daemon)
    pid = (await api.create(AFF_A, ping(sink)))["id"]
    path = f"/api/v1/postbacks/{pid}"
    answers = await asyncio.gather(
        *(api("PATCH", path, AFF_A, {"goal": f"g{i}"}) for i in range(8)),
        api("DELETE", path, AFF_A, {"confirm": pid}),
    )
    assert {status for status, _ in answers} <= {200, 409}
    _, history = await api("GET", f"{path}/history", AFF_A)
    trail = [h["change"] for h in history["history"]]
    patched = sum(status == 200 for status, _ in answers[:-1])
    assert trail.count("update") == patched
    deleted = answers[-1][0] == 200
    assert trail == ["create", *["update"] * patched, *(["delete"] if deleted else [])]
    assert (await api("GET", path, AFF_A))[0] == (404 if deleted else 200)
    # Each answered write's before is the previous one's after: nothing half-written.
    rows = history["history"]
    for earlier, later in itertools.pairwise(rows):
        assert later["before"] == earlier["after"]


async def test_a_deleted_id_is_never_handed_out_again(daemon: Daemon, sink: Sink) -> None:
    api = Api(daemon)
    ids = [(await api.create(AFF_A, ping(sink)))["id"] for _ in range(3)]
    for pid in ids:
        assert (await api("DELETE", f"/api/v1/postbacks/{pid}", AFF_A, {"confirm": pid}))[0] == 200
    again = (await api.create(AFF_B, ping(sink, offer=8)))["id"]
    assert again > max(ids) >= FIRST_STORE_ID


async def test_secrets_are_out_of_reach_across_affiliates(daemon: Daemon, sink: Sink) -> None:
    api = Api(daemon)
    assert (await api("PUT", "/api/v1/affiliate/secrets/key", AFF_A, {"value": "a-secret-1"}))[0]
    uses = ping(sink, offer=8)
    uses["action"]["url"] += "&k=${affiliate_secret:key}"
    status, answer = await api("POST", "/api/v1/postbacks", AFF_B, uses)
    assert (status, answer["error"]) == (422, "affiliate secret key is not set: set it first")
    assert await api("GET", "/api/v1/affiliate/secrets", AFF_B) == (200, {"names": []})
    for name in ("../key", "a/b", "..", "x" * 65):
        status, _ = await api("PUT", f"/api/v1/affiliate/secrets/{name}", AFF_A, {"value": "v"})
        assert status in (400, 404), name
    ops = ping(sink)
    for ref in ("${secret:api}", "${ secret :api}"):
        ops["action"]["url"] = f"{sink.url}/x?k={ref}"
        status, answer = await api("POST", "/api/v1/postbacks", AFF_A, ops)
        assert status == 400, ref
