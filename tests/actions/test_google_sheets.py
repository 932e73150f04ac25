"""google_sheets against a fake Google token endpoint and Sheets API on 127.0.0.1 (the fake
verifies the RS256 assertion with pyjwt against a key made here): the exact requests, the token
cache, token and append failures (retried, permanent, outcome_unknown), secrets kept out of
errors, records and logs, settings errors as `postbackd validate` prints them, end to end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import cache, partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from structlog.testing import capture_logs

from daemon.actions import google_sheets as gs
from daemon.actions.base import Resources
from daemon.errors import DeliveryError, OutcomeUnknownError, PermanentError, RetryableError
from daemon.loader import load_rules
from daemon.outbound import OutboundHttp
from daemon.secrets import SecretResolver
from daemon.store.base import DeliveryState
from tests.actions import kit
from tests.actions.fakes_google_sheets import Account, FakeGoogle, google_error
from tests.actions.kit import NOW, end_to_end, expect_outcome, load_issues, make_resources
from tests.harness import FakeClock

make_job = partial(kit.make_job, postback_id=5)  # the postback of this file's rules
SHEET_ID = "1AbCdEfGhIjKlMnOpQrStUvWxYz0123456789_-"
EMAIL = "postbacks@proj-1.iam.gserviceaccount.com"
KEY_ID = "3f1c0a9b8e7d6c5b4a39281706f5e4d3c2b1a098"
LEAD = {
    "conversion_id": "C-1",
    "offer": "7",
    "affiliate": "42",
    "status": "approved",
    "payout": "12.50",
    "email": "lead@example.com",
    "first_name": '=HYPERLINK("http://evil.example")',
}


@cache
def rsa_key(n: int) -> rsa.RSAPrivateKey:
    """Key number n, made once per test run (2048-bit generation takes a moment)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def key_json(fake: FakeGoogle, email: str = EMAIL, n: int = 0, **overrides: Any) -> str:
    data = {
        "type": "service_account",
        "project_id": "proj-1",
        "private_key_id": KEY_ID,
        "private_key": pem(rsa_key(n)),
        "client_email": email,
        "client_id": "1234567890",
        "token_uri": f"{fake.url}/token",
        **overrides,
    }
    return json.dumps(data)


def settings(fake: FakeGoogle, **overrides: Any) -> gs.Settings:
    raw = {
        "type": "google_sheets",
        "spreadsheet_id": SHEET_ID,
        "range": "'Leads 2026'!A1",
        "values": ["{received_at}", "{conversion_id}", "{email}", "{payout}", "{first_name}"],
        "credentials": "${secret:sheets_sa}",
        "base_url": fake.url,
        **overrides,
    }
    return gs.Settings.model_validate(raw)


@pytest.fixture
async def fake(clock: FakeClock) -> AsyncIterator[FakeGoogle]:
    server = FakeGoogle(now=clock.now)
    server.accounts[EMAIL] = Account(EMAIL, KEY_ID, rsa_key(0).public_key())
    server.sheets[SHEET_ID] = {"Leads 2026": []}
    server.shared[SHEET_ID] = {EMAIL}
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def secrets(fake: FakeGoogle) -> dict[str, str]:
    return {"sheets_sa": key_json(fake)}


@pytest.fixture
def resources(http: OutboundHttp, clock: FakeClock, secrets: dict[str, str]) -> Resources:
    return make_resources(http, secrets, clock=clock)


async def test_happy_path_sends_exactly_these_requests(
    fake: FakeGoogle, resources: Resources
) -> None:
    job = make_job(LEAD)
    await gs.build(settings(fake), resources).send(job)
    (token_req,) = fake.token_requests
    assert token_req.method == "POST"
    assert token_req.path_qs == "/token"
    assert token_req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = dict(parse_qsl(token_req.text))
    assert set(form) == {"grant_type", "assertion"}
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    # The fake verified the signature with the public key; these are the signed claims.
    assert fake.headers == [{"alg": "RS256", "typ": "JWT", "kid": KEY_ID}]
    assert fake.claims == [
        {
            "iss": EMAIL,
            "scope": "https://www.googleapis.com/auth/spreadsheets",
            "aud": f"{fake.url}/token",
            "iat": int(NOW),
            "exp": int(NOW) + 3600,
        }
    ]
    (append,) = fake.appends
    assert append.method == "POST"
    assert append.path_qs == (
        f"/v4/spreadsheets/{SHEET_ID}/values/'Leads%202026'!A1:append"
        "?valueInputOption=RAW&insertDataOption=INSERT_ROWS"
    )
    (token,) = fake.issued
    assert append.headers["Authorization"] == f"Bearer {token}"
    assert append.headers["Content-Type"] == "application/json"
    row = ["2026-09-21T14:13:20Z", "C-1", "lead@example.com", "12.50", LEAD["first_name"]]
    assert (
        append.body
        == json.dumps(
            {"range": "'Leads 2026'!A1", "majorDimension": "ROWS", "values": [row]},
            separators=(",", ":"),
        ).encode()
    )
    # RAW: a value that looks like a formula is stored as text, never evaluated.
    assert fake.sheets[SHEET_ID]["Leads 2026"] == [row]
    assert job.record.response_status == 200
    assert job.record.request is not None
    assert job.record.request.headers["Authorization"] == "****"


async def test_token_is_cached_until_a_minute_before_expiry(
    fake: FakeGoogle, resources: Resources, clock: FakeClock
) -> None:
    action = gs.build(settings(fake), resources)
    await action.send(make_job(LEAD))
    clock.advance(3599 - 60 - 1)  # the token lives 3599 s; renewed 60 s early
    await action.send(make_job(LEAD))
    assert len(fake.token_requests) == 1
    clock.advance(1)
    await action.send(make_job(LEAD))
    assert len(fake.token_requests) == 2
    assert len(fake.appends) == 3
    # A new action (a reload rebuilds them) starts with an empty cache.
    await gs.build(settings(fake), resources).send(make_job(LEAD))
    assert len(fake.token_requests) == 3


async def test_concurrent_attempts_share_one_token_request(
    fake: FakeGoogle, resources: Resources
) -> None:
    action = gs.build(settings(fake), resources)
    await asyncio.gather(*(action.send(make_job(LEAD)) for _ in range(5)))
    assert len(fake.token_requests) == 1
    assert len(fake.appends) == 5


async def test_cache_is_per_service_account(
    fake: FakeGoogle, http: OutboundHttp, clock: FakeClock
) -> None:
    other = "other@proj-1.iam.gserviceaccount.com"
    fake.accounts[other] = Account(other, KEY_ID, rsa_key(1).public_key())
    fake.shared[SHEET_ID].add(other)
    env = {"POSTBACKD_SECRET_SHEETS_SA": key_json(fake)}
    resources = Resources(
        http=http,
        secret=SecretResolver(credentials_dir=None, secrets_dir=None, environ=env),
        clock=clock,
    )
    action = gs.build(settings(fake), resources)
    await action.send(make_job(LEAD))
    env["POSTBACKD_SECRET_SHEETS_SA"] = key_json(fake, email=other, n=1)  # the key is rotated
    await action.send(make_job(LEAD))
    await action.send(make_job(LEAD))
    assert [c["iss"] for c in fake.claims] == [EMAIL, other]
    assert len(fake.appends) == 3


JSON = {"Content-Type": "application/json"}
PE, RE, OU = PermanentError, RetryableError, OutcomeUnknownError
TOKEN_FAILURES: list[tuple[str, Any, type[DeliveryError], str]] = [
    ("invalid_grant", (400, '{"error":"invalid_grant"}', JSON), PE, "token_invalid_grant"),
    ("invalid_client", (401, '{"error":"invalid_client"}', JSON), PE, "token_invalid_client"),
    ("400 not json", (400, "Bad Request", {}), PE, "token_http_400"),
    ("500", (500, "", {}), RE, "token_http_500"),
    ("503", (503, "", {}), RE, "token_http_503"),
    ("429", (429, "", {}), RE, "token_http_429"),
    ("200 no token", (200, '{"token_type":"Bearer"}', JSON), RE, "token_bad_response"),
    ("timeout", "hang", RE, "timeout"),  # asking again for a token is harmless
    ("disconnected", "drop", RE, "disconnected"),
]


@pytest.mark.parametrize(
    ("reply", "error", "reason"),
    [t[1:] for t in TOKEN_FAILURES],
    ids=[t[0] for t in TOKEN_FAILURES],
)
async def test_token_endpoint_failures(
    fake: FakeGoogle,
    resources: Resources,
    reply: Any,
    error: type[DeliveryError],
    reason: str,
) -> None:
    fake.token_script.append(reply)
    action = gs.build(settings(fake, timeout=0.5), resources)
    await expect_outcome(action, make_job(LEAD), error, reason)
    assert fake.appends == []


async def test_key_the_token_server_does_not_know_is_invalid_grant(
    fake: FakeGoogle, http: OutboundHttp, clock: FakeClock
) -> None:
    # Signed with the wrong key.
    resources = make_resources(http, {"sheets_sa": key_json(fake, n=1)}, clock=clock)
    job = make_job(LEAD)
    with pytest.raises(PermanentError) as caught:
        await gs.build(settings(fake), resources).send(job)
    assert caught.value.reason == "token_invalid_grant"
    assert job.record.response_status == 400
    assert job.record.request is not None
    assert job.record.request.url == f"{fake.url}/token"
    assert job.record.request.body == (
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=****"
    )


def answer(code: int, status: str) -> tuple[int, str, dict[str, str]]:
    return (code, google_error(code, status, "message"), JSON)


APPEND_OUTCOMES: list[tuple[str, Any, type[DeliveryError] | None, str]] = [
    ("200", None, None, ""),
    ("429", answer(429, "RESOURCE_EXHAUSTED"), RE, "http_429_resource_exhausted"),
    ("500", answer(500, "INTERNAL"), RE, "http_500_internal"),
    ("503", answer(503, "UNAVAILABLE"), RE, "http_503_unavailable"),
    ("503 html", (503, "<html>", {}), RE, "http_503"),
    ("400", answer(400, "INVALID_ARGUMENT"), PE, "http_400_invalid_argument"),
    ("401", answer(401, "UNAUTHENTICATED"), PE, "http_401_unauthenticated"),
    ("403", answer(403, "PERMISSION_DENIED"), PE, "http_403_permission_denied"),
    ("404", answer(404, "NOT_FOUND"), PE, "http_404_not_found"),
    ("502", (502, "Bad Gateway", {}), OU, "outcome_unknown"),
    ("504", (504, "Gateway Timeout", {}), OU, "outcome_unknown"),
    ("timeout", "hang", OU, "outcome_unknown"),  # the row may have been appended
    ("disconnected", "drop", OU, "outcome_unknown"),
]


@pytest.mark.parametrize(
    ("reply", "error", "reason"),
    [t[1:] for t in APPEND_OUTCOMES],
    ids=[t[0] for t in APPEND_OUTCOMES],
)
async def test_append_outcomes(
    fake: FakeGoogle,
    resources: Resources,
    reply: Any,
    error: type[DeliveryError] | None,
    reason: str,
) -> None:
    if reply is not None:
        fake.append_script.append(reply)
    action = gs.build(settings(fake, timeout=0.5), resources)
    await expect_outcome(action, make_job(LEAD), error, reason)
    assert len(fake.appends) == 1


async def test_real_refusals_from_the_fake(fake: FakeGoogle, resources: Resources) -> None:
    cases = [
        (settings(fake, spreadsheet_id="1NoSuchSheetAtAll000"), "http_404_not_found"),
        (settings(fake, range="Sheet9!A1"), "http_400_invalid_argument"),
    ]
    fake.sheets["1NotSharedWithUs0000"] = {"Leads 2026": []}
    cases.append(
        (settings(fake, spreadsheet_id="1NotSharedWithUs0000"), "http_403_permission_denied")
    )
    for config, reason in cases:
        with pytest.raises(PermanentError) as caught:
            await gs.build(config, resources).send(make_job(LEAD))
        assert caught.value.reason == reason


async def test_401_drops_the_cached_token(fake: FakeGoogle, resources: Resources) -> None:
    action = gs.build(settings(fake), resources)
    await action.send(make_job(LEAD))
    fake.issued.clear()  # Google revoked every token
    with pytest.raises(PermanentError) as caught:
        await action.send(make_job(LEAD))
    assert caught.value.reason == "http_401_unauthenticated"
    await action.send(make_job(LEAD))  # an operator's retry gets a fresh token
    assert len(fake.token_requests) == 2
    assert len(fake.sheets[SHEET_ID]["Leads 2026"]) == 2


def ec_pem() -> str:
    return pem(ec.generate_private_key(ec.SECP256R1()))


NOT_RSA = "the private key is not an RSA key"
BAD_KEYS = [
    ("not json at all", "the credentials secret is not JSON"),
    ('["a list"]', "the credentials secret is not a JSON object"),
    ('{"private_key": "x"}', "the key has no client_email"),
    ('{"client_email": "a@b"}', "the key has no private_key"),
    ('{"client_email": "a@b", "private_key": "not a key"}', NOT_RSA),
    ('{"client_email": "a@b", "private_key": "EC"}', NOT_RSA),
    (
        '{"client_email": "a@b", "private_key": "k", "token_uri": "file:///etc/passwd"}',
        "the key's token_uri is not an http(s) URL",
    ),
]


@pytest.mark.parametrize(("secret", "detail"), BAD_KEYS)
async def test_bad_credentials_fail_before_any_request(
    fake: FakeGoogle, http: OutboundHttp, clock: FakeClock, secret: str, detail: str
) -> None:
    secret = secret.replace('"EC"', json.dumps(ec_pem()))
    resources = make_resources(http, {"sheets_sa": secret}, clock=clock)
    with pytest.raises(PermanentError) as caught:
        await gs.build(settings(fake), resources).send(make_job(LEAD))
    assert caught.value.reason == "bad_credentials"
    assert caught.value.detail == detail
    assert caught.value.__cause__ is None  # a chained parser error could quote the key
    assert fake.token_requests == []


@pytest.mark.parametrize("where", ["token", "append", "append-drop", "token-hang"])
async def test_no_secret_in_errors_records_or_logs(
    fake: FakeGoogle, resources: Resources, secrets: dict[str, str], where: str
) -> None:
    key = json.loads(secrets["sheets_sa"])
    action = gs.build(settings(fake, timeout=0.5), resources)
    # ECHO: the fake quotes back what it received (the assertion, the bearer token).
    if where == "token":
        fake.token_script.append((400, "assertion was: ECHO", {}))
    elif where == "append":
        fake.append_script.append((403, "you sent: ECHO", {}))
    elif where == "append-drop":
        fake.append_script.append("drop")
    else:
        fake.token_script.append("hang")
    job = make_job(LEAD)
    with capture_logs() as logs, pytest.raises(DeliveryError) as caught:
        await action.send(job)
    values = [key["private_key"], KEY_ID, secrets["sheets_sa"], *fake.issued]
    values += [dict(parse_qsl(r.text))["assertion"] for r in fake.token_requests]
    values += [line for line in key["private_key"].splitlines() if "PRIVATE" not in line]
    texts = [str(caught.value), repr(caught.value), caught.value.detail, repr(logs)]
    texts.append(json.dumps(job.record.request.as_dict() if job.record.request else None))
    texts.append(str(job.record.response_excerpt))
    for text in texts:
        for secret in values:
            assert secret not in text
    assert job.record.request is not None


def test_preview_masks_the_token(clock: FakeClock) -> None:
    resources = Resources(http=None, secret=lambda name: "{}", clock=clock)
    raw = {
        "type": "google_sheets",
        "spreadsheet_id": SHEET_ID,
        "values": ["{conversion_id}", "{idempotency_key}"],
        "credentials": "${secret:sheets_sa}",
    }
    action = gs.build(gs.Settings.model_validate(raw), resources)
    record = action.preview(make_job(LEAD))
    assert record.url == (
        f"https://sheets.googleapis.com/v4/spreadsheets/{SHEET_ID}/values/Sheet1!A1:append"
        "?valueInputOption=RAW&insertDataOption=INSERT_ROWS"
    )
    assert record.headers["Authorization"] == "Bearer ****"
    assert record.body == (
        '{"range":"Sheet1!A1","majorDimension":"ROWS","values":[["C-1","generic:C-1:1:5"]]}'
    )
    assert action.destination == "https://sheets.googleapis.com:443"


HEAD = f"""\
offer: 1
postbacks:
  - id: 5
    trigger: conversion_done
    affiliate: "*"
    action:
      type: google_sheets
      spreadsheet_id: {SHEET_ID}
      credentials: ${{secret:sheets_sa}}
      values: ["{{conversion_id}}", "{{idempotency_key}}"]
"""
P = "r.yaml:11: postback 5: action"
BAD_SETTINGS = {
    "spreadsheet_id": (
        HEAD.replace(SHEET_ID, "https://docs.google.com/x"),
        "r.yaml:8: postback 5: action.spreadsheet_id: must be the id from the sheet's URL "
        "(docs.google.com/spreadsheets/d/ID/edit)",
    ),
    "literal_credentials": (
        HEAD.replace("${secret:sheets_sa}", "service-account-key-text"),
        "r.yaml:9: postback 5: action.credentials: "
        "must be a ${secret:NAME} reference, not literal text",
    ),
    "no_values": (
        HEAD.replace('["{conversion_id}", "{idempotency_key}"]', "[]"),
        "r.yaml:10: postback 5: action.values: List should have at least 1 item after "
        "validation, not 0",
    ),
    "value_macro": (
        HEAD.replace("{idempotency_key}", "{idempotencykey}"),
        "r.yaml:10: postback 5: action.values: unknown macro {idempotencykey}; "
        "did you mean {idempotency_key}?",
    ),
    "range_empty": (HEAD + "      range: ' '\n", f"{P}.range: must be an A1 range such as "
                    "Sheet1!A1 or 'Leads 2026'!A:F"),
    "base_url": (HEAD + "      base_url: https://sheets.googleapis.com/{sub1}\n",
                 f"{P}.base_url: cannot hold macros or secrets"),
    "base_url_query": (HEAD + "      base_url: https://sheets.googleapis.com/?a=b\n",
                       f"{P}.base_url: cannot have a query or a fragment"),
    "value_input_option": (HEAD + "      value_input_option: USER_ENTERED\n",
                           "r.yaml:11: postback 5: unknown key 'action.value_input_option'"),
    "missing_credentials": (
        HEAD.replace("      credentials: ${secret:sheets_sa}\n", ""),
        "r.yaml:6: postback 5: missing required key 'action.credentials'",
    ),
}  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_settings_errors(tmp_path: Path, text: str, message: str) -> None:
    assert load_issues(tmp_path, {"r.yaml": text}) == [message]


def test_good_settings_load(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(HEAD + "      range: \"'Leads 2026'!A:F\"\n")
    rules = load_rules(tmp_path, git=False)
    assert isinstance(rules.postbacks[5].postback.action, gs.Settings)
    assert rules.secrets == {"sheets_sa"}


async def test_end_to_end_webhook_to_sheet(tmp_path: Path, fake: FakeGoogle) -> None:
    fake.now = lambda: datetime.now(UTC).timestamp()  # the daemon runs on the real clock
    rules = {
        "offer-7.yaml": f"""
            offer: 7
            postbacks:
              - id: 41
                trigger: conversion_done
                affiliate: "*"
                action:
                  type: google_sheets
                  spreadsheet_id: {SHEET_ID}
                  range: "'Leads 2026'!A1"
                  credentials: ${{secret:sheets_sa}}
                  base_url: {fake.url}
                  values: ["{{conversion_id}}", "{{email}}", "{{idempotency_key}}"]
        """
    }
    secrets = {"sheets_sa": key_json(fake)}
    run = await end_to_end(
        tmp_path,
        rules,
        secrets,
        lambda: fake.appends,
        conversion_id="S1",
        offer=7,
        email="a@b.example",
    )
    assert fake.sheets[SHEET_ID]["Leads 2026"] == [["S1", "a@b.example", "generic:S1:1:41"]]
    assert run.state == DeliveryState.SUCCEEDED
    (attempt,) = run.attempts
    assert attempt.response_status == 200
    assert attempt.request is not None
    assert attempt.request["headers"]["Authorization"] == "****"
    stored = json.dumps(attempt.request) + str(attempt.response_excerpt)
    for token in fake.issued:
        assert token not in stored
        assert token not in repr(run.logs)
    line = next(e for e in run.logs if e["event"] == "delivery_attempt")
    assert line["action"] == "google_sheets"
    assert line["outcome"] == "succeeded"
