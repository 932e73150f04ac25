"""google_analytics against a fake Measurement Protocol endpoint on 127.0.0.1: the exact request,
param typing and limits, the debug (validate_only) mode, the outcome table, secrets kept out of
errors, records and logs, settings errors as `postbackd validate` prints them, end to end."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.actions import google_analytics as ga
from daemon.actions.base import Resources
from daemon.errors import DeliveryError, PermanentError, RetryableError
from daemon.loader import load_rules
from daemon.outbound import OutboundHttp
from daemon.store.base import DeliveryState
from tests.actions import kit
from tests.actions.fakes_google_analytics import FakeGA
from tests.actions.kit import NOW, end_to_end, expect_outcome, load_issues, make_resources
from tests.harness import FakeClock

API_SECRET = "gaSECRET+v4lue/42"  # `+` and `/` are percent-encoded in the query
SECRETS = {"ga_secret": API_SECRET}
make_job = partial(kit.make_job, postback_id=5)  # the postback of this file's rules
LEAD = {
    "conversion_id": "C-1",
    "offer": "7",
    "affiliate": "42",
    "status": "approved",
    "payout": "12.50",
    "currency": "USD",
    "ga_client_id": "555.666",
    "event_time": str(int(NOW) - 600),
}


def settings(fake: FakeGA, **overrides: Any) -> ga.Settings:
    raw = {
        "type": "google_analytics",
        "measurement_id": "G-TEST1234",
        "api_secret": "${secret:ga_secret}",
        "base_url": fake.url,
        **overrides,
    }
    return ga.Settings.model_validate(raw)


@pytest.fixture
def resources(http: OutboundHttp, clock: FakeClock) -> Resources:
    return make_resources(http, SECRETS, clock=clock)


@pytest.fixture
async def fake() -> AsyncIterator[FakeGA]:
    server = await FakeGA(now=lambda: NOW).start()
    yield server
    await server.close()


async def test_happy_path_sends_exactly_this_request(fake: FakeGA, resources: Resources) -> None:
    job = make_job(LEAD)
    await ga.build(settings(fake), resources).send(job)
    (got,) = fake.received
    assert got.method == "POST"
    assert got.path_qs == "/mp/collect?measurement_id=G-TEST1234&api_secret=gaSECRET%2Bv4lue%2F42"
    assert got.headers["Content-Type"] == "application/json"
    assert got.body == (
        b'{"client_id":"555.666","timestamp_micros":1789999400000000,"events":[{"name":'
        b'"generate_lead","params":{"value":12.5,"currency":"USD","transaction_id":"C-1"}}]}'
    )
    assert job.record.response_status == 204
    assert job.record.request is not None
    assert job.record.request.url.endswith("api_secret=****")


async def test_params_user_id_and_types(fake: FakeGA, resources: Resources) -> None:
    action = ga.build(
        settings(
            fake,
            event_name="purchase",
            user_id="u-{affiliate}",
            client_id="{extra.cid}",
            params={
                "value": "{revenue}",
                "tax": "{extra.tax}",  # a string unless it is exactly {payout} or {revenue}
                "shipping": "{payout}",
                "engagement_time_msec": 100,
                "debug_mode": True,
                "affiliate_name": "aff {affiliate}",
                "currency": "",  # turns a default off
                "label": "lit{{eral}}",
            },
        ),
        resources,
    )
    job = make_job({**LEAD, "revenue": "40", "payout": "0.5"}, extra={"cid": "1.2", "tax": "3"})
    await action.send(job)
    body = fake.body()
    assert body["client_id"] == "1.2"
    assert body["user_id"] == "u-42"
    assert body["events"] == [
        {
            "name": "purchase",
            "params": {
                "value": 40,
                "transaction_id": "C-1",
                "tax": "3",
                "shipping": 0.5,
                "engagement_time_msec": 100,
                "debug_mode": True,
                "affiliate_name": "aff 42",
                "label": "lit{eral}",
            },
        }
    ]


async def test_empty_values_are_left_out(fake: FakeGA, resources: Resources) -> None:
    fields = {k: v for k, v in LEAD.items() if k not in ("payout", "currency", "event_time")}
    await ga.build(settings(fake, use_event_time=False), resources).send(make_job(fields))
    body = fake.body()
    assert "timestamp_micros" not in body  # GA stamps it on receipt
    assert body["events"][0]["params"] == {"transaction_id": "C-1"}


@pytest.mark.parametrize(
    ("overrides", "fields", "extra", "reason"),
    [
        ({}, {"ga_client_id": ""}, {}, "missing_client_id"),
        ({"client_id": " {extra.cid} "}, {}, {}, "missing_client_id"),
        ({"params": {"value": "{extra.amount}"}}, {}, {"amount": "ten"}, "param_not_a_number"),
        ({"params": {"value": "{extra.amount}"}}, {}, {"amount": "NaN"}, "param_not_a_number"),
        ({"params": {"note": "{extra.note}"}}, {}, {"note": "x" * 101}, "param_too_long"),
        ({}, {"event_time": str(int(NOW) - 72 * 3600 - 1)}, {}, "event_too_old"),
    ],
)
async def test_refused_before_sending(
    fake: FakeGA,
    resources: Resources,
    overrides: dict[str, Any],
    fields: dict[str, str],
    extra: dict[str, str],
    reason: str,
) -> None:
    action = ga.build(settings(fake, **overrides), resources)
    with pytest.raises(PermanentError) as caught:
        await action.send(make_job({**LEAD, **fields}, extra=extra))
    assert caught.value.reason == reason
    assert fake.received == []


async def test_long_values_pass_under_a_raised_limit(fake: FakeGA, resources: Resources) -> None:
    job = make_job(LEAD, extra={"note": "y" * 300})
    action = ga.build(
        settings(fake, max_value_length=500, params={"note": "{extra.note}"}), resources
    )
    await action.send(job)
    assert fake.body()["events"][0]["params"]["note"] == "y" * 300


async def test_event_time_from_the_future_is_sent_as_now(
    fake: FakeGA, resources: Resources
) -> None:
    await ga.build(settings(fake), resources).send(
        make_job({**LEAD, "event_time": "2030-01-01T00:00:00Z"})
    )
    assert fake.body()["timestamp_micros"] == int(NOW) * 1_000_000


async def test_validate_only_uses_the_debug_endpoint(fake: FakeGA, resources: Resources) -> None:
    action = ga.build(settings(fake, validate_only=True), resources)
    await action.send(make_job(LEAD))
    assert fake.received[0].path_qs.startswith("/debug/mp/collect?measurement_id=G-TEST1234&")
    # A value GA refuses (over 100 characters on a standard property): the debug endpoint's
    # message becomes a permanent error.
    action = ga.build(
        settings(fake, validate_only=True, max_value_length=500, params={"n": "{extra.n}"}),
        resources,
    )
    with pytest.raises(PermanentError) as caught:
        await action.send(make_job(LEAD, extra={"n": "z" * 150}))
    assert caught.value.reason == "validation_failed"
    assert caught.value.detail == "VALUE_INVALID at events[0].params.n (1 in all)"


JSON = {"Content-Type": "application/json"}
OUTCOMES: list[tuple[str, bool, Any, type[DeliveryError] | None, str | None]] = [
    ("204", False, (204, "", {}), None, None),
    ("200", False, (200, "", {}), None, None),
    ("500", False, (500, "oops", {}), RetryableError, "http_500"),
    ("503", False, (503, "busy", {}), RetryableError, "http_503"),
    ("429", False, (429, "slow", {}), RetryableError, "http_429"),
    ("400", False, (400, "bad", {}), PermanentError, "http_400"),
    ("403", False, (403, "no", {}), PermanentError, "http_403"),
    ("404", False, (404, "no", {}), PermanentError, "http_404"),
    ("timeout", False, "hang", RetryableError, "timeout"),
    ("disconnected", False, "drop", RetryableError, "disconnected"),
    ("debug ok", True, (200, '{"validationMessages":[]}', JSON), None, None),
    (
        "debug message",
        True,
        (200, '{"validationMessages":[{"fieldPath":"x","validationCode":"NAME_INVALID"}]}', JSON),
        PermanentError,
        "validation_failed",
    ),
    ("debug not json", True, (200, "<html>", {}), RetryableError, "bad_response"),
    ("debug no list", True, (200, "{}", JSON), RetryableError, "bad_response"),
    ("debug 500", True, (500, "", {}), RetryableError, "http_500"),
]


@pytest.mark.parametrize(
    ("debug", "reply", "error", "reason"), [o[1:] for o in OUTCOMES], ids=[o[0] for o in OUTCOMES]
)
async def test_outcomes(
    fake: FakeGA,
    resources: Resources,
    debug: bool,
    reply: Any,
    error: type[DeliveryError] | None,
    reason: str | None,
) -> None:
    fake.script.append(reply)
    action = ga.build(settings(fake, timeout=0.5, validate_only=debug), resources)
    await expect_outcome(action, make_job(LEAD), error, reason)
    assert len(fake.received) == 1


async def test_retry_after_is_kept(fake: FakeGA, resources: Resources) -> None:
    fake.script.append((429, "", {"Retry-After": "30"}))
    with pytest.raises(RetryableError) as caught:
        await ga.build(settings(fake), resources).send(make_job(LEAD))
    assert caught.value.retry_after == 30


@pytest.mark.parametrize("reply", ["echo", "drop", "hang"])
async def test_no_secret_in_errors_records_or_logs(
    fake: FakeGA, resources: Resources, reply: str
) -> None:
    encoded = "gaSECRET%2Bv4lue%2F42"  # as sent
    on_wire = "gaSECRET%2Bv4lue/42"  # as a proxy may normalise it before quoting it back
    if reply == "echo":  # an answer that quotes the request line
        fake.script.append((400, f"bad request {API_SECRET} {encoded} {on_wire}", {}))
    else:
        fake.script.append(reply)
    action = ga.build(settings(fake, timeout=0.5), resources)
    job = make_job(LEAD)
    with capture_logs() as logs, pytest.raises(DeliveryError) as caught:
        await action.send(job)
    assert encoded in fake.received[0].path_qs  # it was really sent...
    texts = [str(caught.value), repr(caught.value), caught.value.detail, repr(logs)]
    texts.append(json.dumps(job.record.request.as_dict() if job.record.request else None))
    texts.append(str(job.record.response_excerpt))
    for text in texts:  # ...and is nowhere else
        assert API_SECRET not in text
        assert encoded not in text
        assert on_wire not in text
    assert job.record.request is not None


def test_preview_masks_the_secret(clock: FakeClock) -> None:
    resources = Resources(http=None, secret=lambda name: API_SECRET, clock=clock)
    raw = {"type": "google_analytics", "measurement_id": "G-ABCD1234", "api_secret": "${secret:s}"}
    action = ga.build(ga.Settings.model_validate(raw), resources)
    record = action.preview(make_job(LEAD))
    assert record.url == (
        "https://www.google-analytics.com/mp/collect?measurement_id=G-ABCD1234&api_secret=****"
    )
    assert record.body is not None
    assert json.loads(record.body)["client_id"] == "555.666"
    assert action.destination == "https://www.google-analytics.com:443"


HEAD = """\
offer: 1
postbacks:
  - id: 5
    trigger: conversion_done
    affiliate: "*"
    action:
      type: google_analytics
      measurement_id: G-ABCD1234
      api_secret: ${secret:ga_secret}
"""
P = "r.yaml:10: postback 5: action"
MANY = "{" + ", ".join(f"p{i}: x" for i in range(23)) + "}"
BAD_SETTINGS = {
    "measurement_id": (
        HEAD.replace("G-ABCD1234", "UA-1234-1"),
        "r.yaml:8: postback 5: action.measurement_id: must look like G-XXXXXXXXXX, not 'UA-1234-1'",
    ),
    "literal_secret": (
        HEAD.replace("${secret:ga_secret}", "abc123"),
        "r.yaml:9: postback 5: action.api_secret: "
        "must be a ${secret:NAME} reference, not literal text",
    ),
    "reserved_event": (
        HEAD + "      event_name: first_visit\n",
        f"{P}.event_name: event name 'first_visit' is reserved by Google Analytics",
    ),
    "reserved_event_prefix": (
        HEAD + "      event_name: google_lead\n",
        f"{P}.event_name: event name 'google_lead' uses a reserved prefix "
        "(_, firebase_, ga_, google_, gtag.)",
    ),
    "event_name_too_long": (
        HEAD + "      event_name: " + "a" * 41 + "\n",
        f"{P}.event_name: event name '{'a' * 41}' is longer than 40 characters",
    ),
    "event_name_chars": (
        HEAD + "      event_name: lead-form\n",
        f"{P}.event_name: event name 'lead-form' must start with a letter and hold only "
        "letters, digits and _",
    ),
    "event_name_digit": (
        HEAD + "      event_name: 1lead\n",
        f"{P}.event_name: event name '1lead' must start with a letter and hold only "
        "letters, digits and _",
    ),
    "param_reserved": (
        HEAD + "      params: {firebase_screen: x}\n",
        f"{P}.params: param 'firebase_screen' uses a reserved prefix "
        "(_, firebase_, ga_, google_, gtag.)",
    ),
    "param_name_long": (
        HEAD + "      params: {" + "p" * 41 + ": x}\n",
        f"{P}.params: param '{'p' * 41}' is longer than 40 characters",
    ),
    "too_many_params": (
        HEAD + f"      params: {MANY}\n",
        f"{P}.params: 26 params with the defaults (value, currency, transaction_id), at most 25",
    ),
    "literal_too_long": (
        HEAD + "      params: {note: " + "n" * 101 + "}\n",
        f"{P}.params: the value of 'note' is longer than 100 characters",
    ),
    "limit_too_high": (
        HEAD + "      max_value_length: 1000\n",
        f"{P}.max_value_length: Input should be less than or equal to 500",
    ),
    "param_value_type": (
        HEAD + "      params: {items: [1, 2]}\n",
        f"{P}.params.items: must be a text template, a finite number or true/false",
    ),
    "base_url_macro": (
        HEAD + "      base_url: https://{sub1}.example.com\n",
        f"{P}.base_url: a macro cannot set the URL's scheme, host or port",
    ),
    "base_url_secret": (
        HEAD + "      base_url: https://ga.example.com/${secret:x}\n",
        f"{P}.base_url: cannot hold macros or secrets",
    ),
    "client_id_macro": (
        HEAD + "      client_id: '{ga_clientid}'\n",
        f"{P}.client_id: unknown macro {{ga_clientid}}; did you mean {{ga_client_id}}?",
    ),
    "unknown_key": (
        HEAD + "      events: []\n",
        "r.yaml:10: postback 5: unknown key 'action.events'",
    ),
}


@pytest.mark.parametrize(("text", "message"), BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_settings_errors(tmp_path: Path, text: str, message: str) -> None:
    assert load_issues(tmp_path, {"r.yaml": text}) == [message]


def test_limits_that_load(tmp_path: Path) -> None:
    params = "{" + ", ".join(f"p{i}: x" for i in range(21)) + ", note: " + "n" * 200 + "}"
    text = HEAD + f"      max_value_length: 500\n      params: {params}\n"
    (tmp_path / "r.yaml").write_text(text + "      event_name: " + "e" * 40 + "\n")
    rules = load_rules(tmp_path, git=False)
    assert isinstance(rules.postbacks[5].postback.action, ga.Settings)
    assert rules.secrets == {"ga_secret"}


async def test_end_to_end_webhook_to_ga(tmp_path: Path) -> None:
    fake = await FakeGA().start()
    rules = {
        "offer-7.yaml": f"""
            offer: 7
            postbacks:
              - id: 31
                trigger: conversion_done
                affiliate: "*"
                action:
                  type: google_analytics
                  measurement_id: G-E2E12345
                  api_secret: ${{secret:ga_secret}}
                  base_url: {fake.url}
                  params: {{affiliate_id: "{{affiliate}}"}}
        """
    }
    try:
        run = await end_to_end(
            tmp_path,
            rules,
            SECRETS,
            lambda: fake.received,
            conversion_id="G1",
            offer=7,
            affiliate=42,
            status="approved",
            payout="3",
            currency="EUR",
            ga_client_id="111.222",
        )
        body = fake.body()
        assert body["client_id"] == "111.222"
        assert body["events"] == [
            {
                "name": "generate_lead",
                "params": {
                    "value": 3,
                    "currency": "EUR",
                    "transaction_id": "G1",
                    "affiliate_id": "42",
                },
            }
        ]
        assert run.state == DeliveryState.SUCCEEDED
        (attempt,) = run.attempts
        assert attempt.response_status == 204
        assert attempt.request is not None
        assert attempt.request["url"] == (
            f"{fake.url}/mp/collect?measurement_id=G-E2E12345&api_secret=****"
        )
        line = next(e for e in run.logs if e["event"] == "delivery_attempt")
        assert line["action"] == "google_analytics"
        assert line["outcome"] == "succeeded"
        assert "gaSECRET" not in repr(run.logs)
    finally:
        await fake.close()
