"""opt_intel: one request per identifier (emails-add, phones-add), the exact requests, what a
half-done delivery does, provider answers, no secret leaks, its own load errors, and a
conversion going webhook -> rule -> the fake Opt-Intel list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daemon.actions import opt_intel
from daemon.actions.listclient import ListClient
from daemon.store.base import DeliveryState
from tests.actions.fakes_lists import (
    ANSWERS,
    FakeListService,
    Scripted,
    Shape,
    action_headers,
    serving,
)
from tests.actions.kit import (
    FIRST_SETTING_LINE,
    action_resources,
    attempt_texts,
    end_to_end,
    leaks,
    make_job,
    outcome,
    validate,
)

KEY = "oi-api-key-31337"
TOKEN = "ol5token9d2"  # the list's API link carries a token of its own
ROUTES: dict[str, Any] = {
    "/api/optout/{list_id}/emails-add": ("add", "email"),
    "/api/optout/{list_id}/phones-add": ("add", "phone"),
}
SHAPE = Shape(
    ROUTES,
    auth=("body", "api_key", KEY),
    ok=(200, {"success": True}),
    exists=(200, {"success": False, "message": "already exists"}),
)
SECRETS = {"oi_key": KEY, "oi_list": TOKEN}
PREDICATES = {
    "success": {"field": "success", "equals": True},
    "already_there": {"field": "message", "equals": "already exists"},
}
BOTH = {"email": "Opt@Example.com", "phone": "(555) 010-0199"}


def settings(fake: FakeListService, **extra: Any) -> opt_intel.Settings:
    return opt_intel.Settings.model_validate(
        {
            "type": "opt_intel",
            "base_url": f"{fake.url}/api/optout/${{secret:oi_list}}",
            "auth": {"body": {"name": "api_key", "value": "${secret:oi_key}"}},
            **PREDICATES,
            **extra,
        }
    )


async def send(fake: FakeListService, values: dict[str, str], **extra: Any) -> tuple[str, str]:
    async with action_resources(SECRETS, timeout=0.5) as res:
        return await outcome(ListClient(settings(fake, **extra), res), make_job(values))


async def test_happy_path_exact_requests_one_per_identifier() -> None:
    async with serving(SHAPE, TOKEN) as fake:
        assert await send(fake, BOTH) == ("succeeded", "")
        first, second = fake.received
        assert (first.method, first.path_qs) == ("POST", f"/api/optout/{TOKEN}/emails-add")
        assert first.text == f'{{"email":"Opt@Example.com","api_key":"{KEY}"}}'
        assert (second.method, second.path_qs) == ("POST", f"/api/optout/{TOKEN}/phones-add")
        assert second.text == f'{{"phone":"(555) 010-0199","api_key":"{KEY}"}}'
        for got in (first, second):
            assert action_headers(got) == {
                "Content-Type": "application/json",
                "Content-Length": str(len(got.body)),
            }
        assert fake.members(TOKEN) == {("email", "Opt@Example.com"), ("phone", "(555) 010-0199")}


async def test_only_the_identifiers_present_are_sent() -> None:
    async with serving(SHAPE, TOKEN) as fake:
        assert await send(fake, {"phone": "5550100199"}) == ("succeeded", "")
        assert [g.path_qs for g in fake.received] == [f"/api/optout/{TOKEN}/phones-add"]
        assert await send(fake, {}) == ("dead", "no_identifier")
        assert len(fake.received) == 1


async def test_second_request_failing_retries_both_and_the_repeat_is_harmless() -> None:
    async with serving(SHAPE, TOKEN) as fake:
        fake.script += [(200, {"success": True}), (503, "busy")]
        async with action_resources(SECRETS) as res:
            action = ListClient(settings(fake), res)
            job = make_job(BOTH)
            assert await outcome(action, job) == ("retry", "http_503")
            # The record holds the request that failed: the phone one.
            assert job.record.request is not None
            assert job.record.request.url.endswith("/****/phones-add")
            assert job.record.response_status == 503
            # The scripted 200 stood in for the email add, so the list is still empty; the
            # retry adds both, and a third attempt finds both already there.
            assert await outcome(action, make_job(BOTH)) == ("succeeded", "")
            assert await outcome(action, make_job(BOTH)) == ("succeeded", "")
        assert [g.path_qs.rsplit("/", 1)[1] for g in fake.received] == [
            "emails-add",
            "phones-add",
            "emails-add",
            "phones-add",
            "emails-add",
            "phones-add",
        ]
        assert fake.members(TOKEN) == {("email", "Opt@Example.com"), ("phone", "(555) 010-0199")}


async def test_first_request_failing_sends_nothing_more() -> None:
    async with serving(SHAPE, TOKEN) as fake:
        fake.script.append((500, "down"))
        assert await send(fake, BOTH) == ("retry", "http_500")
        assert len(fake.received) == 1


async def test_second_request_refused_leaves_the_first_done() -> None:
    async with serving(SHAPE, TOKEN) as fake:
        fake.script += [(200, {"success": True}), (400, {"message": "invalid phone"})]
        assert await send(fake, BOTH) == ("dead", "http_400")
        assert len(fake.received) == 2


async def test_already_there_counts_and_other_refusals_do_not() -> None:
    async with serving(SHAPE, TOKEN) as fake:
        fake.lists[TOKEN] |= {("email", "Opt@Example.com")}
        assert await send(fake, {"email": "Opt@Example.com"}) == ("succeeded", "")
        fake.script.append((200, {"success": False, "message": "list archived"}))
        assert await send(fake, {"email": "new@example.com"}) == ("dead", "rejected")


@pytest.mark.parametrize(("name", "reply", "want", "reason"), ANSWERS, ids=[a[0] for a in ANSWERS])
async def test_answers(name: str, reply: Scripted, want: str, reason: str) -> None:
    async with serving(SHAPE, TOKEN) as fake:
        fake.script.append(reply)
        # Status alone decides here; the body predicates have their own tests above. The
        # scripted answer goes to the email request; the phone one follows only on success.
        no_predicates = {"success": None, "already_there": None}
        assert await send(fake, BOTH, **no_predicates) == (want, reason)
        assert len(fake.received) == (2 if want == "succeeded" else 1)


@pytest.mark.parametrize(
    "replies",
    [[(500, {"error": f"bad key {KEY} for {TOKEN}"})], [(200, {"success": True}), "drop"]],
    ids=["500-echo", "drop-second"],
)
async def test_no_secret_in_errors_records_or_logs(replies: list[Scripted]) -> None:
    async with serving(SHAPE, TOKEN) as fake:
        fake.script += replies
        async with action_resources(SECRETS) as res:
            job = make_job(BOTH)
            (kind, _), texts = await attempt_texts(ListClient(settings(fake), res), job)
        assert kind == "RetryableError"
        assert job.record.request is not None
        assert "/api/optout/****/" in job.record.request.url
        assert json.loads(job.record.request.body or "")["api_key"] == "****"
        assert leaks(KEY, *texts) == []
        assert leaks(TOKEN, *texts) == []


async def test_no_secret_when_nothing_listens() -> None:
    async with serving(SHAPE, TOKEN) as fake:
        action_settings = settings(fake)
    async with action_resources(SECRETS) as res:
        job = make_job(BOTH)
        (kind, reason), texts = await attempt_texts(ListClient(action_settings, res), job)
    assert (kind, reason) == ("RetryableError", "connect_failed")
    assert leaks(KEY, *texts) == []
    assert leaks(TOKEN, *texts) == []


# --- its own load errors (the shared ones are in test_listclient.py) ----------------------------

A = FIRST_SETTING_LINE - 1
HEAD = "type: opt_intel\nbase_url: https://oi.example.com/api/optout/abc\n"
AUTH = "auth: {query: {name: key, value: '${secret:oi_key}'}}\n"


def test_auth_is_required(tmp_path: Path) -> None:
    assert validate(tmp_path, HEAD) == [
        f"pb.yaml:{A}: postback 7: missing required key 'action.auth'"
    ]


def test_it_only_adds(tmp_path: Path) -> None:
    assert validate(tmp_path, HEAD + AUTH + "operation: remove") == [
        f"pb.yaml:{A + 4}: postback 7: unknown key 'action.operation'"
    ]
    assert validate(tmp_path, HEAD + AUTH + "email_remove_path: /emails-delete") == [
        f"pb.yaml:{A + 4}: postback 7: unknown key 'action.email_remove_path'"
    ]


def test_add_paths_start_with_a_slash(tmp_path: Path) -> None:
    assert validate(tmp_path, HEAD + AUTH + "phone_add_path: phones-add") == [
        f"pb.yaml:{A}: postback 7: action: phone_add_path must start with /"
    ]


def test_documented_paths_are_the_defaults(tmp_path: Path) -> None:
    assert validate(tmp_path, HEAD + AUTH) == []
    loaded = opt_intel.Settings.model_validate(
        {
            "type": "opt_intel",
            "base_url": "https://oi.example.com/api/optout/abc/",
            "auth": {"query": {"name": "key", "value": "k"}},
        }
    )
    assert [(c.url.source, sorted(c.kinds)) for c in loaded.calls] == [
        ("https://oi.example.com/api/optout/abc/emails-add", ["email"]),
        ("https://oi.example.com/api/optout/abc/phones-add", ["phone"]),
    ]


def test_an_email_only_list_plans_one_request(tmp_path: Path) -> None:
    loaded = opt_intel.Settings.model_validate(
        {
            "type": "opt_intel",
            "base_url": "https://oi.example.com/l",
            "auth": {"query": {"name": "key", "value": "k"}},
            "fields": {"email": "{email}"},
        }
    )
    assert [c.url.source for c in loaded.calls] == ["https://oi.example.com/l/emails-add"]


# --- end to end ---------------------------------------------------------------------------------


async def test_end_to_end(tmp_path: Path) -> None:
    async with serving(SHAPE, TOKEN) as fake:
        action = f"""
            type: opt_intel
            base_url: "{fake.url}/api/optout/${{secret:oi_list}}"
            auth: {{body: {{name: api_key, value: "${{secret:oi_key}}"}}}}
            success: {{field: success, equals: true}}
        """
        run = await end_to_end(
            tmp_path,
            action,
            SECRETS,
            lambda: len(fake.members(TOKEN)) == 2,
            conversion_id="O-1",
            email="e2e@example.com",
            phone="5550100199",
        )
        assert fake.members(TOKEN) == {("email", "e2e@example.com"), ("phone", "5550100199")}
        assert run.state == DeliveryState.SUCCEEDED
        (attempt,) = run.attempts  # two requests, one attempt; its record shows the last
        assert attempt.outcome == "succeeded"
        assert attempt.request is not None
        assert attempt.request["url"] == f"{fake.url}/api/optout/****/phones-add"
        assert attempt.request["body"] == '{"phone":"5550100199","api_key":"****"}'
        line = next(e for e in run.logs if e["event"] == "delivery_attempt")
        assert (line["action"], line["outcome"]) == ("opt_intel", "succeeded")
        assert leaks(KEY, attempt, *run.logs) == []
        assert leaks(TOKEN, attempt, *run.logs) == []
