"""Every affiliate endpoint with two affiliates (42: A, 77: B) and an admin (issue 15): what each
may read and change, and that A never reveals or changes B's or an admin's postback (the same 404
as an id that does not exist)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.store.affiliate_types import FIRST_STORE_ID
from tests.affiliates.kit import ADMIN, AFF_A, AFF_B, SETTINGS, Api, ping, rules
from tests.harness import Daemon, Sink, start_daemon

POLICY = """
actions: [ping_url]
max_postbacks: 3
deny_destinations: [denied.example, "*.corp.example", 10.0.0.0/8]
"""


@pytest.fixture
async def daemon(tmp_path: Path, sink: Sink) -> AsyncIterator[Daemon]:
    d = await start_daemon(tmp_path, rules(sink, POLICY), settings=SETTINGS, dispatch=False)
    yield d
    await d.client.close()


@pytest.fixture
def api(daemon: Daemon) -> Api:
    return Api(daemon)


def missing(pid: Any) -> dict[str, Any]:
    return {"error": f"no postback {pid}", "field": None}


async def test_create_answers_201_with_the_postback_in_the_list_shape(api: Api, sink: Sink) -> None:
    made = await api.create(AFF_A, ping(sink, goal="lead"))
    assert made["id"] >= FIRST_STORE_ID
    assert made == {
        "id": made["id"],
        "offer": "7",
        "trigger": "conversion_done",
        "trigger_settings": {
            "affiliate": "42",
            "goal": "lead",
            "goal_evaluated": True,
            "when": None,
        },
        "action": "ping_url",
        "action_settings": {"url": f"{sink.url}/aff?tx={{conversion_id}}"},
        "status": "active",
        "status_reason": None,
        "created_at": made["created_at"],
        "author": {"id": "alice", "name": "alice", "affiliate": "42"},
        "source": "store",
        "file": None,
        "line": None,
        "updated_at": made["updated_at"],
    }
    status, again = await api("GET", f"/api/v1/postbacks/{made['id']}", AFF_A)
    assert (status, again) == (200, made)
    status, listed = await api("GET", "/api/v1/postbacks", AFF_A)
    assert [(r["id"], r["source"]) for r in listed["postbacks"]] == [
        (101, "file"),
        (made["id"], "store"),
    ]


async def test_an_affiliate_never_reaches_another_affiliates_or_an_admins_postback(
    api: Api, sink: Sink
) -> None:
    mine = (await api.create(AFF_A, ping(sink)))["id"]
    theirs = (await api.create(AFF_B, ping(sink, offer=8)))["id"]
    absent = FIRST_STORE_ID + 999_999
    # B's store postback, 102 (an admin's file postback) and an id that does not exist: the
    # same answer, word for word, to every read and write of A.
    for pid in (theirs, 102, absent):
        calls: list[tuple[str, str, Any]] = [
            ("GET", f"/api/v1/postbacks/{pid}", None),
            ("PATCH", f"/api/v1/postbacks/{pid}", {"goal": "x"}),
            ("POST", f"/api/v1/postbacks/{pid}/status", {"status": "disabled"}),
            ("DELETE", f"/api/v1/postbacks/{pid}", {"confirm": pid}),
            ("GET", f"/api/v1/postbacks/{pid}/history", None),
        ]
        for method, path, body in calls:
            assert await api(method, path, AFF_A, body) == (404, missing(pid)), (method, pid)
    dup = {"from_offer": 8, "to_offer": 7, "ids": [theirs]}
    assert await api("POST", "/api/v1/postbacks/duplicate", AFF_A, dup) == (404, missing(theirs))
    dup = {"from_offer": 7, "to_offer": 8, "ids": [102]}
    assert await api("POST", "/api/v1/postbacks/duplicate", AFF_A, dup) == (404, missing(102))
    _, listed = await api("GET", "/api/v1/postbacks", AFF_A)
    assert [r["id"] for r in listed["postbacks"]] == [101, mine]
    _, listed = await api("GET", "/api/v1/postbacks", AFF_B)
    assert [r["id"] for r in listed["postbacks"]] == [103, theirs]
    _, listed = await api("GET", "/api/v1/postbacks", ADMIN)
    assert [r["id"] for r in listed["postbacks"]] == [101, 102, 103, mine, theirs]
    status, theirs_now = await api("GET", f"/api/v1/postbacks/{theirs}", AFF_B)
    assert status == 200
    assert theirs_now["status"] == "active"
    assert theirs_now["trigger_settings"]["goal"] is None  # A's PATCH changed nothing


async def test_file_postbacks_stay_in_git(api: Api) -> None:
    for token, pid in ((AFF_A, 101), (ADMIN, 101), (ADMIN, 102)):
        for method, path, body in (
            ("PATCH", f"/api/v1/postbacks/{pid}", {"goal": "x"}),
            ("POST", f"/api/v1/postbacks/{pid}/status", {"status": "disabled"}),
            ("DELETE", f"/api/v1/postbacks/{pid}", {"confirm": pid}),
        ):
            status, body = await api(method, path, token, body)
            assert status == 409, (method, pid, body)
            assert f"postback {pid} lives in offer-7.yaml:" in body["error"]
            assert "git" in body["error"]


async def test_update_keeps_the_action_type_and_the_offer(api: Api, sink: Sink) -> None:
    pid = (await api.create(AFF_A, ping(sink)))["id"]
    path = f"/api/v1/postbacks/{pid}"
    status, body = await api("PATCH", path, AFF_A, {"action": {"type": "slack_message"}})
    assert status == 409
    assert body["error"] == "the action type cannot change (ping_url): create a new postback"
    status, body = await api("PATCH", path, AFF_A, {"offer": 8})
    assert (status, body["field"]) == (409, "offer")
    new_url = f"{sink.url}/moved?tx={{conversion_id}}"
    status, body = await api(
        "PATCH", path, AFF_A, {"goal": "lead", "action": {"type": "ping_url", "url": new_url}}
    )
    assert status == 200
    assert body["action_settings"] == {"url": new_url}
    assert body["trigger_settings"]["goal"] == "lead"
    status, body = await api("PATCH", path, AFF_A, {"goal": None})
    assert body["trigger_settings"]["goal"] is None
    status, body = await api("PATCH", path, ADMIN, {"goal": "sale"})  # admins manage them all
    assert (status, body["trigger_settings"]["goal"]) == (200, "sale")
    assert body["author"]["id"] == "alice"  # the author stays the creator


async def test_status_delete_and_history(api: Api, sink: Sink) -> None:
    pid = (await api.create(AFF_A, ping(sink)))["id"]
    path = f"/api/v1/postbacks/{pid}"
    status, body = await api("POST", f"{path}/status", AFF_A, {"status": "disabled"})
    assert (status, body["status"], body["status_reason"]) == (200, "disabled", None)
    status, body = await api("POST", f"{path}/status", AFF_A, {"status": "active"})
    assert body["status"] == "active"
    status, body = await api("POST", f"{path}/status", ADMIN, {"status": "disabled"})
    assert (body["status"], body["status_reason"]) == ("disabled", "disabled by an admin")
    status, body = await api("POST", f"{path}/status", AFF_A, {"status": "active"})
    assert status == 403
    assert body["error"] == "an admin disabled this postback: only an admin can enable it"
    assert (await api("POST", f"{path}/status", ADMIN, {"status": "active"}))[0] == 200
    for confirm in (None, pid + 1, str(pid + 1), "yes", True):
        status, body = await api("DELETE", path, AFF_A, {"confirm": confirm})
        assert (status, body["field"]) == (400, "confirm"), confirm
        assert body["error"] == f"type the postback's id ({pid}) to confirm"
    assert (await api("GET", path, AFF_A))[0] == 200
    status, body = await api("DELETE", path, AFF_A, {"confirm": str(pid)})
    assert (status, body) == (200, {"status": "deleted", "id": pid})
    assert await api("GET", path, AFF_A) == (404, missing(pid))
    assert await api("DELETE", path, AFF_A, {"confirm": pid}) == (404, missing(pid))
    status, body = await api("GET", f"{path}/history", AFF_A)
    assert status == 200
    trail = [(h["change"], h["who"]["id"]) for h in body["history"]]
    assert trail == [
        ("create", "alice"),
        ("status", "alice"),
        ("status", "alice"),
        ("status", "ops"),
        ("status", "ops"),
        ("delete", "alice"),
    ]
    first = body["history"][0]
    assert first["before"] is None
    assert first["after"]["body"]["action"]["url"].startswith(sink.url)
    assert body["history"][-1]["after"] is None
    assert await api("GET", f"{path}/history", AFF_B) == (404, missing(pid))
    assert (await api("GET", f"{path}/history", ADMIN))[0] == 200


async def test_duplicate_copies_chosen_postbacks_to_another_offer(api: Api, sink: Sink) -> None:
    mine = (await api.create(AFF_A, ping(sink, goal="lead")))["id"]
    dup = {"from_offer": "7", "to_offer": 8, "ids": [101, mine]}
    status, body = await api("POST", "/api/v1/postbacks/duplicate", AFF_A, dup)
    assert status == 201, body
    copies = body["postbacks"]
    assert [c["offer"] for c in copies] == ["8", "8"]
    assert all(c["id"] > mine and c["source"] == "store" for c in copies)
    assert [c["action_settings"]["url"] for c in copies] == [
        f"{sink.url}/file101?tx={{conversion_id}}",
        f"{sink.url}/aff?tx={{conversion_id}}",
    ]
    assert {c["author"]["id"] for c in copies} == {"alice"}
    wrong_offer = {"from_offer": 8, "to_offer": 7, "ids": [mine]}
    status, body = await api("POST", "/api/v1/postbacks/duplicate", AFF_A, wrong_offer)
    assert (status, body["error"]) == (404, f"no postback {mine} in offer 8")
    status, body = await api("POST", "/api/v1/postbacks/duplicate", ADMIN, dup)
    assert status == 403


async def test_quota_actions_offers_destinations_and_star_are_refused(api: Api, sink: Sink) -> None:
    refusals: list[tuple[dict[str, Any], int, str]] = [
        (ping(sink, affiliate="*"), 403, "'*' (every affiliate) is not available"),
        (ping(sink, affiliate=77), 403, "acts only for its own affiliate (42)"),
        (
            {
                **ping(sink),
                "action": {
                    "type": "slack_message",
                    "webhook_url": "https://hooks.slack.com/services/T0/B0/x",
                    "text": "hi",
                },
            },
            422,
            "action type slack_message is not allowed for affiliates (allowed: ping_url)",
        ),
        (ping(sink, when={"==": [1, 1]}), 422, "when: conditions are not allowed"),
        (ping(sink, offer=9), 422, "offer 9 is not open to affiliate postbacks"),
        (
            {**ping(sink), "action": {"type": "ping_url", "url": "https://denied.example/x"}},
            422,
            "destination denied.example is not allowed (deny_destinations: denied.example)",
        ),
        (
            {**ping(sink), "action": {"type": "ping_url", "url": "https://a.corp.example/"}},
            422,
            "(deny_destinations: *.corp.example)",
        ),
        (
            {**ping(sink), "action": {"type": "ping_url", "url": "http://10.1.2.3/"}},
            422,
            "(deny_destinations: 10.0.0.0/8)",
        ),
    ]
    for body, code, text in refusals:
        status, answer = await api("POST", "/api/v1/postbacks", AFF_A, body)
        assert status == code, (body, answer)
        assert text in answer["error"], answer
    status, answer = await api("POST", "/api/v1/postbacks", ADMIN, ping(sink))
    assert status == 403
    assert "ops keep their postbacks in git" in answer["error"]
    for _ in range(3):
        await api.create(AFF_A, ping(sink))
    status, answer = await api("POST", "/api/v1/postbacks", AFF_A, ping(sink))
    assert (status, answer["error"]) == (
        422,
        "affiliate 42 has 3 postbacks: the policy allows at most 3 (max_postbacks)",
    )
    await api.create(AFF_B, ping(sink))  # B's quota is its own
    status, limits = await api("GET", "/api/v1/affiliate/limits", AFF_A)
    assert limits == {
        "actions": ["ping_url"],
        "when": False,
        "max_postbacks": 3,
        "max_writes_per_minute": 60,
        "offers": "*",
        "used": 3,
    }


async def test_usable_offers(api: Api) -> None:
    status, body = await api("GET", "/api/v1/affiliate/offers", AFF_A)
    assert status == 200
    assert body["offers"] == [
        {"offer": "7", "goals_enabled": True, "goals": ["lead", "sale"]},
        {"offer": "8", "goals_enabled": False, "goals": []},
    ]


async def test_secrets_stay_apart_and_within_their_affiliate(
    api: Api, daemon: Daemon, sink: Sink
) -> None:
    value = "tr4cker-k3y-value"
    status, body = await api("PUT", "/api/v1/affiliate/secrets/tk", AFF_A, {"value": value})
    assert (status, body) == (200, {"status": "set", "name": "tk"})
    url = f"{sink.url}/s?k=${{affiliate_secret:tk}}&tx={{conversion_id}}"
    made = await api.create(AFF_A, {**ping(sink), "action": {"type": "ping_url", "url": url}})
    assert made["action_settings"]["url"] == url  # the reference, never the value
    status, body = await api(
        "POST",
        "/api/v1/postbacks",
        AFF_B,
        {**ping(sink), "action": {"type": "ping_url", "url": url}},
    )
    assert (status, body["error"]) == (422, "affiliate secret tk is not set: set it first")
    ops = {**ping(sink), "action": {"type": "ping_url", "url": f"{sink.url}/?k=${{secret:x}}"}}
    status, body = await api("POST", "/api/v1/postbacks", AFF_A, ops)
    assert status == 400
    assert body["field"] == "action.url"
    assert "ops secret" in body["error"]
    assert await api("GET", "/api/v1/affiliate/secrets", AFF_A) == (200, {"names": ["tk"]})
    assert await api("GET", "/api/v1/affiliate/secrets", AFF_B) == (200, {"names": []})
    status, body = await api("DELETE", "/api/v1/affiliate/secrets/tk", AFF_A)
    assert status == 409
    assert str(made["id"]) in body["error"]
    assert (await api("DELETE", "/api/v1/affiliate/secrets/tk", AFF_B))[0] == 404
    assert (await api("GET", "/api/v1/affiliate/secrets", ADMIN))[0] == 403
    for path in ("/api/v1/postbacks", f"/api/v1/postbacks/{made['id']}/history"):
        for token in (AFF_A, ADMIN):
            _, text = await api("GET", path, token)
            assert value not in str(text)
