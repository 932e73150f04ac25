"""opt_intel_unsubscribe: add or remove, plain or MD5, the exact requests, provider answers, no
secret leaks, its own load errors (the remove paths must be configured), and a conversion going
webhook -> rule -> the fake Opt-Intel unsubscribe list."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from daemon.actions import opt_intel_unsubscribe
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

KEY = "oi-unsub-key-4242"
ROUTES: dict[str, Any] = {
    "/unsub/emails-add": ("add", "email"),
    "/unsub/phones-add": ("add", "phone"),
    "/unsub/emails-remove": ("remove", "email"),
    "/unsub/phones-remove": ("remove", "phone"),
}
SHAPE = Shape(
    ROUTES,
    content="form",
    list_id_field="list",
    auth=("header", "X-Auth-Key", KEY),
    missing=(404, {"message": "not in list"}),
)
BOTH = {"email": "  Leave.Me@Example.COM ", "phone": "+1 (555) 010-0199"}
EMAIL_MD5 = hashlib.md5(b"leave.me@example.com").hexdigest()  # noqa: S324
PHONE_MD5 = hashlib.md5(b"15550100199").hexdigest()  # noqa: S324


def settings(fake: FakeListService, **extra: Any) -> opt_intel_unsubscribe.Settings:
    return opt_intel_unsubscribe.Settings.model_validate(
        {
            "type": "opt_intel_unsubscribe",
            "base_url": f"{fake.url}/unsub",
            "content_type": "form",
            "list_id": "S-9",
            "list_id_field": "list",
            "hashing": "md5",
            "auth": {"header": {"name": "X-Auth-Key", "value": "${secret:oi_key}"}},
            "email_remove_path": "/emails-remove",
            "phone_remove_path": "/phones-remove",
            **extra,
        }
    )


async def send(fake: FakeListService, values: dict[str, str], **extra: Any) -> tuple[str, str]:
    async with action_resources({"oi_key": KEY}, timeout=0.5) as res:
        return await outcome(ListClient(settings(fake, **extra), res), make_job(values))


async def test_happy_path_exact_requests_md5() -> None:
    async with serving(SHAPE, "S-9") as fake:
        assert await send(fake, BOTH) == ("succeeded", "")
        first, second = fake.received
        assert (first.method, first.path_qs) == ("POST", "/unsub/emails-add")
        assert first.text == f"list=S-9&email={EMAIL_MD5}"
        assert (second.method, second.path_qs) == ("POST", "/unsub/phones-add")
        assert second.text == f"list=S-9&phone={PHONE_MD5}"
        for got in (first, second):
            assert action_headers(got) == {
                "X-Auth-Key": KEY,
                "Content-Type": "application/x-www-form-urlencoded",
                "Content-Length": str(len(got.body)),
            }
        assert fake.members("S-9") == {("email", EMAIL_MD5), ("phone", PHONE_MD5)}


async def test_plain_sends_the_trimmed_value() -> None:
    async with serving(SHAPE, "S-9") as fake:
        assert await send(fake, BOTH, hashing="plain") == ("succeeded", "")
        assert [g.text for g in fake.received] == [
            "list=S-9&email=Leave.Me%40Example.COM",
            "list=S-9&phone=%2B1+%28555%29+010-0199",
        ]


async def test_remove_uses_the_configured_paths_and_absent_is_done() -> None:
    async with serving(SHAPE, "S-9") as fake:
        fake.lists["S-9"] |= {("email", EMAIL_MD5), ("phone", PHONE_MD5)}
        gone = {"operation": "remove", "already_there": {"status": 404}}
        assert await send(fake, BOTH, **gone) == ("succeeded", "")
        assert [g.path_qs for g in fake.received] == [
            "/unsub/emails-remove",
            "/unsub/phones-remove",
        ]
        assert fake.received[0].text == f"list=S-9&email={EMAIL_MD5}"
        assert fake.members("S-9") == set()
        assert await send(fake, BOTH, **gone) == ("succeeded", "")
        assert await send(fake, BOTH, operation="remove") == ("dead", "http_404")


async def test_a_phone_without_digits_is_not_hashed_into_the_list() -> None:
    async with serving(SHAPE, "S-9") as fake:
        assert await send(fake, {"email": "a@b.io", "phone": "none"}) == ("succeeded", "")
        assert [g.path_qs for g in fake.received] == ["/unsub/emails-add"]


@pytest.mark.parametrize(("name", "reply", "want", "reason"), ANSWERS, ids=[a[0] for a in ANSWERS])
async def test_answers(name: str, reply: Scripted, want: str, reason: str) -> None:
    async with serving(SHAPE, "S-9") as fake:
        fake.script.append(reply)
        result = await send(fake, {"phone": "555 0100"}, operation="remove")
        assert result == (want, reason)
        assert [g.path_qs for g in fake.received] == ["/unsub/phones-remove"]


@pytest.mark.parametrize(
    "reply", [(502, f"X-Auth-Key: {KEY}"), (401, {"key": KEY}), "hang"], ids=["502", "401", "hang"]
)
async def test_no_secret_in_errors_records_or_logs(reply: Scripted) -> None:
    async with serving(SHAPE, "S-9") as fake:
        fake.script.append(reply)
        async with action_resources({"oi_key": KEY}, timeout=0.5) as res:
            job = make_job(BOTH)
            (kind, _), texts = await attempt_texts(ListClient(settings(fake), res), job)
        assert kind in ("RetryableError", "PermanentError")
        assert job.record.request is not None
        assert job.record.request.headers["X-Auth-Key"] == "****"
        assert leaks(KEY, *texts) == []


# --- its own load errors (the shared ones are in test_listclient.py) ----------------------------

A = FIRST_SETTING_LINE - 1
HEAD = (
    "type: opt_intel_unsubscribe\nbase_url: https://oi.example.com/l/1\n"
    "auth: {header: {name: X-Key, value: '${secret:k}'}}\n"
)


def test_removing_needs_both_remove_paths(tmp_path: Path) -> None:
    assert validate(tmp_path, HEAD + "operation: remove") == [
        f"pb.yaml:{A}: postback 7: action: removing needs email_remove_path and"
        " phone_remove_path: Opt-Intel's remove endpoint is not public; copy it from the"
        " list's API Doc (/emails-delete and /phones-delete are unverified guesses)"
    ]


def test_removing_emails_only_needs_the_email_path(tmp_path: Path) -> None:
    action = HEAD + "operation: delete\nfields: {email: '{email}'}"
    assert validate(tmp_path, action) == [
        f"pb.yaml:{A}: postback 7: action: removing needs email_remove_path: Opt-Intel's"
        " remove endpoint is not public; copy it from the list's API Doc (/emails-delete and"
        " /phones-delete are unverified guesses)"
    ]
    assert validate(tmp_path, action + "\nemail_remove_path: /emails-delete") == []


def test_remove_path_starts_with_a_slash(tmp_path: Path) -> None:
    action = HEAD + "operation: remove\nemail_remove_path: x\nphone_remove_path: /y"
    assert validate(tmp_path, action) == [
        f"pb.yaml:{A}: postback 7: action: email_remove_path must start with /"
    ]


def test_auth_is_required(tmp_path: Path) -> None:
    action = "type: opt_intel_unsubscribe\nbase_url: https://oi.example.com/l/1"
    assert validate(tmp_path, action) == [
        f"pb.yaml:{A}: postback 7: missing required key 'action.auth'"
    ]


def test_adding_needs_no_remove_path(tmp_path: Path) -> None:
    assert validate(tmp_path, HEAD + "hashing: md5") == []


# --- end to end ---------------------------------------------------------------------------------


async def test_end_to_end(tmp_path: Path) -> None:
    async with serving(SHAPE, "S-9") as fake:
        action = f"""
            type: opt_intel_unsubscribe
            base_url: {fake.url}/unsub
            content_type: form
            list_id: S-9
            list_id_field: list
            hashing: md5
            auth: {{header: {{name: X-Auth-Key, value: "${{secret:oi_key}}"}}}}
        """
        run = await end_to_end(
            tmp_path,
            action,
            {"oi_key": KEY},
            lambda: fake.members("S-9"),
            conversion_id="OU-1",
            email=" Leave.Me@Example.COM",
        )
        assert fake.members("S-9") == {("email", EMAIL_MD5)}
        assert run.state == DeliveryState.SUCCEEDED
        (attempt,) = run.attempts
        assert attempt.outcome == "succeeded"
        assert attempt.request is not None
        assert attempt.request["body"] == f"list=S-9&email={EMAIL_MD5}"
        assert attempt.request["headers"]["X-Auth-Key"] == "****"
        line = next(e for e in run.logs if e["event"] == "delivery_attempt")
        assert (line["action"], line["outcome"]) == ("opt_intel_unsubscribe", "succeeded")
        assert leaks(KEY, attempt, *run.logs) == []
