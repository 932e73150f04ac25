"""lms_post_lead against a loopback fake LMS: the exact request (JSON and form), the answers
that succeed, end dead, are retried or end outcome_unknown, the password kept out of every record,
the settings errors an ops person sees, and the webhook-to-fake path, including the proof that a
post whose answer never came is not posted again."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from structlog.testing import capture_logs

from daemon.actions import lms_post_lead
from daemon.actions.base import Job
from daemon.errors import DeliveryError, OutcomeUnknownError, PermanentError, RetryableError
from daemon.outbound import OutboundHttp
from daemon.store.base import DeliveryState
from tests.actions import kit
from tests.actions.fakes_lms import FakeLms, lms
from tests.actions.kit import expect_outcome, load_issues, make_resources, secret_env
from tests.harness import FakeClock, start_daemon, wait_for

API_ID = "api-7f3a"
PASSWORD = "lms-Pw&d=9 q\"x'"
SECRETS = {"lms_password": PASSWORD}
ENV = secret_env(SECRETS)
VALUES = {
    "first_name": "John",
    "email": "j@x.com",
    "phone": "5555555555",
    "zip": "90210",
    "trusted_form_cert_url": "https://cert.trustedform.com/abc",
    "conversion_id": "C1",
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeLms]:
    server = await FakeLms(api_id=API_ID, api_password=PASSWORD).start()
    yield server
    await server.close()


def make_action(http: Any, base_url: str, **settings: Any) -> lms_post_lead.LmsPostLead:
    raw = {
        "type": "lms_post_lead",
        "base_url": base_url,
        "api_id": API_ID,
        "api_password": "${secret:lms_password}",
        "product_id": 218,
        "fields": {
            "firstName": "{first_name}",
            "email": "{email}",
            "cellPhone": "{phone}",
            "zip": "{zip}",
            "trustedFormUrl": "{trusted_form_cert_url}",
            "subId": "{sub1}",
        },
        **settings,
    }
    settings = lms_post_lead.Settings.model_validate(raw)
    return lms_post_lead.build(settings, make_resources(http, SECRETS))


def make_job(**fields: str) -> Job:
    """This file's lead, as `fields` change it, for postback 9."""
    return kit.make_job({**VALUES, **fields}, postback_id=9)


async def test_happy_path_posts_exactly_this_json(fake: FakeLms, http: OutboundHttp) -> None:
    action = make_action(http, fake.url + "/")
    assert action.idempotent is False
    job = make_job()
    await action.send(job)
    (got,) = fake.received
    assert got.method == "POST"
    assert got.path_qs == "/lead/"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["Accept"] == "application/json"
    expected = {
        "apiId": API_ID,
        "apiPassword": PASSWORD,
        "productId": 218,
        "firstName": "John",
        "email": "j@x.com",
        "cellPhone": "5555555555",
        "zip": "90210",
        "trustedFormUrl": "https://cert.trustedform.com/abc",
    }  # subId: {sub1} rendered empty, so left out
    assert got.body == json.dumps(expected, separators=(",", ":")).encode()
    assert job.record.request is not None
    assert job.record.request.url == fake.url + "/lead/"
    assert json.loads(job.record.request.body or "")["apiPassword"] == "****"
    assert job.record.response_status == 200


async def test_form_and_test_mode(fake: FakeLms, http: OutboundHttp) -> None:
    action = make_action(http, fake.url, format="form", test_mode=True, test_sold=True)
    await action.send(make_job())
    (got,) = fake.received
    assert got.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert got.text == (
        f"apiId={API_ID}&apiPassword={quote(PASSWORD, safe='*').replace('%20', '+')}"
        "&productId=218&firstName=John&email=j%40x.com&cellPhone=5555555555&zip=90210"
        "&trustedFormUrl=https%3A%2F%2Fcert.trustedform.com%2Fabc&testMode=1&testSold=1"
    )
    assert fake.lead()["apiPassword"] == PASSWORD


async def test_the_fake_lms_outcomes_through_the_action(fake: FakeLms, http: OutboundHttp) -> None:
    """The fake's own rules (not a script): sold, duplicate, missing field, test-mode reject."""
    action = make_action(http, fake.url)
    await action.send(make_job())
    with pytest.raises(PermanentError, match=r"^lms_duplicate$"):
        await action.send(make_job())
    with pytest.raises(PermanentError, match=r"^lms_error: first error: cellPhone$"):
        await action.send(make_job(email="k@x.com", phone=""))
    with pytest.raises(PermanentError, match=r"^lms_rejected"):
        await make_action(http, fake.url, test_mode=True).send(make_job(email="t@x.com"))
    wrong = make_action(http, fake.url, api_id="someone-else")
    with pytest.raises(PermanentError, match=r"^lms_auth_failed$"):
        await wrong.send(make_job(email="u@x.com"))


AUTH_FAILED = "Authorization Failed. ApiId and ApiPassword you entered don't match."
ANSWERS: list[tuple[str, Any, type[DeliveryError] | None, str | None]] = [
    ("1 sold", (200, lms(1, lead_id="W_O0QO", price="1.0000")), None, None),
    ("1 sold, as a string", (200, lms("1")), None, None),  # type: ignore[arg-type]
    ("3 in progress: accepted", (200, lms(3, lead_id="W_P")), None, None),
    ("2 rejected", (200, lms(2, lead_id="23")), PermanentError, "lms_rejected"),
    (
        "4 duplicate",
        (200, lms(4, errors=[{"Duplicate Application": "Duplicate Application"}])),
        PermanentError,
        "lms_duplicate",
    ),
    ("4 auth", (200, lms(4, errors=[{AUTH_FAILED: ""}])), PermanentError, "lms_auth_failed"),
    (
        "4 auth, short",
        (200, lms(4, errors=[{"Authorization Failed": ""}])),
        PermanentError,
        "lms_auth_failed",
    ),
    (
        "4 user disabled",
        (200, lms(4, errors=[["Current user is disabled. Please contact your account manager."]])),
        PermanentError,
        "lms_user_disabled",
    ),
    ("4 field", (200, lms(4, errors=[{"email": "required"}])), PermanentError, "lms_error"),
    ("4 without errors", (200, lms(4)), PermanentError, "lms_error"),
    ("5 unknown lead", (200, lms(5)), OutcomeUnknownError, "outcome_unknown"),
    ("no status", (200, '{"lead_id": "X"}'), OutcomeUnknownError, "outcome_unknown"),
    ("not JSON", (200, "<html>Service Unavailable</html>"), OutcomeUnknownError, "outcome_unknown"),
    ("a JSON list", (200, "[1]"), OutcomeUnknownError, "outcome_unknown"),
    ("500", (500, ""), OutcomeUnknownError, "outcome_unknown"),
    ("502 gateway", (502, "Bad Gateway"), OutcomeUnknownError, "outcome_unknown"),
    ("503", (503, ""), OutcomeUnknownError, "outcome_unknown"),
    ("504 gateway timeout", (504, ""), OutcomeUnknownError, "outcome_unknown"),
    ("408 not processed", (408, ""), RetryableError, "http_408"),
    ("429 not processed", (429, ""), RetryableError, "http_429"),
    ("401", (401, ""), PermanentError, "http_401"),
    ("404 wrong base_url", (404, "Not Found"), PermanentError, "http_404"),
    ("timeout after sending", "hang", OutcomeUnknownError, "outcome_unknown"),
    ("connection dropped after sending", "drop", OutcomeUnknownError, "outcome_unknown"),
]


@pytest.mark.parametrize(
    ("reply", "error", "reason"), [a[1:] for a in ANSWERS], ids=[a[0] for a in ANSWERS]
)
async def test_answers_are_classified(
    fake: FakeLms,
    http: OutboundHttp,
    reply: Any,
    error: type[DeliveryError] | None,
    reason: str | None,
) -> None:
    fake.script.append(reply)
    action = make_action(http, fake.url, timeout="300ms")
    await expect_outcome(action, make_job(), error, reason)
    assert len(fake.received) == 1


async def test_a_refused_connection_sent_nothing_and_is_retried(http: OutboundHttp) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RetryableError) as caught:
        await make_action(http, f"http://127.0.0.1:{port}").send(make_job())
    assert caught.value.reason == "connect_failed"


# --- secrets ----------------------------------------------------------------------------------


def _assert_clean(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text
        assert json.dumps(PASSWORD)[1:-1] not in text
        assert quote(PASSWORD) not in text


@pytest.mark.parametrize(
    "reply",
    [
        (200, lms(4, errors=[{f"apiPassword {PASSWORD} is wrong": ""}])),
        (200, lms(1, echo=PASSWORD)),
        (500, f"Internal error for apiPassword={PASSWORD}"),
        (200, f"not json {PASSWORD}"),
        "hang",
    ],
)
async def test_the_password_never_reaches_errors_records_or_logs(
    fake: FakeLms, http: OutboundHttp, reply: Any
) -> None:
    fake.script.append(reply)
    for fmt in ("json", "form"):
        action = make_action(http, fake.url, format=fmt, timeout="300ms")
        job = make_job()
        error: Exception | None = None
        with capture_logs() as logs:
            try:
                await action.send(job)
            except DeliveryError as err:
                error = err
        assert job.record.request is not None
        _assert_clean(
            str(error),
            repr(error),
            repr(getattr(error, "__cause__", None)),
            json.dumps(job.record.request.as_dict()),
            job.record.response_excerpt or "",
            repr(logs),
            json.dumps(action.preview(make_job()).as_dict()),
        )
        fake.script.append(reply)
    assert fake.lead(0)["apiPassword"] == PASSWORD  # it was sent, to LMS only


# --- settings errors, as `postbackd validate` prints them ---------------------------------------

RULE = """\
offer: 1
postbacks:
  - id: 9
    trigger: conversion_done
    affiliate: "*"
    action:
      type: lms_post_lead
      base_url: {base}
      api_id: api-7f3a
      api_password: "${{secret:lms_password}}"
      product_id: 218
      fields: {{firstName: "{{first_name}}", email: "{{email}}", cellPhone: "{{phone}}"}}
      {extra}
"""


def validation_errors(tmp_path: Path, extra: str = "", **replace: str) -> list[str]:
    rule = RULE.format(
        base=replace.pop("base", "https://leads-inst1-client.phonexa.com"), extra=extra
    )
    for old, new in replace.items():
        rule = rule.replace(old, new)
    return load_issues(tmp_path / "rules.d", {"offer-1.yaml": rule})


def test_a_valid_rule_loads(tmp_path: Path) -> None:
    assert (
        validation_errors(tmp_path, "format: form\n      test_mode: true\n      timeout: 2m") == []
    )


@pytest.mark.parametrize(
    ("extra", "replace", "message"),
    [
        (
            "",
            {"base": "https://{extra.instance}.phonexa.com"},
            "8: postback 9: action.base_url: a macro cannot set the URL's scheme, host or port",
        ),
        (
            "",
            {"base": "https://leads-inst1-client.phonexa.com/{extra.path}"},
            "8: postback 9: action.base_url: cannot hold macros or secrets",
        ),
        (
            "",
            {"base": "https://leads-inst1-client.phonexa.com/?x=1"},
            "8: postback 9: action.base_url: cannot have a query or a fragment",
        ),
        (
            "",
            {"base": "leads-inst1-client.phonexa.com"},
            "8: postback 9: action.base_url: not an absolute URL: it must start with http://"
            " or https://",
        ),
        (
            "",
            {'"${secret:lms_password}"': "hunter2"},
            "10: postback 9: action.api_password: must be a ${secret:NAME} reference,"
            " not literal text",
        ),
        (
            "",
            {"product_id: 218": "product_id: 0"},
            "11: postback 9: action.product_id: Input should be greater than 0",
        ),
        (
            "",
            {'cellPhone: "{phone}"': 'apiId: "{phone}"'},
            "12: postback 9: action.fields: 'apiId' is set by the action, not in fields",
        ),
        (
            "",
            {'cellPhone: "{phone}"': '"cell phone": "{phone}"'},
            "12: postback 9: action.fields: 'cell phone' is not an LMS field name"
            " (e.g. firstName, cellPhone)",
        ),
        (
            "",
            {'cellPhone: "{phone}"': 'cellPhone: "{cell}"'},
            "12: postback 9: action.fields.cellPhone: unknown macro {cell}"
            " (write {{ and }} for literal braces)",
        ),
        (
            "format: xml",
            {},
            "13: postback 9: action.format: must be json or form, not 'xml'",
        ),
        (
            "test_sold: true",
            {},
            "6: postback 9: action: test_sold applies only with test_mode: true",
        ),
        (
            "timeout: 121s",
            {},
            "13: postback 9: action.timeout: Input should be less than or equal to 120",
        ),
        ("closeConnection: 1", {}, "13: postback 9: unknown key 'action.closeConnection'"),
        (
            "",
            {"      product_id: 218\n": ""},
            "6: postback 9: missing required key 'action.product_id'",
        ),
    ],
)
def test_settings_errors_name_file_line_and_postback(
    tmp_path: Path, extra: str, replace: dict[str, str], message: str
) -> None:
    assert validation_errors(tmp_path, extra, **replace) == [f"offer-1.yaml:{message}"]


def test_fields_must_not_be_empty(tmp_path: Path) -> None:
    fields = 'fields: {firstName: "{first_name}", email: "{email}", cellPhone: "{phone}"}'
    assert validation_errors(tmp_path, "", **{fields: "fields: {}"}) == [
        "offer-1.yaml:12: postback 9: action.fields: Dictionary should have at least 1 item"
        " after validation, not 0"
    ]


# --- end to end -------------------------------------------------------------------------------


def e2e_rules(fake: FakeLms, extra: str = "") -> dict[str, str]:
    return {"offer-1.yaml": RULE.format(base=fake.url, extra=extra)}


async def delivery_ended(daemon: Any) -> Any:
    rows = await daemon.deliveries()
    done = {DeliveryState.SUCCEEDED, DeliveryState.DEAD}
    return rows if rows and all(r.state in done for r in rows) else None


async def test_webhook_to_rule_to_lms(tmp_path: Path, fake: FakeLms) -> None:
    daemon = await start_daemon(tmp_path, e2e_rules(fake), environ=ENV)
    try:
        with capture_logs() as logs:
            await daemon.post(
                conversion_id="E1",
                offer=1,
                affiliate=42,
                status="approved",
                first_name="Ann",
                email="ann@x.com",
                phone="5551230000",
            )
            rows = await wait_for(lambda: delivery_ended(daemon))
        assert fake.lead() == {
            "apiId": API_ID,
            "apiPassword": PASSWORD,
            "productId": 218,
            "firstName": "Ann",
            "email": "ann@x.com",
            "cellPhone": "5551230000",
        }
        (row,) = rows
        assert row.state == DeliveryState.SUCCEEDED
        detail = await daemon.services.store.get_delivery(row.delivery_id)
        assert detail is not None
        (attempt,) = detail.attempts
        assert attempt.request is not None
        assert json.loads(attempt.request["body"])["apiPassword"] == "****"
        assert '"status": 1' in (attempt.response_excerpt or "")
        _assert_clean(repr(detail), repr(logs))
    finally:
        await daemon.client.close()


async def test_a_post_without_answer_is_dead_and_never_posted_again(
    tmp_path: Path, fake: FakeLms
) -> None:
    fake.script.append("hang")  # answers only after the action's deadline has passed
    clock = FakeClock()
    daemon = await start_daemon(
        tmp_path, e2e_rules(fake, "timeout: 300ms"), environ=ENV, clock=clock
    )
    try:
        with capture_logs() as logs:
            await daemon.post(
                conversion_id="T1",
                offer=1,
                affiliate=42,
                status="approved",
                email="t@x.com",
                phone="5551230000",
            )
            (row,) = await wait_for(lambda: delivery_ended(daemon))
            # The attempt's line is logged once its result is stored: a moment after the row
            # shows it, so it is waited for here, inside the capture.
            line = await wait_for(
                lambda: next((e for e in logs if e["event"] == "delivery_attempt"), None)
            )
        assert row.state == DeliveryState.DEAD
        assert row.last_reason == "outcome_unknown"
        fake.release.set()  # the fake now finishes its (late) answer; nobody is listening
        dispatcher = daemon.services.dispatcher
        for _ in range(5):  # days later, many dispatch cycles: nothing is due
            clock.advance(86400.0)
            assert await dispatcher.dispatch_once() == 0
            await dispatcher.drain()
        assert len(fake.received) == 1
        detail = await daemon.services.store.get_delivery(row.delivery_id)
        assert detail is not None
        assert [a.reason for a in detail.attempts] == ["outcome_unknown"]
        assert (line["outcome"], line["reason"]) == ("dead", "outcome_unknown")
    finally:
        await daemon.client.close()
