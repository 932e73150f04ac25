"""facebook_conversion against a fake Graph API on 127.0.0.1: the exact request, the hashing
rules, the outcome table, secrets kept out of errors, records and logs, settings errors as
`postbackd validate` prints them, and a webhook delivered end to end."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from structlog.testing import capture_logs

from daemon.actions import facebook_conversion as fb
from daemon.actions.base import Job, Resources
from daemon.errors import DeliveryError, PermanentError, RetryableError
from daemon.loader import load_rules
from daemon.outbound import OutboundHttp
from daemon.store.base import DeliveryState
from tests.actions import kit
from tests.actions.fakes_facebook_conversion import FakeGraph, graph_error
from tests.actions.kit import NOW, end_to_end, expect_outcome, load_issues, make_resources
from tests.harness import FakeClock

TOKEN = "EAAGtokenSECRETvalue123"
APP_SECRET = "appSECRET9f8e7d"
SECRETS = {"fb_token": TOKEN, "fb_app": APP_SECRET}
make_job = partial(kit.make_job, postback_id=5)  # the postback of this file's rules


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


LEAD = {
    "conversion_id": "C-1",
    "offer": "7",
    "affiliate": "42",
    "status": "approved",
    "payout": "12.50",
    "currency": "USD",
    "email": " Person@Example.com ",
    "phone": "+44 844 412 4653",
    "first_name": "Mary-Jane",
    "last_name": "O'Brien",
    "city": "San Francisco",
    "state": "CA",
    "zip": "94107-1234",
    "country": "US",
    "dob": "1990-04-07",
    "external_id": "ABC-42",
    "ip": "203.0.113.9",
    "user_agent": "Mozilla/5.0 (X11; Linux)",
    "fbc": "fb.1.1554763741205.AbCdEfGh",
    "fbp": "fb.1.1558571054389.1098115397",
    "event_time": str(int(NOW) - 3600),
}


def settings(graph: FakeGraph, **overrides: Any) -> fb.Settings:
    raw = {
        "type": "facebook_conversion",
        "pixel_id": "1234567890",
        "access_token": "${secret:fb_token}",
        "base_url": graph.url,
        **overrides,
    }
    return fb.Settings.model_validate(raw)


@pytest.fixture
def resources(http: OutboundHttp, clock: FakeClock) -> Resources:
    return make_resources(http, SECRETS, clock=clock)


@pytest.fixture
async def graph() -> AsyncIterator[FakeGraph]:
    fake = FakeGraph(token=TOKEN, app_secret=APP_SECRET, require_proof=False, now=lambda: NOW)
    await fake.start()
    yield fake
    await fake.close()


EXPECTED_EVENT = {
    "event_name": "Lead",
    "event_time": int(NOW) - 3600,
    "event_id": "generic:C-1:1:5",
    "action_source": "system_generated",
    "user_data": {
        "em": ["542d240129883c019e106e3b1b2d3f3cb3537c43c425364de8e951d5a3083345"],
        "ph": [sha("448444124653")],
        "fn": [sha("maryjane")],
        "ln": [sha("obrien")],
        "ct": [sha("sanfrancisco")],
        "st": [sha("ca")],
        "zp": [sha("94107")],
        "country": [sha("us")],
        "db": [sha("19900407")],
        "external_id": [sha("abc-42")],
        "client_ip_address": "203.0.113.9",
        "client_user_agent": "Mozilla/5.0 (X11; Linux)",
        "fbc": "fb.1.1554763741205.AbCdEfGh",
        "fbp": "fb.1.1558571054389.1098115397",
    },
    "custom_data": {"value": 12.5, "currency": "usd"},
}


async def test_happy_path_sends_exactly_this_request(
    graph: FakeGraph, resources: Resources
) -> None:
    action = fb.build(
        settings(graph, app_secret="${secret:fb_app}", test_event_code="TEST123"), resources
    )
    job = make_job(LEAD)
    await action.send(job)
    (got,) = graph.received
    assert got.method == "POST"
    assert got.path_qs == "/v25.0/1234567890/events"  # the token is not in the URL
    assert got.headers["Content-Type"] == "application/x-www-form-urlencoded"
    proof = hmac.new(APP_SECRET.encode(), TOKEN.encode(), hashlib.sha256).hexdigest()
    data = json.dumps([EXPECTED_EVENT], separators=(",", ":"))
    assert (
        got.body
        == urlencode(
            [
                ("data", data),
                ("access_token", TOKEN),
                ("appsecret_proof", proof),
                ("test_event_code", "TEST123"),
            ]
        ).encode()
    )
    assert graph.events() == [EXPECTED_EVENT]
    assert job.record.response_status == 200
    assert job.record.request is not None
    assert TOKEN not in job.record.request.body  # type: ignore[operator]
    assert "access_token=****" in job.record.request.body  # type: ignore[operator]


async def test_settings_shape_the_event(graph: FakeGraph, resources: Resources) -> None:
    action = fb.build(
        settings(
            graph,
            api_version="v26.0",
            event_name="Purchase_{goal}",
            action_source="website",
            event_source_url="https://lp.example.com/{sub1}",
            user_data={"external_id": "{click_id}", "fbc": "", "ge": "{extra.gender}"},
            value="{revenue}",
            currency="eur",
            custom_data={"order_id": "{conversion_id}", "status": "{status}"},
        ),
        resources,
    )
    fields = {**LEAD, "goal": "sale", "sub1": "a b", "click_id": "CLK", "revenue": "40"}
    job = make_job(fields)
    job = Job(job.postback_id, job.delivery_id, job.idempotency_key,
              {**job.values, "extra.gender": "Female"}, job.data)  # fmt: skip
    await action.send(job)
    assert graph.received[0].path_qs == "/v26.0/1234567890/events"
    (event,) = graph.events()
    assert event["event_name"] == "Purchase_sale"
    assert event["action_source"] == "website"
    assert event["event_source_url"] == "https://lp.example.com/a b"
    assert event["user_data"]["external_id"] == [sha("clk")]
    assert "fbc" not in event["user_data"]  # mapped to "" turns a default off
    assert event["user_data"]["ge"] == [sha("f")]
    assert event["custom_data"] == {
        "value": 40.0,
        "currency": "eur",
        "order_id": "C-1",
        "status": "approved",
    }
    assert "appsecret_proof" not in graph.form()
    assert "test_event_code" not in graph.form()


async def test_secrets_render_in_every_template(graph: FakeGraph, resources: Resources) -> None:
    action = fb.build(settings(graph, custom_data={"partner": "p-${secret:fb_app}"}), resources)
    job = make_job(LEAD)
    await action.send(job)
    assert graph.events()[0]["custom_data"]["partner"] == f"p-{APP_SECRET}"
    assert job.record.request is not None
    assert APP_SECRET not in str(job.record.request.body)


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("em", "  John.Doe@Example.COM ", "john.doe@example.com"),
        ("ph", "+1 (555) 123-4567", "15551234567"),
        ("ph", "0044 20 7946 0958", "442079460958"),
        ("ph", "555-123-4567", "5551234567"),  # no country code known: digits as given
        ("fn", " Zoë ", "zoë"),
        ("ln", "Smith-Jones, Jr.", "smithjones jr"),
        ("ct", "St. Louis 2", "stlouis"),
        ("st", " N.Y. ", "ny"),
        ("zp", "SW1A 1AA", "sw1a1aa"),
        ("zp", "94107-1234", "94107"),
        ("country", "U.S.", "us"),
        ("country", "USA", ""),  # not a 2-letter code: left out, not guessed
        ("db", "04/07/1990", "19900407"),
        ("db", "19900407", "19900407"),
        ("db", "1990-02-30", ""),
        ("ge", "Male", "m"),
        ("ge", "x", ""),
        ("external_id", " ID-9 ", "id-9"),
        ("em", "   ", ""),
        ("em", "A" * 64, "a" * 64),  # an uppercase hex digest is still a digest
    ],
)
def test_normalise(key: str, raw: str, expected: str) -> None:
    assert fb.normalise(key, raw) == expected


def test_phone_country_code_completes_national_numbers() -> None:
    assert fb.normalise("ph", "(555) 123-4567", "1") == "15551234567"
    assert fb.normalise("ph", "1 555 123 4567", "1") == "15551234567"
    assert fb.normalise("ph", "07911 123456", "44") == "447911123456"
    assert fb.normalise("ph", "+33 6 12 34 56 78", "44") == "33612345678"


async def test_hashing_rules_on_the_wire(graph: FakeGraph, resources: Resources) -> None:
    digest = sha("already@hashed.example")
    fields = {**LEAD, "email": digest.upper(), "phone": "", "first_name": "  "}
    fields["user_agent"] = "Mozilla/5.0 UPPER Case"
    await fb.build(settings(graph), resources).send(make_job(fields))
    user = graph.events()[0]["user_data"]
    assert user["em"] == [digest]  # hashed once, never twice
    assert "ph" not in user  # empty values are left out
    assert "fn" not in user
    # Never hashed, never lower-cased: Meta matches these as they are.
    assert user["client_ip_address"] == "203.0.113.9"
    assert user["client_user_agent"] == "Mozilla/5.0 UPPER Case"
    assert user["fbc"] == LEAD["fbc"]
    assert user["fbp"] == LEAD["fbp"]


async def test_event_time_falls_back_to_received_time_and_never_runs_ahead(
    graph: FakeGraph, resources: Resources
) -> None:
    action = fb.build(settings(graph), resources)
    no_time = {k: v for k, v in LEAD.items() if k != "event_time"}
    await action.send(make_job(no_time, now=NOW - 60))
    assert graph.events(0)[0]["event_time"] == int(NOW) - 60
    await action.send(make_job({**LEAD, "event_time": str(int(NOW) + 300)}))
    assert graph.events(1)[0]["event_time"] == int(NOW)


async def test_event_older_than_seven_days_is_refused_before_sending(
    graph: FakeGraph, resources: Resources, clock: FakeClock
) -> None:
    action = fb.build(settings(graph), resources)
    job = make_job({**LEAD, "event_time": "2026-09-01T00:00:00Z"})
    with pytest.raises(PermanentError) as caught:
        await action.send(job)
    assert caught.value.reason == "event_too_old"
    assert graph.received == []
    # A day inside the limit is sent, and the fake (like Meta) accepts it.
    clock.t = datetime(2026, 9, 7, tzinfo=UTC).timestamp()
    graph.now = clock.now
    await action.send(make_job({**LEAD, "event_time": "2026-09-01T00:00:00Z"}, now=clock.t))
    assert len(graph.received) == 1


JSON = {"Content-Type": "application/json"}
OUTCOMES: list[tuple[str, Any, type[DeliveryError] | None, str | None]] = [
    ("received", (200, '{"events_received":1,"fbtrace_id":"x"}', JSON), None, None),
    ("none received", (200, '{"events_received":0}', JSON), PermanentError, "events_not_received"),
    ("html 200", (200, "<html>proxy</html>", {}), RetryableError, "bad_response"),
    ("token expired", (400, graph_error(190, "expired", 463), JSON), PermanentError, "graph_190"),
    ("permission", (403, graph_error(10, "no permission"), JSON), PermanentError, "graph_10"),
    ("permission 2xx", (400, graph_error(294, "manage"), JSON), PermanentError, "graph_294"),
    ("bad parameter", (400, graph_error(100, "invalid"), JSON), PermanentError, "graph_100"),
    ("unknown code", (400, graph_error(999, "odd"), JSON), PermanentError, "graph_999"),
    ("transient 1", (500, graph_error(1, "unknown"), JSON), RetryableError, "graph_1"),
    ("transient 2", (503, graph_error(2, "service"), JSON), RetryableError, "graph_2"),
    ("app throttled", (400, graph_error(4, "too many"), JSON), RetryableError, "graph_4"),
    ("user throttled", (400, graph_error(17, "limit"), JSON), RetryableError, "graph_17"),
    ("app limit", (400, graph_error(341, "limit"), JSON), RetryableError, "graph_341"),
    ("wait", (400, graph_error(368, "blocked"), JSON), RetryableError, "graph_368"),
    ("5xx other code", (500, graph_error(999, "odd"), JSON), RetryableError, "graph_999"),
    ("5xx permanent code", (500, graph_error(190, "x"), JSON), PermanentError, "graph_190"),
    ("5xx no json", (502, "Bad Gateway", {}), RetryableError, "http_502"),
    ("404 no json", (404, "Not Found", {}), PermanentError, "http_404"),
    ("timeout", "hang", RetryableError, "timeout"),
    ("disconnected", "drop", RetryableError, "disconnected"),
]


@pytest.mark.parametrize(
    ("reply", "error", "reason"), [o[1:] for o in OUTCOMES], ids=[o[0] for o in OUTCOMES]
)
async def test_outcomes(
    graph: FakeGraph,
    resources: Resources,
    reply: Any,
    error: type[DeliveryError] | None,
    reason: str | None,
) -> None:
    graph.script.append(reply)
    action = fb.build(settings(graph, timeout=0.5), resources)
    await expect_outcome(action, make_job(LEAD), error, reason)
    assert len(graph.received) == 1


async def test_throttling_keeps_retry_after(graph: FakeGraph, resources: Resources) -> None:
    graph.script.append((400, graph_error(17, "slow down"), {**JSON, "Retry-After": "120"}))
    with pytest.raises(RetryableError) as caught:
        await fb.build(settings(graph), resources).send(make_job(LEAD))
    assert caught.value.retry_after == 120
    assert "fbtrace_id AbCdEfGh123" in caught.value.detail


@pytest.mark.parametrize("reply", ["echo", "drop", "hang"])
async def test_no_secret_in_errors_records_or_logs(
    graph: FakeGraph, resources: Resources, reply: str
) -> None:
    proof = hmac.new(APP_SECRET.encode(), TOKEN.encode(), hashlib.sha256).hexdigest()
    if reply == "echo":  # a server that quotes what it got, token and proof included
        graph.script.append((400, graph_error(190, f"bad {TOKEN} {proof} {APP_SECRET}"), JSON))
    else:
        graph.script.append(reply)
    action = fb.build(settings(graph, app_secret="${secret:fb_app}", timeout=0.5), resources)
    job = make_job(LEAD)
    with capture_logs() as logs, pytest.raises(DeliveryError) as caught:
        await action.send(job)
    assert TOKEN in graph.received[0].text  # it was really sent...
    texts = [str(caught.value), repr(caught.value), caught.value.detail, repr(logs)]
    texts.append(json.dumps(job.record.request.as_dict() if job.record.request else None))
    texts.append(str(job.record.response_excerpt))
    for text in texts:  # ...and is nowhere else
        for secret in (TOKEN, APP_SECRET, proof):
            assert secret not in text
    assert job.record.request is not None


async def test_preview_masks_secrets_and_does_no_io(clock: FakeClock) -> None:
    resources = Resources(http=None, secret=lambda name: TOKEN, clock=clock)
    action = fb.build(
        fb.Settings.model_validate(
            {
                "type": "facebook_conversion",
                "pixel_id": 99,
                "access_token": "${secret:fb_token}",
                "app_secret": "${secret:fb_app}",
            }
        ),
        resources,
    )
    record = action.preview(make_job(LEAD))
    assert record.method == "POST"
    assert record.url == "https://graph.facebook.com/v25.0/99/events"
    assert record.body is not None
    assert "access_token=****&appsecret_proof=****" in record.body
    assert TOKEN not in record.body
    assert action.destination == "https://graph.facebook.com:443"


HEAD = """\
offer: 1
postbacks:
  - id: 5
    trigger: conversion_done
    affiliate: "*"
    action:
      type: facebook_conversion
      pixel_id: "123"
      access_token: ${secret:fb_token}
"""
BAD_SETTINGS = {
    "pixel_not_digits": (
        HEAD.replace('"123"', "px-123"),
        "r.yaml:8: postback 5: action.pixel_id: must be the pixel's number (digits only)",
    ),
    "literal_token": (
        HEAD.replace("${secret:fb_token}", "EAAGabc"),
        "r.yaml:9: postback 5: action.access_token: "
        "must be a ${secret:NAME} reference, not literal text",
    ),
    "literal_app_secret": (
        HEAD + "      app_secret: abc${secret:x}\n",
        "r.yaml:10: postback 5: action.app_secret: "
        "must be a ${secret:NAME} reference, not literal text",
    ),
    "api_version": (
        HEAD + "      api_version: '25'\n",
        "r.yaml:10: postback 5: action.api_version: must look like v25.0, not '25'",
    ),
    "base_url_macro": (
        HEAD + "      base_url: https://graph.facebook.com/{offer}\n",
        "r.yaml:10: postback 5: action.base_url: cannot hold macros or secrets",
    ),
    "base_url_query": (
        HEAD + "      base_url: https://graph.facebook.com/?x=1\n",
        "r.yaml:10: postback 5: action.base_url: cannot have a query or a fragment",
    ),
    "base_url_scheme": (
        HEAD + "      base_url: ftp://graph.facebook.com\n",
        "r.yaml:10: postback 5: action.base_url: the URL's scheme must be http or https, not ftp",
    ),
    "action_source": (
        HEAD + "      action_source: web\n",
        "r.yaml:10: postback 5: action.action_source: must be one of website, email, app, "
        "phone_call, chat, physical_store, system_generated, business_messaging, other, "
        "not 'web'",
    ),
    "website_without_url": (
        HEAD + "      action_source: website\n",
        "r.yaml:6: postback 5: action: action_source website needs event_source_url",
    ),
    "user_data_key": (
        HEAD + "      user_data: {email: '{email}'}\n",
        "r.yaml:10: postback 5: action.user_data: unknown key 'email' (known: client_ip_address, "
        "client_user_agent, country, ct, db, em, external_id, fb_login_id, fbc, fbp, fn, ge, "
        "lead_id, ln, ph, st, zp)",
    ),
    "custom_data_value": (
        HEAD + "      custom_data: {value: '{payout}'}\n",
        "r.yaml:10: postback 5: action.custom_data: 'value' is set by the `value` setting, "
        "not here",
    ),
    "custom_data_key": (
        HEAD + "      custom_data: {Order ID: '{payout}'}\n",
        "r.yaml:10: postback 5: action.custom_data: key 'Order ID' is not a lower-case identifier",
    ),
    "phone_country_code": (
        HEAD + "      phone_country_code: '+1'\n",
        "r.yaml:10: postback 5: action.phone_country_code: "
        "must be 1 to 3 digits without + (1, 44, 380)",
    ),
    "unknown_macro": (
        HEAD + "      event_name: '{emial}'\n",
        "r.yaml:10: postback 5: action.event_name: unknown macro {emial}; did you mean {email}?",
    ),
    "timeout": (
        HEAD + "      timeout: 5m\n",
        "r.yaml:10: postback 5: action.timeout: Input should be less than or equal to 120",
    ),
    "unknown_key": (
        HEAD + "      pixel: 1\n",
        "r.yaml:10: postback 5: unknown key 'action.pixel'",
    ),
    "missing_token": (
        HEAD.replace("      access_token: ${secret:fb_token}\n", ""),
        "r.yaml:6: postback 5: missing required key 'action.access_token'",
    ),
}


@pytest.mark.parametrize(("text", "message"), BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_settings_errors(tmp_path: Path, text: str, message: str) -> None:
    assert load_issues(tmp_path, {"r.yaml": text}) == [message]


def test_good_settings_load(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(HEAD + "      phone_country_code: 1\n")
    rules = load_rules(tmp_path, git=False)
    action = rules.postbacks[5].postback.action
    assert isinstance(action, fb.Settings)
    assert action.phone_country_code == "1"
    assert rules.secrets == {"fb_token"}


async def test_end_to_end_webhook_to_graph(tmp_path: Path) -> None:
    graph = await FakeGraph(token=TOKEN).start()
    rules = {
        "offer-7.yaml": f"""
            offer: 7
            postbacks:
              - id: 21
                trigger: conversion_done
                affiliate: "*"
                action:
                  type: facebook_conversion
                  pixel_id: 555
                  access_token: ${{secret:fb_token}}
                  base_url: {graph.url}
                  test_event_code: TEST42
        """
    }
    try:
        run = await end_to_end(
            tmp_path,
            rules,
            SECRETS,
            lambda: graph.received,
            conversion_id="E1",
            offer=7,
            affiliate=42,
            status="approved",
            payout="9.99",
            currency="EUR",
            email="Lead@Example.com",
            ip="198.51.100.7",
        )
        (event,) = graph.events()
        assert event["event_id"] == "generic:E1:1:21"
        assert event["user_data"] == {
            "em": [sha("lead@example.com")],
            "client_ip_address": "198.51.100.7",
        }
        assert event["custom_data"] == {"value": 9.99, "currency": "eur"}
        assert graph.form()["test_event_code"] == "TEST42"
        assert run.state == DeliveryState.SUCCEEDED
        (attempt,) = run.attempts
        assert attempt.outcome == "succeeded"
        assert attempt.request is not None
        assert attempt.request["url"] == f"{graph.url}/v25.0/555/events"
        assert "access_token=****" in attempt.request["body"]
        assert TOKEN not in json.dumps(attempt.request)
        line = next(e for e in run.logs if e["event"] == "delivery_attempt")
        assert line["action"] == "facebook_conversion"
        assert line["outcome"] == "succeeded"
        assert TOKEN not in repr(run.logs)
    finally:
        await graph.close()
