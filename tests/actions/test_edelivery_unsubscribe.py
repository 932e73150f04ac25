"""edelivery_unsubscribe: add and remove, the exact requests, provider answers, no secret leaks,
its own load errors, and a conversion going webhook -> rule -> the fake unsubscribe list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.actions import edelivery_unsubscribe
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

KEY = "unsub/key+9%Z"  # characters that form-encoding changes
ROUTES: dict[str, Any] = {
    "/unsubscribes": ("add", None),
    "/unsubscribes/remove": ("remove", None),
}
SHAPE = Shape(ROUTES, content="form", list_id_field="listId", auth=("body", "apiKey", KEY))
WIRE = {
    "content_type": "form",
    "list_id_field": "listId",
    "add_path": "/unsubscribes",
    "remove_path": "/unsubscribes/remove",
    "auth": {"body": {"name": "apiKey", "value": "${secret:ed_key}"}},
}


def settings(fake: FakeListService, **extra: Any) -> edelivery_unsubscribe.Settings:
    return edelivery_unsubscribe.Settings.model_validate(
        {"type": "edelivery_unsubscribe", "base_url": fake.url, "list_id": "U-1", **WIRE, **extra}
    )


async def send(fake: FakeListService, values: dict[str, str], **extra: Any) -> tuple[str, str]:
    async with action_resources({"ed_key": KEY}, timeout=0.5) as res:
        return await outcome(ListClient(settings(fake, **extra), res), make_job(values))


async def test_happy_path_exact_request() -> None:
    async with serving(SHAPE, "U-1") as fake:
        assert await send(fake, {"email": "Out@Example.com", "phone": "5550100"}) == (
            "succeeded",
            "",
        )
        (got,) = fake.received
        assert (got.method, got.path_qs) == ("POST", "/unsubscribes")
        assert (
            got.text
            == "listId=U-1&email=Out%40Example.com&phone=5550100&apiKey=unsub%2Fkey%2B9%25Z"
        )
        assert action_headers(got) == {
            "Content-Type": "application/x-www-form-urlencoded",
            "Content-Length": str(len(got.body)),
        }
        assert fake.members("U-1") == {("email", "Out@Example.com"), ("phone", "5550100")}


async def test_remove_exact_request_and_removing_an_absent_contact() -> None:
    async with serving(SHAPE, "U-1") as fake:
        fake.lists["U-1"] |= {("email", "back@example.com")}
        gone = {"operation": "remove", "already_there": {"status": 404}}
        assert await send(fake, {"email": "back@example.com"}, **gone) == ("succeeded", "")
        got = fake.received[0]
        assert (got.method, got.path_qs) == ("POST", "/unsubscribes/remove")
        assert got.text == "listId=U-1&email=back%40example.com&apiKey=unsub%2Fkey%2B9%25Z"
        assert fake.members("U-1") == set()
        # Removing again: the fake says 404 "not found", which already_there counts as done.
        assert await send(fake, {"email": "back@example.com"}, **gone) == ("succeeded", "")
        assert await send(fake, {"email": "back@example.com"}, operation="remove") == (
            "dead",
            "http_404",
        )


async def test_delete_is_a_synonym_of_remove() -> None:
    async with serving(SHAPE, "U-1") as fake:
        fake.lists["U-1"] |= {("phone", "5550100")}
        assert await send(fake, {"phone": "5550100"}, operation="delete") == ("succeeded", "")
        assert fake.received[0].path_qs == "/unsubscribes/remove"
        assert fake.members("U-1") == set()


@pytest.mark.parametrize(("name", "reply", "want", "reason"), ANSWERS, ids=[a[0] for a in ANSWERS])
async def test_answers(name: str, reply: Scripted, want: str, reason: str) -> None:
    async with serving(SHAPE, "U-1") as fake:
        fake.script.append(reply)
        assert await send(fake, {"email": "a@b.io"}, operation="remove") == (want, reason)


@pytest.mark.parametrize(
    "reply",
    [(503, f"upstream said: apiKey={KEY}"), (400, {"echo": KEY}), "hang"],
    ids=["503-echo", "400-echo", "hang"],
)
async def test_no_secret_in_errors_records_or_logs(reply: Scripted) -> None:
    async with serving(SHAPE, "U-1") as fake:
        fake.script.append(reply)
        async with action_resources({"ed_key": KEY}, timeout=0.5) as res:
            job = make_job({"email": "a@b.io"})
            (kind, _), texts = await attempt_texts(ListClient(settings(fake), res), job)
        assert kind in ("RetryableError", "PermanentError")
        assert job.record.request is not None
        assert job.record.request.body == "listId=U-1&email=a%40b.io&apiKey=****"
        assert leaks(KEY, *texts) == []
        assert leaks("unsub%2Fkey%2B9%25Z", *texts) == []  # nor its form-encoded form


# --- its own load errors (the shared ones are in test_listclient.py) ----------------------------

A = FIRST_SETTING_LINE - 1
HEAD = "type: edelivery_unsubscribe\nbase_url: https://ed.example.com/api\n"


def test_list_id_is_required(tmp_path: Path) -> None:
    assert validate(tmp_path, HEAD) == [
        f"pb.yaml:{A}: postback 7: missing required key 'action.list_id'"
    ]


def test_removing_needs_remove_path(tmp_path: Path) -> None:
    action = HEAD + "list_id: 1\noperation: remove\nadd_path: /add"
    assert validate(tmp_path, action) == [
        f"pb.yaml:{A}: postback 7: action: removing needs remove_path"
        ' (write remove_path: "" when base_url itself removes)'
    ]


def test_operation_is_add_remove_or_delete(tmp_path: Path) -> None:
    action = HEAD + "list_id: 1\noperation: purge"
    assert validate(tmp_path, action) == [
        f"pb.yaml:{A + 4}: postback 7: action.operation: must be add, remove or delete, not 'purge'"
    ]


def test_remove_on_base_url_itself_loads(tmp_path: Path) -> None:
    action = HEAD + 'list_id: 1\noperation: remove\nremove_path: ""'
    assert validate(tmp_path, action) == []


# --- end to end ---------------------------------------------------------------------------------


async def test_end_to_end(tmp_path: Path) -> None:
    async with serving(SHAPE, "U-1") as fake:
        action = f"""
            type: edelivery_unsubscribe
            base_url: {fake.url}
            list_id: U-1
            list_id_field: listId
            content_type: form
            add_path: /unsubscribes
            auth: {{body: {{name: apiKey, value: "${{secret:ed_key}}"}}}}
        """
        run = await end_to_end(
            tmp_path,
            action,
            {"ed_key": KEY},
            lambda: fake.members("U-1"),
            conversion_id="U-9",
            phone="555 0100",
        )
        assert fake.members("U-1") == {("phone", "555 0100")}
        assert run.state == DeliveryState.SUCCEEDED
        (attempt,) = run.attempts
        assert attempt.outcome == "succeeded"
        assert attempt.request is not None
        assert attempt.request["body"] == "listId=U-1&phone=555+0100&apiKey=****"
        line = next(e for e in run.logs if e["event"] == "delivery_attempt")
        assert (line["action"], line["outcome"]) == ("edelivery_unsubscribe", "succeeded")
        assert leaks(KEY, attempt, *run.logs) == []
        assert leaks("unsub%2Fkey%2B9%25Z", attempt, *run.logs) == []
