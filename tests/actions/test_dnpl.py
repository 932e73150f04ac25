"""dnpl: add and delete a value, the exact requests, provider answers, no secret leaks, its own
load errors, and a conversion going webhook -> rule -> the fake Do-Not-Present list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.actions import dnpl
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

KEY = "dnpl-token-77aa"
ROUTES: dict[str, Any] = {"/dnpl/add": ("add", None), "/dnpl/delete": ("remove", None)}
SHAPE = Shape(
    ROUTES,
    auth=("query", "token", KEY),
    identifiers={"value": "phone"},
    ok=(200, {"status": "success"}),
    exists=(200, {"status": "exists"}),
    missing=(200, {"status": "not_found"}),
)
WIRE = {
    "add_path": "/dnpl/add",
    "remove_path": "/dnpl/delete",
    "auth": {"query": {"name": "token", "value": "${secret:dnpl_token}"}},
    "success": {"field": "status", "equals": ["success"]},
}


def settings(fake: FakeListService, **extra: Any) -> dnpl.Settings:
    return dnpl.Settings.model_validate(
        {"type": "dnpl", "base_url": fake.url, "list_id": 77, **WIRE, **extra}
    )


async def send(fake: FakeListService, values: dict[str, str], **extra: Any) -> tuple[str, str]:
    async with action_resources({"dnpl_token": KEY}, timeout=0.5) as res:
        return await outcome(ListClient(settings(fake, **extra), res), make_job(values))


async def test_happy_path_exact_request() -> None:
    async with serving(SHAPE, "77") as fake:
        assert await send(fake, {"phone": "5550100199", "email": "x@y.z"}) == ("succeeded", "")
        (got,) = fake.received
        assert (got.method, got.path_qs) == ("POST", f"/dnpl/add?token={KEY}")
        assert got.text == '{"list_id":"77","value":"5550100199"}'
        assert action_headers(got) == {
            "Content-Type": "application/json",
            "Content-Length": str(len(got.body)),
        }
        assert fake.members("77") == {("phone", "5550100199")}


async def test_add_again_and_delete_with_body_predicates() -> None:
    there = {"already_there": {"field": "status", "equals": ["exists", "not_found"]}}
    async with serving(SHAPE, "77") as fake:
        assert await send(fake, {"phone": "5550100199"}) == ("succeeded", "")
        # 200 {"status": "exists"}: not "success", so rejected unless already_there says so.
        assert await send(fake, {"phone": "5550100199"}) == ("dead", "rejected")
        assert await send(fake, {"phone": "5550100199"}, **there) == ("succeeded", "")
        delete = {"operation": "delete", **there}
        assert await send(fake, {"phone": "5550100199"}, **delete) == ("succeeded", "")
        assert fake.received[-1].path_qs == f"/dnpl/delete?token={KEY}"
        assert fake.received[-1].text == '{"list_id":"77","value":"5550100199"}'
        assert fake.members("77") == set()
        assert await send(fake, {"phone": "5550100199"}, **delete) == ("succeeded", "")


async def test_an_email_list_is_one_field_away() -> None:
    shape = Shape(ROUTES, auth=SHAPE.auth, identifiers={"value": "email"})
    async with serving(shape, "77") as fake:
        result = await send(fake, {"email": "No@Example.com"}, fields={"value": "{email}"})
        assert result == ("succeeded", "")
        assert fake.received[0].text == '{"list_id":"77","value":"No@Example.com"}'


async def test_no_phone_is_permanent_and_sends_nothing() -> None:
    async with serving(SHAPE, "77") as fake:
        assert await send(fake, {"email": "only@example.com"}) == ("dead", "no_identifier")
        assert fake.received == []


@pytest.mark.parametrize(("name", "reply", "want", "reason"), ANSWERS, ids=[a[0] for a in ANSWERS])
async def test_answers(name: str, reply: Scripted, want: str, reason: str) -> None:
    async with serving(SHAPE, "77") as fake:
        fake.script.append(reply)
        # Status alone decides here; the success predicate has its own test above.
        assert await send(fake, {"phone": "1"}, success=None) == (want, reason)


@pytest.mark.parametrize(
    "reply", [(500, f"token={KEY}"), (403, {"token": KEY}), "drop"], ids=["500", "403", "drop"]
)
async def test_no_secret_in_errors_records_or_logs(reply: Scripted) -> None:
    async with serving(SHAPE, "77") as fake:
        fake.script.append(reply)
        async with action_resources({"dnpl_token": KEY}) as res:
            job = make_job({"phone": "5550100199"})
            (kind, _), texts = await attempt_texts(ListClient(settings(fake), res), job)
        assert kind in ("RetryableError", "PermanentError")
        assert job.record.request is not None
        assert job.record.request.url.endswith("/dnpl/add?token=****")
        assert leaks(KEY, *texts) == []


# --- its own load errors (the shared ones are in test_listclient.py) ----------------------------

A = FIRST_SETTING_LINE - 1
HEAD = "type: dnpl\nbase_url: https://pl.example.com/api\n"


def test_list_id_is_required(tmp_path: Path) -> None:
    assert validate(tmp_path, HEAD) == [
        f"pb.yaml:{A}: postback 7: missing required key 'action.list_id'"
    ]


def test_delete_needs_remove_path(tmp_path: Path) -> None:
    assert validate(tmp_path, HEAD + "list_id: 1\noperation: delete") == [
        f"pb.yaml:{A}: postback 7: action: removing needs remove_path"
        ' (write remove_path: "" when base_url itself removes)'
    ]


def test_default_field_is_the_phone(tmp_path: Path) -> None:
    settings = dnpl.Settings.model_validate(
        {"type": "dnpl", "base_url": "https://pl.example.com/", "list_id": 1}
    )
    assert {k: t.source for k, t in settings.fields.items()} == {"value": "{phone}"}
    assert dict(settings.identifier_kinds) == {"value": "phone"}
    assert validate(tmp_path, HEAD + "list_id: 1") == []


def test_a_value_that_is_not_email_or_phone_needs_identifiers(tmp_path: Path) -> None:
    action = HEAD + "list_id: 1\nfields: {value: '{zip}'}"
    assert validate(tmp_path, action) == [
        f"pb.yaml:{A}: postback 7: action: no field is exactly {{email}} or {{phone}}:"
        " say which fields carry them in identifiers"
    ]


# --- end to end ---------------------------------------------------------------------------------


async def test_end_to_end(tmp_path: Path) -> None:
    async with serving(SHAPE, "77") as fake:
        action = f"""
            type: dnpl
            base_url: {fake.url}/dnpl
            add_path: /add
            list_id: 77
            auth: {{query: {{name: token, value: "${{secret:dnpl_token}}"}}}}
            success: {{field: status, equals: [success]}}
        """
        run = await end_to_end(
            tmp_path,
            action,
            {"dnpl_token": KEY},
            lambda: fake.members("77"),
            conversion_id="D-1",
            phone="5550100199",
        )
        assert fake.members("77") == {("phone", "5550100199")}
        assert run.state == DeliveryState.SUCCEEDED
        (attempt,) = run.attempts
        assert attempt.outcome == "succeeded"
        assert attempt.request is not None
        assert attempt.request["url"] == f"{fake.url}/dnpl/add?token=****"
        line = next(e for e in run.logs if e["event"] == "delivery_attempt")
        assert (line["action"], line["outcome"]) == ("dnpl", "succeeded")
        assert leaks(KEY, attempt, *run.logs) == []
