"""End to end in-process (issue 15): an affiliate creates a postback over the API and the next
conversion of that affiliate fires it; disabled, it stops; deleted, its queued deliveries are
cancelled. A policy change disables what it no longer allows, with the reason, and deletes
nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.store.base import DeliveryState
from tests.affiliates.kit import ADMIN, AFF_A, SETTINGS, Api, ping, rules
from tests.harness import Daemon, Sink, start_daemon, wait_for


@pytest.fixture
async def daemon(tmp_path: Path, sink: Sink) -> AsyncIterator[Daemon]:
    d = await start_daemon(tmp_path, rules(sink), settings=SETTINGS, dispatch=False)
    yield d
    await d.client.close()


def paths(sink: Sink) -> list[str]:
    return [r.path_qs for r in sink.received]


async def send_due(daemon: Daemon) -> None:
    dispatcher = daemon.services.dispatcher
    await dispatcher.dispatch_once()
    await dispatcher.drain()


async def test_created_fires_disabled_stops_deleted_cancels(daemon: Daemon, sink: Sink) -> None:
    api = Api(daemon)
    made = await api.create(AFF_A, ping(sink, goal="lead"))
    pid = made["id"]
    answer = await daemon.post(
        conversion_id="c1", offer=7, affiliate=42, goal="lead", status="approved"
    )
    assert answer["deliveries"] == 2  # file postback 101 and the new one, no reload between
    await send_due(daemon)
    await wait_for(lambda: "/aff?tx=c1" in paths(sink))
    [row] = await daemon.deliveries(postback_ids=[pid])
    assert row.state is DeliveryState.SUCCEEDED
    # Another affiliate's conversion does not fire it.
    answer = await daemon.post(
        conversion_id="c2", offer=7, affiliate=77, goal="lead", status="approved"
    )
    assert answer["deliveries"] == 0

    status, _ = await api("POST", f"/api/v1/postbacks/{pid}/status", AFF_A, {"status": "disabled"})
    assert status == 200
    answer = await daemon.post(
        conversion_id="c3", offer=7, affiliate=42, goal="lead", status="approved"
    )
    assert answer["deliveries"] == 1  # 101 only
    assert await daemon.deliveries(postback_ids=[pid], conversion_id="c3") == []

    await api("POST", f"/api/v1/postbacks/{pid}/status", AFF_A, {"status": "active"})
    await daemon.post(conversion_id="c4", offer=7, affiliate=42, goal="lead", status="approved")
    [queued] = await daemon.deliveries(postback_ids=[pid], conversion_id="c4")
    assert queued.state is DeliveryState.QUEUED
    status, _ = await api("DELETE", f"/api/v1/postbacks/{pid}", AFF_A, {"confirm": pid})
    assert status == 200
    [cancelled] = await daemon.deliveries(postback_ids=[pid], conversion_id="c4")
    assert cancelled.state is DeliveryState.CANCELLED
    await send_due(daemon)
    assert "/aff?tx=c4" not in paths(sink)
    answer = await daemon.post(
        conversion_id="c5", offer=7, affiliate=42, goal="lead", status="approved"
    )
    assert answer["deliveries"] == 1


async def test_affiliate_secret_is_sent_and_masked_in_the_attempt(
    daemon: Daemon, sink: Sink
) -> None:
    api = Api(daemon)
    value = "my-tracker-key-123"
    await api("PUT", "/api/v1/affiliate/secrets/tk", AFF_A, {"value": value})
    url = f"{sink.url}/sec?k=${{affiliate_secret:tk}}&tx={{conversion_id}}"
    made = await api.create(AFF_A, {**ping(sink), "action": {"type": "ping_url", "url": url}})
    await daemon.post(conversion_id="s1", offer=7, affiliate=42, status="approved")
    await send_due(daemon)
    await wait_for(lambda: f"/sec?k={value}&tx=s1" in paths(sink))
    [row] = await daemon.deliveries(postback_ids=[made["id"]])
    status, detail = await api("GET", f"/api/v1/deliveries/{row.delivery_id}", AFF_A)
    assert status == 200
    assert value not in str(detail)
    assert "****" in detail["attempts"][0]["request"]["url"]


async def test_a_policy_change_disables_with_the_reason_and_deletes_nothing(
    daemon: Daemon, sink: Sink
) -> None:
    api = Api(daemon)
    on7 = (await api.create(AFF_A, ping(sink)))["id"]
    on8 = (await api.create(AFF_A, ping(sink, offer=8)))["id"]
    (daemon.rules_dir / "affiliates.yaml").write_text("offers: [8]\n")
    assert await daemon.services.reloader.reload("test")
    answer = await daemon.post(conversion_id="p1", offer=7, affiliate=42, status="approved")
    assert answer["deliveries"] == 0  # at once: 101 wants goal lead, `on7` is out of policy
    sync = daemon.services.affiliates
    assert sync is not None
    assert await sync.enforce_policy() == 1
    status, body = await api("GET", f"/api/v1/postbacks/{on7}", AFF_A)
    assert (status, body["status"]) == (200, "disabled")
    assert body["status_reason"] == "policy: offer 7 is not open to affiliate postbacks"
    assert (await api("GET", f"/api/v1/postbacks/{on8}", AFF_A))[1]["status"] == "active"
    _, trail = await api("GET", f"/api/v1/postbacks/{on7}/history", ADMIN)
    assert trail["history"][-1]["change"] == "policy"
    assert trail["history"][-1]["who"]["id"] == "policy"
    # Re-enabling is refused while the policy says no, and allowed once it says yes.
    status, body = await api("POST", f"/api/v1/postbacks/{on7}/status", AFF_A, {"status": "active"})
    assert (status, body["error"]) == (422, "offer 7 is not open to affiliate postbacks")
    (daemon.rules_dir / "affiliates.yaml").write_text("offers: [7, 8]\n")
    assert await daemon.services.reloader.reload("test")
    status, body = await api("POST", f"/api/v1/postbacks/{on7}/status", AFF_A, {"status": "active"})
    assert (status, body["status"], body["status_reason"]) == (200, "active", None)


async def test_a_bad_policy_fails_the_reload_with_file_and_line(daemon: Daemon) -> None:
    (daemon.rules_dir / "affiliates.yaml").write_text(
        "actions: [ping_url]\nmax_postbacks: lots\ndeny_destinations: [10.0.0.0/33]\nother: 1\n"
    )
    assert not await daemon.services.reloader.reload("test")
    errors = daemon.services.reloader.status.last_error
    assert "affiliates.yaml:2: max_postbacks: Input should be a valid integer" in errors
    assert any(e.startswith("affiliates.yaml:3: deny_destinations") for e in errors)
    assert "affiliates.yaml:4: unknown key 'other'" in errors


async def test_without_a_policy_file_the_defaults_hold(daemon: Daemon, sink: Sink) -> None:
    api = Api(daemon)
    status, limits = await api("GET", "/api/v1/affiliate/limits", AFF_A)
    assert (status, limits) == (
        200,
        {
            "actions": ["ping_url"],
            "when": False,
            "max_postbacks": 20,
            "max_writes_per_minute": 60,
            "offers": "*",
            "used": 0,
        },
    )
    status, body = await api("POST", "/api/v1/postbacks", AFF_A, ping(sink, when={"==": [1, 1]}))
    assert (status, body["error"]) == (422, "when: conditions are not allowed for affiliates")
    status, body = await api("POST", "/api/v1/postbacks", AFF_A, ping(sink, offer=9))
    assert (status, body["error"]) == (422, "offer 9 is not open to affiliate postbacks")
    for _ in range(20):
        await api.create(AFF_A, ping(sink))
    status, body = await api("POST", "/api/v1/postbacks", AFF_A, ping(sink))
    assert status == 422
    assert "at most 20 (max_postbacks)" in body["error"]
