"""ping_url against a loopback sink: the exact requests, the answers table, secrets kept out of
errors, records and logs, settings errors as `postbackd validate` prints them, end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from daemon.actions import ping_url
from daemon.actions.base import Job
from daemon.errors import (
    DeliveryError,
    GuardRefusedError,
    PermanentError,
    RenderError,
    RetryableError,
)
from daemon.outbound import OutboundHttp
from daemon.store.base import DeliveryState
from tests.actions.kit import load_issues, make_job, make_resources, secret_env
from tests.harness import Sink, start_daemon, wait_for

SECRET = "tok/en+v@lue&x=1"
SECRETS = {"pb_token": SECRET}
LEAD = {
    "conversion_id": "C 1",
    "offer": "7",
    "affiliate": "42",
    "status": "approved",
    "payout": "12.50",
    "click_id": "a&b=c/d?e#f",
    "extra.reason": "x y",
}


def job(**fields: str) -> Job:
    """This file's conversion, as `fields` change it, for postback 5 on 2026-01-01."""
    return make_job({**LEAD, **fields}, postback_id=5, now=1767225600)


def action(http: OutboundHttp, **raw: Any) -> ping_url.PingUrl:
    settings = ping_url.Settings.model_validate({"type": "ping_url", **raw})
    return ping_url.build(settings, make_resources(http, SECRETS))


async def test_get_exact_request(http: OutboundHttp, sink: Sink) -> None:
    a = action(
        http,
        url=f"{sink.url}/pb/{{sub1}}?cid={{click_id}}&p={{payout}}&r={{extra.reason}}"
        "&k=${secret:pb_token}",
    )
    j = job(sub1="x/y")
    await a.send(j)
    (got,) = sink.received
    assert got.method == "GET"
    assert got.path_qs == (
        "/pb/x%2Fy?cid=a%26b%3Dc%2Fd%3Fe%23f&p=12.50&r=x%20y&k=tok%2Fen%2Bv%40lue%26x%3D1"
    )
    assert got.headers["Idempotency-Key"] == "generic:C 1:1:5"
    assert got.body == b""
    assert j.record.request is not None
    assert j.record.request.url.endswith("&k=****")
    assert j.record.response_status == 200


async def test_post_form_and_json_exact_bodies(http: OutboundHttp, sink: Sink) -> None:
    form = action(
        http,
        method="POST",
        url=f"{sink.url}/f",
        headers={"X-Key": "${secret:pb_token}", "X-Offer": "{offer}"},
        form={"cid": "{click_id}", "amount": "{payout}"},
    )
    await form.send(job())
    got = sink.received[-1]
    assert got.method == "POST"
    assert got.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert got.headers["X-Key"] == SECRET
    assert got.headers["X-Offer"] == "7"
    assert got.text == "cid=a%26b%3Dc%2Fd%3Fe%23f&amount=12.50"
    body = action(
        http,
        method="POST",
        url=f"{sink.url}/j",
        idempotency_header=False,
        json={"click": "{click_id}", "n": [1, "{payout}"], "quote": 'say "{offer}"'},
    )
    await body.send(job())
    got = sink.received[-1]
    assert got.headers["Content-Type"] == "application/json"
    assert "Idempotency-Key" not in got.headers
    assert got.text == '{"click":"a&b=c/d?e#f","n":[1,"12.50"],"quote":"say \\"7\\""}'


OK, RETRY, DEAD = "ok", "retry", "dead"


@pytest.mark.parametrize(
    ("status", "body", "headers", "expect", "outcome", "reason"),
    [
        (200, "OK", {}, None, OK, None),
        (204, "", {}, None, OK, None),
        (200, "ERROR: bad click", {}, "^OK", DEAD, "unexpected_body"),
        (200, "status=OK", {}, "OK", OK, None),
        (301, "", {"Location": "/elsewhere"}, None, OK, None),  # GET follows (to the sink: 200)
        (400, "bad", {}, None, DEAD, "http_400"),
        (401, "", {}, None, DEAD, "http_401"),
        (404, "", {}, None, DEAD, "http_404"),
        (408, "", {}, None, RETRY, "http_408"),
        (409, "", {}, None, DEAD, "http_409"),
        (425, "", {}, None, RETRY, "http_425"),
        (429, "", {"Retry-After": "30"}, None, RETRY, "http_429"),
        (500, "", {}, None, RETRY, "http_500"),
        (502, "", {}, None, RETRY, "http_502"),
        (503, "", {}, None, RETRY, "http_503"),
    ],
)
async def test_answers_table(
    http: OutboundHttp,
    sink: Sink,
    status: int,
    body: str,
    headers: dict[str, str],
    expect: str | None,
    outcome: str,
    reason: str | None,
) -> None:
    sink.script = [(status, body, headers)]
    a = action(http, url=f"{sink.url}/x?c={{click_id}}", expect=expect)
    if outcome == OK:
        await a.send(job())
        return
    with pytest.raises(RetryableError if outcome == RETRY else PermanentError) as err:
        await a.send(job())
    assert err.value.reason == reason
    if status == 429:
        assert isinstance(err.value, RetryableError)
        assert err.value.retry_after == 30


async def test_connection_refused_is_retried_and_guard_refusal_is_not(http: OutboundHttp) -> None:
    closed = action(http, url="http://127.0.0.1:9/x")
    with pytest.raises(RetryableError) as err:
        await closed.send(job())
    assert err.value.reason == "connect_failed"
    guarded = action(http, url="http://10.1.2.3/x")
    with pytest.raises(GuardRefusedError):
        await guarded.send(job())


async def test_render_errors_are_permanent(http: OutboundHttp, sink: Sink) -> None:
    a = action(
        http, method="POST", url=f"{sink.url}/x", headers={"X-Click": "{click_id}"}, form={"a": "b"}
    )
    with pytest.raises(RenderError):
        # CR and LF are refused at the door (a 400); a Unicode line break gets this far.
        await a.send(job(click_id="evil\u2028X-Injected: 1"))
    assert sink.received == []


async def test_post_does_not_follow_redirects(http: OutboundHttp, sink: Sink) -> None:
    sink.script = [(302, "", {"Location": "/elsewhere"})]
    a = action(http, method="POST", url=f"{sink.url}/x", form={"a": "{click_id}"})
    with pytest.raises(PermanentError) as err:
        await a.send(job())
    assert err.value.reason == "http_302"
    assert len(sink.received) == 1


async def test_no_secret_in_errors_records_or_logs(http: OutboundHttp) -> None:
    async def boom(request: web.Request) -> web.Response:
        return web.Response(status=500, text=f"echo {request.query_string} {request.headers}")

    sink = await Sink().start()
    sink.script = [boom]
    try:
        a = action(
            http,
            method="POST",
            url=f"{sink.url}/x?k=${{secret:pb_token}}",
            headers={"Authorization": "Bearer ${secret:pb_token}"},
            json={"key": "${secret:pb_token}"},
        )
        j = job()
        with capture_logs() as logs, pytest.raises(DeliveryError) as err:
            await a.send(j)
        assert j.record.request is not None
        texts = [str(err.value), repr(err.value), repr(j.record), repr(logs)]
        assert all(SECRET not in t for t in texts)
        from urllib.parse import quote

        assert all(quote(SECRET, safe="") not in t for t in texts)
        assert j.record.request.headers["Authorization"] == "****"
        assert j.record.request.body == '{"key":"****"}'
        assert j.record.response_excerpt is not None
        assert "****" in j.record.response_excerpt
    finally:
        await sink.close()


BAD_SETTINGS = {
    "no url": ("action: {type: ping_url}", "missing required key 'action.url'"),
    "ftp url": ("action: {type: ping_url, url: 'ftp://x.example/'}", "action.url: "),
    "GET with form": (
        "action: {type: ping_url, url: 'https://x.example/', form: {a: b}}",
        "action: a GET request has no body: put the values in the URL's query",
    ),
    "form and json": (
        "action: {type: ping_url, method: POST, url: 'https://x.example/', "
        "form: {a: b}, json: {a: b}}",
        "action: give either form or json, not both",
    ),
    "bad method": (
        "action: {type: ping_url, method: DELETE, url: 'https://x.example/'}",
        "action.method: must be GET or POST, not 'DELETE'",
    ),
    "bad header": (
        "action: {type: ping_url, url: 'https://x.example/', headers: {'a b': c}}",
        "action.headers: 'a b' is not a valid header name",
    ),
    "reserved header": (
        "action: {type: ping_url, url: 'https://x.example/', headers: {Host: c}}",
        "action.headers: header 'Host' is set by postbackd and cannot be templated",
    ),
    "bad expect": (
        "action: {type: ping_url, url: 'https://x.example/', expect: '(['}",
        "action.expect: expect is not a valid regular expression: ",
    ),
    "bad timeout": (
        "action: {type: ping_url, url: 'https://x.example/', timeout: 10m}",
        "action.timeout: Input should be less than or equal to 120",
    ),
    "unknown key": (
        "action: {type: ping_url, url: 'https://x.example/', retries: 3}",
        "unknown key 'action.retries'",
    ),
    "macro in body key": (
        "action: {type: ping_url, method: POST, url: 'https://x.example/', json: {a: '{nope}'}}",
        "action.json: ",
    ),
}


@pytest.mark.parametrize(
    ("action_yaml", "message"), list(BAD_SETTINGS.values()), ids=list(BAD_SETTINGS)
)
def test_settings_errors(tmp_path: Path, action_yaml: str, message: str) -> None:
    text = (
        f"offer: 1\npostbacks:\n  - id: 5\n    trigger: conversion_done\n    affiliate: 1\n"
        f"    {action_yaml}\n"
    )
    (issue,) = load_issues(tmp_path, {"o.yaml": text})
    assert issue.startswith(f"o.yaml:6: postback 5: {message}")


async def test_end_to_end_with_a_secret_kept_out_of_the_attempt_record(
    tmp_path: Path, sink: Sink
) -> None:
    daemon = await start_daemon(
        tmp_path,
        {
            "o.yaml": f"""
        offer: 3
        postbacks:
          - id: 8
            trigger: conversion_done
            affiliate: "*"
            action:
              type: ping_url
              url: "{sink.url}/pb?tx={{conversion_id}}&key=${{secret:pb_token}}"
    """
        },
        environ=secret_env(SECRETS),
    )
    try:
        await daemon.post(conversion_id="E1", offer=3, affiliate=1, status="approved")
        await wait_for(lambda: sink.received)
        assert sink.received[0].path_qs == "/pb?tx=E1&key=tok%2Fen%2Bv%40lue%26x%3D1"
        rows = await wait_for(lambda: daemon.deliveries(state=DeliveryState.SUCCEEDED))
        detail = await daemon.services.store.get_delivery(rows[0].delivery_id)
        assert detail is not None
        assert detail.attempts[0].request is not None
        assert detail.attempts[0].request["url"].endswith("/pb?tx=E1&key=****")
    finally:
        await daemon.client.close()
