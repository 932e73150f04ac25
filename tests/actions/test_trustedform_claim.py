"""trustedform_claim against a loopback fake of the certificate API: the exact request, the
answers that are retried or not, secrets kept out of every record, the settings errors an ops
person sees, the webhook-to-fake path, and the proof that a certificate URL on any other host
never makes a request carrying the key."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from yarl import URL

from daemon.actions import trustedform_claim
from daemon.actions.base import Job, Resources
from daemon.errors import DeliveryError, PermanentError, RetryableError
from daemon.outbound import OutboundHttp
from daemon.store.base import DeliveryState
from tests.actions import kit
from tests.actions.fakes_trustedform import FakeTrustedForm, v4_answer
from tests.actions.kit import (
    StubResolver,
    expect_outcome,
    load_issues,
    loopback_http,
    make_resources,
    secret_env,
)
from tests.harness import FakeClock, start_daemon, wait_for

KEY = "tf-key-Zq8x1Vw3"
TOKEN = base64.b64encode(f"API:{KEY}".encode()).decode()
CERT_ID = "2605ec3a321e1b3a41addf0bba1213505ef57985"
CERT_URL = f"https://cert.trustedform.com/{CERT_ID}"
SECRETS = {"tf_key": KEY}
LEAD = {
    "trusted_form_cert_url": CERT_URL,
    "email": "a@b.com",
    "phone": "5122981234",
    "affiliate": "42",
    "conversion_id": "C1",
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeTrustedForm]:
    server = await FakeTrustedForm(api_key=KEY).start()
    yield server
    await server.close()


@pytest.fixture
def resources(http: OutboundHttp, fake: FakeTrustedForm) -> Resources:
    """Resources whose TrustedForm base is the fake (a test-only override)."""
    return make_resources(http, SECRETS, overrides={"trustedform_base": fake.base})


def make_action(resources: Resources, **settings: Any) -> trustedform_claim.TrustedFormClaim:
    raw = {"type": "trustedform_claim", "api_key": "${secret:tf_key}", **settings}
    return trustedform_claim.build(trustedform_claim.Settings.model_validate(raw), resources)


def make_job(**fields: str) -> Job:
    """This file's lead, as `fields` change it. A value with a control character, which the
    door now refuses (a 400), reaches the macros raw, as from a conversion stored before."""
    hostile = {k: v for k, v in fields.items() if any(ord(c) < 32 or ord(c) == 127 for c in v)}
    clean = {k: v for k, v in fields.items() if k not in hostile}
    return kit.make_job({**LEAD, **clean}, raw=hostile)


async def test_happy_path_sends_exactly_a_v4_retain(
    fake: FakeTrustedForm, resources: Resources
) -> None:
    action = make_action(resources, insights=["age_seconds", "domain"])
    job = make_job()
    await action.send(job)
    (got,) = fake.received
    assert got.method == "POST"
    assert got.path_qs == f"/{CERT_ID}"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["Accept"] == "application/json"
    assert got.headers["api-version"] == "4.0"
    assert got.headers["Authorization"] == f"Basic {TOKEN}"
    assert got.body == (
        b'{"match_lead":{"email":"a@b.com","phone":"5122981234"},'
        b'"retain":{"reference":"generic:C1:1:7","vendor":"42"},'
        b'"insights":{"properties":["age_seconds","domain"]}}'
    )
    assert job.record.response_status == 200
    assert job.record.request is not None
    assert job.record.request.url == fake.base + CERT_ID
    assert job.record.request.headers["Authorization"] == "****"


async def test_a_repeat_is_safe_the_service_says_previously_retained(
    fake: FakeTrustedForm, resources: Resources
) -> None:
    action = make_action(resources)
    assert action.idempotent is True
    first, again = make_job(), make_job()
    await action.send(first)
    await action.send(again)
    assert [json.loads(r.body)["retain"]["reference"] for r in fake.received] == [
        "generic:C1:1:7"
    ] * 2
    assert '"previously_retained": false' in (first.record.response_excerpt or "")
    assert '"previously_retained": true' in (again.record.response_excerpt or "")


async def test_empty_lead_fields_are_left_out_and_templates_apply(
    fake: FakeTrustedForm, resources: Resources
) -> None:
    action = make_action(
        resources,
        cert_url="{extra.xxTrustedFormCertUrl}",
        phone="{extra.cell}",
        vendor="pub-{affiliate}",
    )
    job = make_job(
        **{"extra.xxTrustedFormCertUrl": CERT_URL, "email": "", "extra.cell": " 5125550100 "}
    )
    job.values.pop("trusted_form_cert_url")  # type: ignore[attr-defined]
    await action.send(job)
    assert fake.json() == {
        "match_lead": {"phone": "5125550100"},
        "retain": {"reference": "generic:C1:1:7", "vendor": "pub-42"},
    }


async def test_no_email_and_no_phone_is_refused_before_any_request(
    fake: FakeTrustedForm, resources: Resources
) -> None:
    action = make_action(resources)
    with pytest.raises(PermanentError) as caught:
        await action.send(make_job(email="", phone=""))
    assert caught.value.reason == "nothing_to_match"
    assert fake.received == []


ANSWERS: list[tuple[str, Any, type[DeliveryError] | None, str | None]] = [
    ("success", (200, v4_answer("success")), None, None),
    ("success, retained before", (200, v4_answer("success", retain={"x": 1})), None, None),
    ("failure", (200, v4_answer("failure", "no match")), PermanentError, "trustedform_failure"),
    ("error", (200, v4_answer("error", "expired")), PermanentError, "trustedform_error"),
    ("not JSON", (200, "<html>maintenance</html>"), RetryableError, "trustedform_bad_response"),
    ("no outcome", (200, '{"cert": {}}'), RetryableError, "trustedform_bad_response"),
    ("bad key", (401, v4_answer("error", "unauthorized")), PermanentError, "http_401"),
    ("forbidden", (403, v4_answer("error", "forbidden")), PermanentError, "http_403"),
    ("unknown certificate", (404, v4_answer("error", "not found")), PermanentError, "http_404"),
    ("bad request", (400, v4_answer("error", "bad")), PermanentError, "http_400"),
    ("rate limited", (429, v4_answer("error", "slow down")), RetryableError, "http_429"),
    ("server error", (500, v4_answer("error", "oops")), RetryableError, "http_500"),
    ("unavailable", (503, ""), RetryableError, "http_503"),
    ("timeout after sending", "hang", RetryableError, "timeout"),
]


@pytest.mark.parametrize(
    ("reply", "error", "reason"), [a[1:] for a in ANSWERS], ids=[a[0] for a in ANSWERS]
)
async def test_answers_are_classified(
    fake: FakeTrustedForm,
    resources: Resources,
    reply: Any,
    error: type[DeliveryError] | None,
    reason: str | None,
) -> None:
    fake.script.append(reply)
    action = make_action(resources, timeout="300ms")
    await expect_outcome(action, make_job(), error, reason)
    assert len(fake.received) == 1


async def test_connection_refused_is_retried(http: OutboundHttp) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = {"trustedform_base": f"http://127.0.0.1:{port}/"}
    action = make_action(make_resources(http, SECRETS, overrides=closed))
    with pytest.raises(RetryableError) as caught:
        await action.send(make_job())
    assert caught.value.reason == "connect_failed"


# --- the key goes to cert.trustedform.com and nowhere else ------------------------------------

HOSTILE = [
    "https://cert.trustedform.com.evil.com/x",
    "https://evil.com/cert.trustedform.com/x",
    "https://user@cert.trustedform.com@evil/",
    "http://cert.trustedform.com/",
    "https://CERT.trustedform.com:8443/",
    f"https://cert.trustedform.com.evil.com/{CERT_ID}",
    f"https://evil.com/cert.trustedform.com/{CERT_ID}",
    f"https://user@cert.trustedform.com@evil/{CERT_ID}",
    f"https://API:x@cert.trustedform.com/{CERT_ID}",
    f"http://cert.trustedform.com/{CERT_ID}",
    f"https://CERT.trustedform.com:8443/{CERT_ID}",
    f"https://cert.trustedform.com:8443/{CERT_ID}",
    f"https://cert.trustedform.com:80/{CERT_ID}",
    f"https://cert.trustedform.com./{CERT_ID}",
    f"https://cert.trustedform.com\\@evil.com/{CERT_ID}",
    f"https://cert.trustedform.com%2F@evil.com/{CERT_ID}",
    f"https://evil.com#@cert.trustedform.com/{CERT_ID}",
    f"https://evil.com?@cert.trustedform.com/{CERT_ID}",
    f"https://evil.com\\cert.trustedform.com/{CERT_ID}",
    f"//cert.trustedform.com/{CERT_ID}",
    f"cert.trustedform.com/{CERT_ID}",
    f"https://127.0.0.1/{CERT_ID}",
    f"https://[::1]/{CERT_ID}",
    f"https://cert.trustedform.com/{CERT_ID}/../../evil",
    f"https://cert.trustedform.com/{CERT_ID}?next=https://evil.com/",
    f"https://cert.trustedform.com/{CERT_ID}#x",
    f"https://cert.trustedform.com/{CERT_ID}\nhttps://evil.com/",
    f"https://cert.trustedform.com/%2e%2e/{CERT_ID}",
    f"https://cert.trustedform.com//{CERT_ID}",
    "https://cert.trustedform.com/not-a-certificate-id-at-all",
    "https://ｃert.trustedform.com/" + CERT_ID,
    "",
]


@pytest.mark.parametrize("cert_url", HOSTILE)
async def test_a_foreign_cert_url_never_sends_the_key_anywhere(
    cert_url: str, fake: FakeTrustedForm, connects: list[tuple[str, int]]
) -> None:
    """With the real base (every name resolving to loopback, so a leak would show) and with the
    test base: refused before any name is resolved, any connection is made or the key read."""
    asked: list[str] = []

    def secret(name: str) -> str:
        asked.append(name)
        return KEY

    for overrides in ({}, {"trustedform_base": fake.base}):
        resolver = StubResolver(default=["127.0.0.1"])  # a leak would reach a socket
        async with loopback_http(resolver) as client:
            resources = Resources(
                http=client, secret=secret, clock=FakeClock(), overrides=overrides
            )
            action = make_action(resources)
            with pytest.raises(PermanentError) as caught:
                await action.send(make_job(trusted_form_cert_url=cert_url))
            with pytest.raises(PermanentError):
                action.preview(make_job(trusted_form_cert_url=cert_url))
        assert caught.value.reason == "bad_cert_url"
        assert resolver.calls == []
    assert connects == []
    assert fake.received == []
    assert asked == []


async def test_the_real_path_only_ever_asks_for_cert_trustedform_com(
    connects: list[tuple[str, int]],
) -> None:
    resolver = StubResolver()  # no name resolves
    async with loopback_http(resolver) as client:
        action = make_action(make_resources(client, SECRETS))
        assert action.destination == "https://cert.trustedform.com:443"
        for url in (CERT_URL, f"https://cert.trustedform.com:443/{CERT_ID}", f" {CERT_URL}\n"):
            with pytest.raises(RetryableError) as caught:
                await action.send(make_job(trusted_form_cert_url=url))
            assert caught.value.reason == "dns_failed"
    assert resolver.calls == ["cert.trustedform.com"] * 3
    assert connects == []


def test_a_rule_cannot_move_the_service(tmp_path: Path) -> None:
    assert validation_errors(tmp_path, 'base_url: "http://127.0.0.1:1/"') == [
        "offer-1.yaml:10: postback 5: unknown key 'action.base_url'"
    ]


_PIECES = st.sampled_from(
    [
        "https://",
        "http://",
        "//",
        "cert.trustedform.com",
        "CERT.trustedform.com",
        ".evil.com",
        "evil.com",
        "@",
        "user:pw",
        ":443",
        ":8443",
        "/",
        "\\",
        "%2F",
        "#",
        "?",
        ".",
        " ",
        "\n",
        CERT_ID,
        "x",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, min_size=1, max_size=8).map("".join))
def test_whatever_the_url_the_request_goes_to_the_certificate_host(text: str) -> None:
    action = make_action(make_resources(None, SECRETS))
    job = make_job(trusted_form_cert_url=text)
    try:
        request = action.preview(job)
    except PermanentError:
        with pytest.raises(PermanentError, match=r"^bad_cert_url"):
            action.preview(job)
        return
    # Accepted: independent parsers agree the input named the certificate host itself.
    parsed = URL(text.strip())
    assert (parsed.scheme, parsed.host, parsed.port, parsed.user) == (
        "https",
        "cert.trustedform.com",
        443,
        None,
    )
    assert request.url == f"https://cert.trustedform.com{parsed.path}"


# --- secrets ----------------------------------------------------------------------------------


def _assert_clean(*texts: str) -> None:
    for text in texts:
        assert KEY not in text
        assert TOKEN not in text


@pytest.mark.parametrize(
    "reply",
    [
        (500, json.dumps({"outcome": "error", "reason": f"bad key {KEY} / Basic {TOKEN}"})),
        (200, json.dumps({"outcome": "failure", "reason": f"key {KEY}"})),
        (200, json.dumps({"outcome": "success", "echo": KEY})),
        (401, f"Authorization: Basic {TOKEN}"),
    ],
)
async def test_the_key_never_reaches_errors_records_or_logs(
    fake: FakeTrustedForm, resources: Resources, reply: tuple[int, str]
) -> None:
    fake.script.append(reply)
    action = make_action(resources)
    job = make_job()
    error: Exception | None = None
    with capture_logs() as logs:
        try:
            await action.send(job)
        except DeliveryError as err:
            error = err
    assert fake.received[0].headers["Authorization"] == f"Basic {TOKEN}"  # it was sent
    assert job.record.request is not None
    _assert_clean(
        str(error),
        repr(error),
        json.dumps(job.record.request.as_dict()),
        job.record.response_excerpt or "",
        repr(logs),
        json.dumps(action.preview(make_job()).as_dict()),
    )
    assert "****" in (job.record.response_excerpt or "")


# --- settings errors, as `postbackd validate` prints them ---------------------------------------

RULE = """\
offer: 1
postbacks:
  - id: 5
    trigger: conversion_done
    affiliate: "*"
    action:
      type: trustedform_claim
      api_key: "${{secret:tf_key}}"
      vendor: "{{affiliate}}"
      {extra}
"""


def validation_errors(tmp_path: Path, extra: str, rule: str = RULE) -> list[str]:
    return load_issues(tmp_path / "rules.d", {"offer-1.yaml": rule.format(extra=extra)})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            'insights: ["age_seconds", "Domain"]',
            "action.insights: 'Domain' is not an insights property name (e.g. age_seconds)",
        ),
        (
            "insights: [domain, domain]",
            "action.insights: an insights property is listed twice (each is billed)",
        ),
        ("timeout: 2m", "action.timeout: Input should be less than or equal to 60"),
        ("timeout: 0", "action.timeout: Input should be greater than 0"),
        (
            "phone: '{phone_number}'",
            "action.phone: unknown macro {phone_number} (write {{ and }} for literal braces)",
        ),
        (
            "cert_url: '{trusted_form}'",
            "action.cert_url: unknown macro {trusted_form}; did you mean {trusted_form_cert_url}?",
        ),
        ("reference: x", "unknown key 'action.reference'"),
    ],
)
def test_settings_errors_name_file_line_and_postback(
    tmp_path: Path, extra: str, message: str
) -> None:
    assert validation_errors(tmp_path, extra) == [f"offer-1.yaml:10: postback 5: {message}"]


def test_a_valid_rule_loads(tmp_path: Path) -> None:
    extra = "insights: [age_seconds, domain]\n      timeout: 10s\n      phone: '{extra.cell}'"
    assert validation_errors(tmp_path, extra) == []


@pytest.mark.parametrize(
    ("api_key", "line"),
    [
        ("'tf-literal-key'", 8),
        ("'${{secret:tf_key}}{{email}}'", 8),
        ("'Bearer ${{secret:tf_key}}'", 8),
    ],
)
def test_the_api_key_must_be_a_secret_reference(tmp_path: Path, api_key: str, line: int) -> None:
    rule = RULE.replace('"${{secret:tf_key}}"', api_key)
    assert validation_errors(tmp_path, "", rule) == [
        f"offer-1.yaml:{line}: postback 5: action.api_key: must be a ${{secret:NAME}}"
        " reference, not literal text"
    ]


def test_the_api_key_is_required(tmp_path: Path) -> None:
    rule = RULE.replace('      api_key: "${{secret:tf_key}}"\n', "")
    assert validation_errors(tmp_path, "", rule) == [
        "offer-1.yaml:6: postback 5: missing required key 'action.api_key'"
    ]


# --- end to end -------------------------------------------------------------------------------


async def test_webhook_to_rule_to_trustedform(tmp_path: Path, fake: FakeTrustedForm) -> None:
    rules = {"offer-1.yaml": RULE.format(extra="insights: [age_seconds]")}
    daemon = await start_daemon(
        tmp_path, rules, environ=secret_env(SECRETS), overrides={"trustedform_base": fake.base}
    )
    try:
        with capture_logs() as logs:
            await daemon.post(
                conversion_id="E1",
                offer=1,
                affiliate=42,
                status="approved",
                email="a@b.com",
                trusted_form_cert_url=CERT_URL,
            )
            await daemon.post(
                conversion_id="E2",
                offer=1,
                affiliate=42,
                status="approved",
                email="a@b.com",
                trusted_form_cert_url=f"https://cert.trustedform.com.evil.com/{CERT_ID}",
            )
            rows = await wait_for(
                lambda: _final(daemon.deliveries()),
            )
            # Each attempt's line is logged once its result is stored, a moment after the rows
            # show it: waited for inside the capture.
            await wait_for(lambda: len([e for e in logs if e["event"] == "delivery_attempt"]) == 2)
        assert len(fake.received) == 1
        assert fake.received[0].path_qs == f"/{CERT_ID}"
        assert fake.json() == {
            "match_lead": {"email": "a@b.com"},
            "retain": {"reference": "generic:E1:1:5", "vendor": "42"},
            "insights": {"properties": ["age_seconds"]},
        }
        states = {r.conversion_id: r.state for r in rows}
        assert states == {"E1": DeliveryState.SUCCEEDED, "E2": DeliveryState.DEAD}
        stored = []
        for row in rows:
            detail = await daemon.services.store.get_delivery(row.delivery_id)
            assert detail is not None
            stored.append(detail.attempts[0])
        by_reason = {a.reason: a for a in stored}
        assert set(by_reason) == {None, "bad_cert_url"}
        assert by_reason[None].request["headers"]["Authorization"] == "****"
        assert by_reason["bad_cert_url"].request is None  # nothing was sent
        lines = [e for e in logs if e["event"] == "delivery_attempt"]
        assert sorted(str(e["reason"]) for e in lines) == ["None", "bad_cert_url"]
        _assert_clean(repr(stored), repr(logs))
    finally:
        await daemon.client.close()


async def _final(rows: Any) -> Any:
    found = await rows
    done = {DeliveryState.SUCCEEDED, DeliveryState.DEAD}
    return found if len(found) == 2 and all(r.state in done for r in found) else None
