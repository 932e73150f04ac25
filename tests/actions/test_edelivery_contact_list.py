"""edelivery_contact_list: the exact request, provider answers, no secret leaks, its own load
errors, and a conversion going webhook -> rule -> the fake E-Delivery list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.actions import edelivery_contact_list
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

KEY = "ed-key-5f1c0a9e"
ROUTES: dict[str, Any] = {"/api/v2/contact-lists/add": ("add", None)}
SHAPE = Shape(ROUTES, auth=("header", "X-Api-Key", KEY))
LEAD = {
    "email": "jane@example.com",
    "phone": "+1 555 010 0199",
    "first_name": "Jane",
    "last_name": "O'Doe",
}


def settings(fake: FakeListService, **extra: Any) -> edelivery_contact_list.Settings:
    return edelivery_contact_list.Settings.model_validate(
        {
            "type": "edelivery_contact_list",
            "base_url": f"{fake.url}/api/v2/",
            "add_path": "/contact-lists/add",
            "list_id": 3141,
            "auth": {"header": {"name": "X-Api-Key", "value": "${secret:edelivery_key}"}},
            **extra,
        }
    )


async def send(fake: FakeListService, values: dict[str, str], **extra: Any) -> tuple[str, str]:
    async with action_resources({"edelivery_key": KEY}, timeout=0.5) as res:
        return await outcome(ListClient(settings(fake, **extra), res), make_job(values))


async def test_happy_path_exact_request() -> None:
    async with serving(SHAPE, "3141") as fake:
        assert await send(fake, LEAD) == ("succeeded", "")
        (got,) = fake.received
        assert (got.method, got.path_qs) == ("POST", "/api/v2/contact-lists/add")
        assert got.text == (
            '{"list_id":"3141","email":"jane@example.com","phone":"+1 555 010 0199",'
            '"first_name":"Jane","last_name":"O\'Doe"}'
        )
        assert action_headers(got) == {
            "X-Api-Key": KEY,
            "Content-Type": "application/json",
            "Content-Length": str(len(got.body)),
        }
        assert fake.members("3141") == {("email", "jane@example.com"), ("phone", "+1 555 010 0199")}


async def test_adding_again_is_success_when_already_there_says_so() -> None:
    async with serving(SHAPE, "3141") as fake:
        assert await send(fake, LEAD) == ("succeeded", "")
        # The fake answers 409 for a contact it holds: without the predicate that is a 4xx.
        assert await send(fake, LEAD) == ("dead", "http_409")
        there = {"already_there": {"status": 409}}
        assert await send(fake, LEAD, **there) == ("succeeded", "")
        assert len(fake.received) == 3


async def test_success_predicate_reads_the_body() -> None:
    shape = Shape(
        ROUTES,
        auth=SHAPE.auth,
        ok=(200, {"result": True}),
        exists=(200, {"result": False, "error": "DUPLICATE"}),
    )
    rules = {
        "success": {"field": "result", "equals": True},
        "already_there": {"field": "error", "equals": "DUPLICATE"},
    }
    async with serving(shape, "3141") as fake:
        assert await send(fake, LEAD, **rules) == ("succeeded", "")
        assert await send(fake, LEAD, **rules) == ("succeeded", "")
        fake.script.append((200, {"result": False, "error": "LIST_LOCKED"}))
        assert await send(fake, LEAD, **rules) == ("dead", "rejected")


async def test_unknown_list_or_wrong_key_are_permanent() -> None:
    async with serving(SHAPE, "other") as fake:
        assert await send(fake, LEAD) == ("dead", "http_404")
    async with serving(Shape(ROUTES, auth=("header", "X-Api-Key", "another")), "3141") as fake:
        assert await send(fake, LEAD) == ("dead", "http_401")


@pytest.mark.parametrize(("name", "reply", "want", "reason"), ANSWERS, ids=[a[0] for a in ANSWERS])
async def test_answers(name: str, reply: Scripted, want: str, reason: str) -> None:
    async with serving(SHAPE, "3141") as fake:
        fake.script.append(reply)
        assert await send(fake, LEAD) == (want, reason)


@pytest.mark.parametrize(
    "reply",
    [(500, {"error": f"bad key {KEY}"}), (401, f"key {KEY} refused"), "drop"],
    ids=["500-echo", "401-echo", "drop"],
)
async def test_no_secret_in_errors_records_or_logs(reply: Scripted) -> None:
    async with serving(SHAPE, "3141") as fake:
        fake.script.append(reply)
        async with action_resources({"edelivery_key": KEY}) as res:
            action = ListClient(settings(fake), res)
            job = make_job(LEAD)
            (kind, _), texts = await attempt_texts(action, job)
        assert kind in ("RetryableError", "PermanentError")
        assert job.record.request is not None
        assert job.record.request.headers["X-Api-Key"] == "****"
        assert leaks(KEY, *texts) == []


async def test_no_secret_when_nothing_listens() -> None:
    async with serving(SHAPE, "3141") as fake:
        action_settings = settings(fake)
    async with action_resources({"edelivery_key": KEY}) as res:
        (kind, reason), texts = await attempt_texts(
            ListClient(action_settings, res), make_job(LEAD)
        )
    assert (kind, reason) == ("RetryableError", "connect_failed")
    assert leaks(KEY, *texts) == []


# --- its own load errors (the shared ones are in test_listclient.py) ----------------------------

A = FIRST_SETTING_LINE - 1


def test_list_id_is_required(tmp_path: Path) -> None:
    action = "type: edelivery_contact_list\nbase_url: https://ed.example.com/api"
    assert validate(tmp_path, action) == [
        f"pb.yaml:{A}: postback 7: missing required key 'action.list_id'"
    ]


def test_base_url_is_required(tmp_path: Path) -> None:
    action = "type: edelivery_contact_list\nlist_id: 5"
    assert validate(tmp_path, action) == [
        f"pb.yaml:{A}: postback 7: missing required key 'action.base_url'"
    ]


def test_it_only_adds(tmp_path: Path) -> None:
    action = """
        type: edelivery_contact_list
        base_url: https://ed.example.com/
        list_id: 5
        operation: remove
    """
    assert validate(tmp_path, action) == [
        f"pb.yaml:{A + 4}: postback 7: unknown key 'action.operation'"
    ]


def test_defaults_load(tmp_path: Path) -> None:
    action = "type: edelivery_contact_list\nbase_url: https://ed.example.com/contacts\nlist_id: 5"
    assert validate(tmp_path, action) == []


# --- end to end ---------------------------------------------------------------------------------


async def test_end_to_end(tmp_path: Path) -> None:
    async with serving(SHAPE, "3141") as fake:
        action = f"""
            type: edelivery_contact_list
            base_url: {fake.url}/api/v2
            add_path: /contact-lists/add
            list_id: 3141
            auth: {{header: {{name: X-Api-Key, value: "${{secret:edelivery_key}}"}}}}
            already_there: {{status: 409}}
        """
        run = await end_to_end(
            tmp_path,
            action,
            {"edelivery_key": KEY},
            lambda: fake.members("3141"),
            conversion_id="E-1",
            email="e2e@example.com",
            first_name="Ed",
        )
        assert run.answer["deliveries"] == 1
        assert fake.members("3141") == {("email", "e2e@example.com")}
        assert fake.received[0].text == (
            '{"list_id":"3141","email":"e2e@example.com","first_name":"Ed","last_name":""}'
        )
        assert run.state == DeliveryState.SUCCEEDED
        (attempt,) = run.attempts
        assert (attempt.outcome, attempt.response_status) == ("succeeded", 200)
        assert attempt.request is not None
        assert attempt.request["headers"]["X-Api-Key"] == "****"
        line = next(e for e in run.logs if e["event"] == "delivery_attempt")
        assert (line["action"], line["outcome"]) == ("edelivery_contact_list", "succeeded")
        assert leaks(KEY, attempt, *run.logs) == []
