"""twilio_sms against a fake Twilio on loopback: the exact request, the E.164 normaliser, how
every answer is classified, secrets kept out of errors, records and logs, load-time
validation, and the whole path from a webhook to the fake."""

from __future__ import annotations

import base64
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon.actions import twilio_sms
from daemon.actions.base import Resources
from daemon.actions.twilio_sms import normalize_e164
from daemon.errors import DeliveryError, OutcomeUnknownError, PermanentError, RetryableError
from daemon.outbound import OutboundHttp
from daemon.store.base import DeliveryState
from tests.actions.fakes_twilio import FakeTwilio, twilio_error
from tests.actions.kit import (
    FIRST_SETTING_LINE,
    Reply,
    end_to_end,
    expect_outcome,
    leaks,
    make_job,
    make_resources,
    rule_file,
    validate,
)

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "twilioAuthSeCrEt0001"
KEY_SID = "SK" + "fedcba9876543210" * 2
KEY_SECRET = "twilioKeySeCrEt0002"
SERVICE = "MG" + "00112233445566778899aabbccddeeff"
SECRETS = {"twilio_token": TOKEN, "twilio_key": KEY_SECRET, "twilio_sid": SID}
L = FIRST_SETTING_LINE


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    fake = await FakeTwilio(SID, {SID: TOKEN, KEY_SID: KEY_SECRET}).start()
    yield fake
    await fake.close()


@pytest.fixture
def resources(http: OutboundHttp) -> Resources:
    return make_resources(http, SECRETS)


def action(twilio: FakeTwilio, resources: Resources, **extra: Any) -> Any:
    raw = {
        "type": "twilio_sms",
        "account_sid": SID,
        "auth_token": "${secret:twilio_token}",
        "from": "+15005550006",
        "to": "{phone}",
        "body": "Lead {conversion_id} paid {payout}",
        "base_url": twilio.url,
        **extra,
    }
    settings = twilio_sms.Settings.model_validate({k: v for k, v in raw.items() if v is not None})
    return twilio_sms.build(settings, resources)


VALUES = {"phone": "(555) 123-4567", "payout": "12.50"}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- the exact request --------------------------------------------------------------------


async def test_sends_the_exact_request(twilio: FakeTwilio, resources: Resources) -> None:
    job = make_job(VALUES)
    sms = action(twilio, resources, status_callback="https://cb.example.com/sms?d={delivery_id}")
    await sms.send(job)
    (got,) = twilio.received
    assert got.method == "POST"
    assert got.path_qs == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert got.headers["Authorization"] == basic(SID, TOKEN)
    assert got.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert got.headers["Accept"] == "application/json"
    assert got.body == (
        b"To=%2B15551234567&From=%2B15005550006&Body=Lead+T-1+paid+12.50"
        b"&StatusCallback=https%3A%2F%2Fcb.example.com%2Fsms%3Fd%3Dd-1"
    )
    assert job.record.request is not None
    assert job.record.request.headers["Authorization"] == "****"
    assert job.record.response_status == 201
    assert '"sid": "SM' in (job.record.response_excerpt or "")


async def test_api_key_and_messaging_service(twilio: FakeTwilio, resources: Resources) -> None:
    sms = action(
        twilio,
        resources,
        account_sid="${secret:twilio_sid}",
        auth_token=None,
        api_key_sid=KEY_SID,
        api_key_secret="${secret:twilio_key}",
        messaging_service_sid=SERVICE,
        **{"from": None},
    )
    job = make_job({"phone": "+44 7911 123456"})
    await sms.send(job)
    (got,) = twilio.received
    assert got.path_qs == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert got.headers["Authorization"] == basic(KEY_SID, KEY_SECRET)
    assert twilio.form() == [
        ("To", "+447911123456"),
        ("MessagingServiceSid", SERVICE),
        ("Body", "Lead T-1 paid "),
    ]
    assert job.record.request is not None
    # The account SID came from a secret, so the record masks it in the path.
    assert job.record.request.url == f"{twilio.url}/2010-04-01/Accounts/****/Messages.json"


def test_preview_masks_credentials() -> None:
    settings = twilio_sms.Settings.model_validate(
        {
            "type": "twilio_sms",
            "account_sid": "${secret:twilio_sid}",
            "auth_token": "${secret:twilio_token}",
            "from": "+15005550006",
            "to": "{phone}",
            "body": "Lead {conversion_id}",
        }
    )
    resources = Resources(http=None, secret=SECRETS.__getitem__, clock=None)  # type: ignore[arg-type]
    sms = twilio_sms.build(settings, resources)
    assert sms.destination == "https://api.twilio.com:443"
    assert sms.preview(make_job(VALUES)).as_dict() == {
        "method": "POST",
        "url": "https://api.twilio.com/2010-04-01/Accounts/****/Messages.json",
        "headers": {
            "Authorization": "****",
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        },
        "body": "To=%2B15551234567&From=%2B15005550006&Body=Lead+T-1",
    }


# --- E.164 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "country", "expected"),
    [
        ("+15551234567", "1", "+15551234567"),
        ("15551234567", "1", "+15551234567"),
        ("(555) 123-4567", "1", "+15551234567"),
        ("555.123.4567", "1", "+15551234567"),
        ("+1 (555) 123-4567", "1", "+15551234567"),
        ("1-555-123-4567", "1", "+15551234567"),
        ("  +1 555 123 4567 ", "1", "+15551234567"),
        ("001 555 123 4567", "1", "+15551234567"),
        ("+44 7911 123456", "1", "+447911123456"),
        ("07911 123456", "44", "+447911123456"),
        ("447911123456", "44", "+447911123456"),
        ("7911 123456", "44", "+447911123456"),
        ("0044 7911 123456", "44", "+447911123456"),
        ("", "1", None),
        ("555-1234", "1", None),  # 7 digits: no area code
        ("25551234567", "1", None),  # 11 digits not starting with the country code
        ("+1 155 123 4567", "1", None),  # NANP area codes start with 2-9
        ("+1 555 123 456", "1", None),  # one digit short
        ("+0 555 123 4567", "1", None),
        ("+1234567890123456", "1", None),  # 16 digits
        ("555-CALL-NOW", "1", None),
        ("+1 555 123 4567 ext 2", "1", None),
        ("٥٥٥١٢٣٤٥٦٧", "1", None),  # non-ASCII digits
        ("+1555123456７", "1", None),  # a fullwidth digit
        ("whatsapp:+15551234567", "1", None),
    ],
)
def test_normalize_e164(raw: str, country: str, expected: str | None) -> None:
    assert normalize_e164(raw, country) == expected


@given(st.text(max_size=30), st.sampled_from(["1", "44", "353", "7"]))
def test_normalize_e164_returns_e164_or_none(raw: str, country: str) -> None:
    result = normalize_e164(raw, country)
    assert result is None or re.fullmatch(r"\+[1-9][0-9]{6,14}", result)


@pytest.mark.parametrize(
    ("phone", "reason"), [("not a number", "invalid_to"), ("", "missing_to"), ("  ", "missing_to")]
)
async def test_bad_recipient_is_permanent_and_unsent(
    twilio: FakeTwilio, resources: Resources, phone: str, reason: str
) -> None:
    with pytest.raises(PermanentError) as info:
        await action(twilio, resources).send(make_job({"phone": phone}))
    assert info.value.reason == reason
    assert twilio.received == []


async def test_body_over_1600_characters_is_permanent_and_unsent(
    twilio: FakeTwilio, resources: Resources
) -> None:
    sms = action(twilio, resources, body="{extra.msg}")
    await sms.send(make_job(VALUES, raw={"extra.msg": "é" * 1600}))
    assert len(twilio.received) == 1
    with pytest.raises(PermanentError) as info:
        await sms.send(make_job(VALUES, raw={"extra.msg": "é" * 1601}))
    assert info.value.reason == "body_too_long"
    assert len(twilio.received) == 1


# --- what each answer means -----------------------------------------------------------------

ANSWERS: list[tuple[str, Reply, type[DeliveryError] | None, str | None, float | None]] = [
    ("201 with sid", (201, '{"sid": "SM1", "status": "queued"}', {}), None, None, None),
    ("21211 invalid To", (400, twilio_error(400, 21211), {}), PermanentError, "twilio_21211", None),
    ("21610 unsubscribed", (400, twilio_error(400, 21610), {}),
     PermanentError, "twilio_21610", None),
    ("21408 region", (400, twilio_error(400, 21408), {}), PermanentError, "twilio_21408", None),
    ("20003 auth", (401, twilio_error(401, 20003), {}), PermanentError, "twilio_20003", None),
    ("404 not JSON", (404, "<html>no</html>", {}), PermanentError, "http_404", None),
    ("429 20429", (429, twilio_error(429, 20429), {"Retry-After": "5"}),
     RetryableError, "twilio_20429", 5.0),
    ("429 bare", (429, "", {}), RetryableError, "http_429", None),
    ("20429 on another status", (400, twilio_error(400, 20429), {}),
     RetryableError, "twilio_20429", None),
    ("500", (500, twilio_error(500, 20500), {}), OutcomeUnknownError, "outcome_unknown", None),
    ("503", (503, "", {}), OutcomeUnknownError, "outcome_unknown", None),
    ("201 without sid", (201, "<html/>", {}), OutcomeUnknownError, "outcome_unknown", None),
    ("no answer", "hang", OutcomeUnknownError, "outcome_unknown", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("reply", "error", "reason", "retry_after"),
    [row[1:] for row in ANSWERS],
    ids=[row[0] for row in ANSWERS],
)
async def test_answers(
    twilio: FakeTwilio,
    resources: Resources,
    reply: Reply,
    error: type[DeliveryError] | None,
    reason: str | None,
    retry_after: float | None,
) -> None:
    twilio.script.append(reply)
    sms = action(twilio, resources, timeout=0.3)
    job = make_job(VALUES)
    await expect_outcome(sms, job, error, reason, retry_after)
    assert len(twilio.received) == 1  # never retried inside the action
    assert job.record.request is not None


async def test_the_fake_rejects_what_twilio_rejects(
    twilio: FakeTwilio, resources: Resources
) -> None:
    wrong = make_resources(resources.http, {"twilio_token": "wrong-token-0000"})
    with pytest.raises(PermanentError) as info:
        await action(twilio, wrong).send(make_job(VALUES))
    assert info.value.reason == "twilio_20003"


async def test_refused_connection_is_retryable(twilio: FakeTwilio, resources: Resources) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(RetryableError) as info:
        await action(twilio, resources, base_url=closed).send(make_job(VALUES))
    assert info.value.reason == "connect_failed"


# --- secrets ------------------------------------------------------------------------------


@pytest.mark.parametrize("reply", [(401, twilio_error(401, 20003), {}), "hang"])
@pytest.mark.parametrize("auth", ["token", "api_key"])
async def test_no_secret_in_errors_records_or_logs(
    twilio: FakeTwilio, resources: Resources, reply: Reply, auth: str
) -> None:
    twilio.script.append(reply)
    extra: dict[str, Any] = {"account_sid": "${secret:twilio_sid}", "timeout": 0.3}
    if auth == "api_key":
        extra.update(auth_token=None, api_key_sid=KEY_SID, api_key_secret="${secret:twilio_key}")
    job = make_job(VALUES)
    with capture_logs() as logs, pytest.raises(DeliveryError) as info:
        await action(twilio, resources, **extra).send(job)
    assert twilio.received
    texts = (info.value, repr(info.value), info.value.__cause__, job.record, logs)
    for secret in (TOKEN, KEY_SECRET, SID):
        assert leaks(secret, *texts) == []


# --- validation ---------------------------------------------------------------------------

A = "pb.yaml:{line}: postback 7: {message}"
BASE = f"type: twilio_sms\naccount_sid: {SID}\n"
GOOD = BASE + "auth_token: ${secret:t}\nfrom: '+15005550006'\nto: '{phone}'\nbody: hi\n"


@pytest.mark.parametrize(
    ("settings", "line", "message"),
    [
        (
            GOOD.replace(SID, "AC123"),
            L + 1,
            "action.account_sid: must be an Account SID (AC and 32 hex digits)"
            " or a ${secret:NAME} reference",
        ),
        (
            GOOD.replace("${secret:t}", "abc123token"),
            L + 2,
            "action.auth_token: must be a ${secret:NAME} reference, not literal text",
        ),
        (
            BASE + "from: '+15005550006'\nto: '{phone}'\nbody: hi",
            L - 1,
            "action: give either auth_token or api_key_sid with api_key_secret",
        ),
        (
            GOOD + f"api_key_sid: {KEY_SID}\napi_key_secret: ${{secret:k}}",
            L - 1,
            "action: give either auth_token or api_key_sid with api_key_secret",
        ),
        (
            BASE + f"api_key_sid: {KEY_SID}\nfrom: '+15005550006'\nto: '{{phone}}'\nbody: hi",
            L - 1,
            "action: api_key_sid and api_key_secret go together",
        ),
        (
            BASE + "api_key_sid: SK1\napi_key_secret: ${secret:k}\nfrom: x\nto: x\nbody: x",
            L + 2,
            "action.api_key_sid: must be an API key SID (SK and 32 hex digits)"
            " or a ${secret:NAME} reference",
        ),
        (
            GOOD + f"messaging_service_sid: {SERVICE}",
            L - 1,
            "action: give either from or messaging_service_sid",
        ),
        (
            GOOD.replace("from: '+15005550006'\n", ""),
            L - 1,
            "action: give either from or messaging_service_sid",
        ),
        (
            GOOD.replace("from: '+15005550006'\n", "messaging_service_sid: MG12\n"),
            L + 3,
            "action.messaging_service_sid: must be a Messaging Service SID"
            " (MG and 32 hex digits) or a ${secret:NAME} reference",
        ),
        (
            GOOD.replace("body: hi", "body: " + "x" * 1601),
            L + 5,
            "action.body: is longer than 1600 characters before any macro",
        ),
        (
            GOOD + "default_country_code: '+44'",
            L + 6,
            "action.default_country_code: must be a country calling code such as 1, 44 or 353,"
            " without +",
        ),
        (
            GOOD + "base_url: 'https://{sub1}.example.com'",
            L + 6,
            "action.base_url: a macro cannot set the URL's scheme, host or port",
        ),
        (
            GOOD + "status_callback: 'ftp://cb.example.com/'",
            L + 6,
            "action.status_callback: the URL's scheme must be http or https, not ftp",
        ),
        (
            GOOD.replace("'{phone}'", "'{phon}'"),
            L + 4,
            "action.to: unknown macro {phon}; did you mean {phone}?",
        ),
        (GOOD.replace("to: '{phone}'\n", ""), L - 1, "missing required key 'action.to'"),
        (GOOD + "media_url: x", L + 6, "unknown key 'action.media_url'"),
    ],
    ids=[
        "account sid",
        "literal token",
        "no credentials",
        "both credentials",
        "key without secret",
        "key sid",
        "from and service",
        "neither from nor service",
        "service sid",
        "body too long",
        "country code",
        "base_url macro",
        "status_callback scheme",
        "unknown macro",
        "missing to",
        "unknown key",
    ],
)
def test_validation_errors(tmp_path: Path, settings: str, line: int, message: str) -> None:
    assert validate(tmp_path, settings) == [A.format(line=line, message=message)]


def test_valid_settings_load(tmp_path: Path) -> None:
    assert validate(tmp_path, GOOD) == []
    secret_sid = GOOD.replace(SID, "${secret:sid}") + "default_country_code: '44'"
    assert validate(tmp_path, secret_sid) == []


# --- end to end ---------------------------------------------------------------------------


async def test_webhook_to_rule_to_twilio(tmp_path: Path, twilio: FakeTwilio) -> None:
    rules = {
        "sms.yaml": rule_file(
            f"""
            type: twilio_sms
            account_sid: {SID}
            auth_token: ${{secret:twilio_token}}
            from: "+15005550006"
            to: "{{phone}}"
            body: "Thanks {{first_name}}, order {{conversion_id}} confirmed"
            base_url: {twilio.url}
            """,
            offer=9,
            postback_id=41,
        )
    }
    run = await end_to_end(
        tmp_path,
        rules,
        SECRETS,
        lambda: twilio.received,
        conversion_id="E1",
        offer=9,
        affiliate=5,
        status="approved",
        phone="555 123 4567",
        first_name="Ann",
    )
    assert twilio.form() == [
        ("To", "+15551234567"),
        ("From", "+15005550006"),
        ("Body", "Thanks Ann, order E1 confirmed"),
    ]
    assert run.state == DeliveryState.SUCCEEDED
    (attempt,) = run.attempts
    assert attempt.outcome == "succeeded"
    assert attempt.response_status == 201
    assert leaks(TOKEN, attempt, run.logs) == []
