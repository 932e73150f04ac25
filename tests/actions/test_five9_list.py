"""five9_list against a loopback fake Five9 (Web2Campaign and SOAP): the exact requests, values
that XML would break arriving intact, the answers that are retried or not, the password kept out
of every record, the settings errors an ops person sees, and the webhook-to-fake path."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.actions import five9_list
from daemon.actions.base import Job
from daemon.errors import DeliveryError, PermanentError, RetryableError
from daemon.outbound import OutboundHttp
from daemon.store.base import DeliveryState
from tests.actions import kit
from tests.actions.fakes_five9 import FakeFive9, list_import_result, soap_fault, w2c_page
from tests.actions.kit import expect_outcome, load_issues, make_resources, secret_env
from tests.harness import start_daemon, wait_for

PASSWORD = "f9-Pw<&>\"'x"
TOKEN = base64.b64encode(f"api@acme:{PASSWORD}".encode()).decode()
SECRETS = {"five9_password": PASSWORD}
VALUES = {"phone": "5551208111", "first_name": "John", "last_name": "Smith", "conversion_id": "C1"}
FIELDS = {"number1": "{phone}", "first_name": "{first_name}", "last_name": "{last_name}"}
SOAP = {"mode": "soap", "username": "api@acme", "password": "${secret:five9_password}"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeFive9]:
    server = await FakeFive9(password=PASSWORD).start()
    yield server
    await server.close()


def make_action(http: Any, base_url: str, **settings: Any) -> five9_list.Five9List:
    raw: dict[str, Any] = {
        "type": "five9_list",
        "base_url": base_url,
        "list_name": "hot leads",
        "fields": FIELDS,
        **settings,
    }
    if raw.get("mode", "web2campaign") == "web2campaign":
        raw.setdefault("domain", "acme")
    return five9_list.build(five9_list.Settings.model_validate(raw), make_resources(http, SECRETS))


def make_job(**fields: str) -> Job:
    """This file's lead, as `fields` change it, for postback 11."""
    return kit.make_job({**VALUES, **fields}, postback_id=11)


# --- exact requests ---------------------------------------------------------------------------


async def test_web2campaign_posts_exactly_this_form(fake: FakeFive9, http: OutboundHttp) -> None:
    action = make_action(http, fake.url, call_asap=True)
    assert action.idempotent is True
    job = make_job()
    await action.send(job)
    (got,) = fake.received
    assert got.method == "POST"
    assert got.path_qs == "/web2campaign/AddToList"
    assert got.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert "Authorization" not in got.headers
    assert got.text == (
        "F9domain=acme&F9list=hot+leads&number1=5551208111&first_name=John&last_name=Smith"
        "&F9key=number1&F9retResults=1&F9CallASAP=1"
    )
    assert fake.contacts == {
        ("5551208111",): {"number1": "5551208111", "first_name": "John", "last_name": "Smith"}
    }
    assert job.record.response_status == 200


async def test_web2campaign_get_with_two_keys_and_basic_auth(
    fake: FakeFive9, http: OutboundHttp
) -> None:
    fake.w2c_auth = True
    action = make_action(
        http,
        fake.url,
        method="GET",
        key_fields=["number1", "last_name"],
        username="api@acme",
        password="${secret:five9_password}",
    )
    await action.send(make_job(first_name=""))  # an empty value is left out
    (got,) = fake.received
    assert got.method == "GET"
    assert got.path_qs == (
        "/web2campaign/AddToList?F9domain=acme&F9list=hot+leads&number1=5551208111"
        "&last_name=Smith&F9key=number1&F9key=last_name&F9retResults=1"
    )
    assert got.body == b""
    assert got.headers["Authorization"] == f"Basic {TOKEN}"


EXPECTED_ENVELOPE = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<env:Envelope xmlns:env="http://schemas.xmlsoap.org/soap/envelope/"'
    ' xmlns:ser="http://service.admin.ws.five9.com/"><env:Body>'
    "<ser:addRecordToList><listName>hot leads</listName><listUpdateSettings>"
    "<fieldsMapping><columnNumber>1</columnNumber><fieldName>number1</fieldName>"
    "<key>true</key></fieldsMapping>"
    "<fieldsMapping><columnNumber>2</columnNumber><fieldName>first_name</fieldName>"
    "<key>false</key></fieldsMapping>"
    "<fieldsMapping><columnNumber>3</columnNumber><fieldName>last_name</fieldName>"
    "<key>false</key></fieldsMapping>"
    "<skipHeaderLine>false</skipHeaderLine><callNowMode>ANY</callNowMode>"
    "<cleanListBeforeUpdate>false</cleanListBeforeUpdate><crmAddMode>ADD_NEW</crmAddMode>"
    "<crmUpdateMode>UPDATE_FIRST</crmUpdateMode><listAddMode>ADD_FIRST</listAddMode>"
    "</listUpdateSettings><record><fields>5551208111</fields><fields>John</fields>"
    "<fields>Smith</fields></record></ser:addRecordToList></env:Body></env:Envelope>"
)


async def test_soap_posts_exactly_this_envelope(fake: FakeFive9, http: OutboundHttp) -> None:
    action = make_action(http, fake.url + "/", call_now_mode="ANY", **SOAP)
    job = make_job()
    await action.send(job)
    (got,) = fake.received
    assert got.method == "POST"
    assert got.path_qs == "/wsadmin/v13/AdminWebService"
    assert got.headers["Content-Type"] == "text/xml; charset=utf-8"
    assert got.headers["SOAPAction"] == '""'
    assert got.headers["Authorization"] == f"Basic {TOKEN}"
    assert got.text == EXPECTED_ENVELOPE
    (call,) = fake.soap_calls
    assert call.settings["crmUpdateMode"] == "UPDATE_FIRST"
    assert call.record == {"number1": "5551208111", "first_name": "John", "last_name": "Smith"}
    assert job.record.request is not None
    assert job.record.request.headers["Authorization"] == "****"
    assert "<crmRecordsInserted>1</crmRecordsInserted>" in (job.record.response_excerpt or "")


HOSTILE_TEXT = [
    "<b>bold</b>",
    "Tom & Jerry",
    "\"double\" and 'single' quotes",
    "]]> ends CDATA <![CDATA[ x ]]>",
    "</fields><fields>injected",
    "<!DOCTYPE x [<!ENTITY e 'boom'>]>&e;",
    "&amp; already escaped &lt;",
    "Ünïcödé ☎ 電話",
]


async def test_soap_values_arrive_intact_whatever_they_hold(
    fake: FakeFive9, http: OutboundHttp
) -> None:
    fake.lists.add("list <&> \"'")
    action = make_action(
        http,
        fake.url,
        list_name="{extra.list}",
        fields={**FIELDS, "comments": "{extra.comments}"},
        **SOAP,
    )
    for text in HOSTILE_TEXT:
        await action.send(
            make_job(
                first_name=text,
                last_name=text[::-1],
                **{"extra.comments": text, "extra.list": "list <&> \"'"},
            )
        )
        call = fake.soap_calls[-1]
        assert call.list_name == "list <&> \"'"
        assert call.record == {
            "number1": "5551208111",
            "first_name": text,
            "last_name": text[::-1],
            "comments": text,
        }


async def test_a_repeat_updates_the_contact_instead_of_adding_it(
    fake: FakeFive9, http: OutboundHttp
) -> None:
    for mode in ({}, SOAP):
        fake.contacts.clear()
        action = make_action(http, fake.url, **mode)
        await action.send(make_job())
        again = make_job(last_name="Smythe")
        await action.send(again)
        assert fake.contacts == {
            ("5551208111",): {"number1": "5551208111", "first_name": "John", "last_name": "Smythe"}
        }
    assert "<crmRecordsUpdated>1</crmRecordsUpdated>" in (again.record.response_excerpt or "")


async def test_an_empty_key_field_sends_nothing(fake: FakeFive9, http: OutboundHttp) -> None:
    for mode in ({}, SOAP):
        with pytest.raises(PermanentError) as caught:
            await make_action(http, fake.url, **mode).send(make_job(phone=" "))
        assert caught.value.reason == "missing_key_field"
    assert fake.received == []


async def test_the_fakes_own_refusals_through_the_action(
    fake: FakeFive9, http: OutboundHttp
) -> None:
    with pytest.raises(PermanentError, match=r"^five9_err_701: List nope does not exist$"):
        await make_action(http, fake.url, list_name="nope").send(make_job())
    with pytest.raises(PermanentError, match=r"^five9_err_700: "):
        await make_action(http, fake.url, domain="other").send(make_job())
    with pytest.raises(PermanentError, match=r'^five9_object_not_found: List "nope" is not found$'):
        await make_action(http, fake.url, list_name="nope", **SOAP).send(make_job())
    bad_user = {**SOAP, "username": "someone@acme"}
    with pytest.raises(PermanentError, match=r"^http_401$"):
        await make_action(http, fake.url, **bad_user).send(make_job())


# --- answers ----------------------------------------------------------------------------------

LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
    "<env:Envelope xmlns:env='http://schemas.xmlsoap.org/soap/envelope/'><env:Body>"
    "<addRecordToListResponse><return><uploadErrorsCount>&lol2;</uploadErrorsCount>"
    "</return></addRecordToListResponse></env:Body></env:Envelope>"
)
FAULT_NO_DETAIL = (
    "<env:Envelope xmlns:env='http://schemas.xmlsoap.org/soap/envelope/'><env:Body><env:Fault>"
    "<faultcode>env:Client</faultcode><faultstring>Invalid value</faultstring></env:Fault>"
    "</env:Body></env:Envelope>"
)
Row = tuple[str, Any, type[DeliveryError] | None, str | None]
W2C_ANSWERS: list[Row] = [
    ("errCode 0", (200, w2c_page(0, "The request was successfully processed")), None, None),
    ("errCode 701", (200, w2c_page(701, "List x does not exist")), PermanentError, "five9_err_701"),
    ("errCode -1", (200, w2c_page(-1, "Internal error")), PermanentError, "five9_err_-1"),
    (
        "not the result page",
        (200, "<html>Maintenance</html>"),
        RetryableError,
        "five9_bad_response",
    ),
    (
        "errCode not a number",
        (200, w2c_page(0, "x").replace('"0"', '"ok"')),
        RetryableError,
        "five9_bad_response",
    ),
    ("401", (401, "Unauthorized"), PermanentError, "http_401"),
    ("404", (404, "Not Found"), PermanentError, "http_404"),
    ("429", (429, ""), RetryableError, "http_429"),
    ("500", (500, ""), RetryableError, "http_500"),
    ("503", (503, ""), RetryableError, "http_503"),
    ("timeout after sending: a resend updates", "hang", RetryableError, "timeout"),
]
SOAP_ANSWERS: list[Row] = [
    ("listImportResult", (200, list_import_result("hot leads", 1, 0)), None, None),
    ("updated", (200, list_import_result("hot leads", 0, 1)), None, None),
    (
        "upload error",
        (200, list_import_result("hot leads", 0, 0, errors=1)),
        PermanentError,
        "five9_upload_error",
    ),
    (
        "Fault, 500",
        (500, soap_fault("List is not found")),
        PermanentError,
        "five9_object_not_found",
    ),
    (
        "Fault kind",
        (500, soap_fault("no", "WrongListDialingModeFault")),
        PermanentError,
        "five9_wrong_list_dialing_mode",
    ),
    ("Fault without detail", (500, FAULT_NO_DETAIL), PermanentError, "five9_fault"),
    ("500 without Fault", (500, "<html>Internal Server Error</html>"), RetryableError, "http_500"),
    ("502", (502, "Bad Gateway"), RetryableError, "http_502"),
    ("200 not XML", (200, "<html><body>Maintenance"), RetryableError, "five9_bad_response"),
    ("200 other XML", (200, "<a/>"), RetryableError, "five9_bad_response"),
    ("DTD refused, not expanded", (200, LAUGHS), RetryableError, "five9_bad_response"),
    ("401", (401, ""), PermanentError, "http_401"),
    ("timeout after sending: a resend updates", "hang", RetryableError, "timeout"),
]


def _params(rows: list[Row]) -> Any:
    return pytest.mark.parametrize(
        ("reply", "error", "reason"), [r[1:] for r in rows], ids=[r[0] for r in rows]
    )


async def _classify(
    fake: FakeFive9, action: five9_list.Five9List, reply: Any, error: Any, reason: Any
) -> None:
    fake.script.append(reply)
    await expect_outcome(action, make_job(), error, reason)
    assert len(fake.received) == 1


@_params(W2C_ANSWERS)
async def test_web2campaign_answers(
    fake: FakeFive9, http: OutboundHttp, reply: Any, error: Any, reason: Any
) -> None:
    await _classify(fake, make_action(http, fake.url, timeout="300ms"), reply, error, reason)


@_params(SOAP_ANSWERS)
async def test_soap_answers(
    fake: FakeFive9, http: OutboundHttp, reply: Any, error: Any, reason: Any
) -> None:
    action = make_action(http, fake.url, timeout="300ms", **SOAP)
    await _classify(fake, action, reply, error, reason)


# --- secrets ----------------------------------------------------------------------------------


def _assert_clean(*texts: str) -> None:
    for text in texts:
        for form in (PASSWORD, TOKEN, json.dumps(PASSWORD)[1:-1], "f9-Pw&lt;&amp;&gt;"):
            assert form not in text, text


@pytest.mark.parametrize(
    "reply",
    [
        (500, soap_fault(f"Password {PASSWORD} rejected")),
        (
            200,
            list_import_result("hot leads", 0, 0, errors=1).replace(
                "</return>", f"<failureMessage>{PASSWORD}</failureMessage></return>"
            ),
        ),
        (200, w2c_page(9, f"bad password {PASSWORD}")),
        (401, f"Basic {TOKEN}"),
        (200, f"echo {PASSWORD} {TOKEN}"),
    ],
)
async def test_the_password_never_reaches_errors_records_or_logs(
    fake: FakeFive9, http: OutboundHttp, reply: tuple[int, str]
) -> None:
    auth = {"username": "api@acme", "password": "${secret:five9_password}"}
    for settings in (SOAP, auth):
        fake.script.append(reply)
        action = make_action(http, fake.url, **settings)
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
            json.dumps(job.record.request.as_dict()),
            job.record.response_excerpt or "",
            repr(logs),
            json.dumps(action.preview(make_job()).as_dict()),
        )
    assert [r.headers["Authorization"] for r in fake.received] == [f"Basic {TOKEN}"] * 2


# --- settings errors, as `postbackd validate` prints them ---------------------------------------

RULE = """\
offer: 1
postbacks:
  - id: 11
    trigger: conversion_done
    affiliate: "*"
    action:
      type: five9_list
      list_name: hot leads
      fields: {number1: "{phone}", first_name: "{first_name}"}
      %s
"""


def validation_errors(tmp_path: Path, extra: str) -> list[str]:
    rule = RULE % extra
    if extra.count("fields: {") == 1:  # the test's own fields replace the rule's
        rule = rule.replace('      fields: {number1: "{phone}", first_name: "{first_name}"}\n', "")
    return load_issues(tmp_path / "rules.d", {"offer-1.yaml": rule})


W2C = "domain: acme\n      "
SOAP_YAML = "mode: soap\n      username: api@acme\n      password: ${secret:five9_password}\n      "


@pytest.mark.parametrize(
    "extra",
    [
        W2C,
        W2C + "method: GET\n      call_asap: true\n      key_fields: [number1, first_name]",
        SOAP_YAML + "call_now_mode: NEW_CRM_ONLY\n      timeout: 30s",
        SOAP_YAML + "base_url: https://api.five9.eu",
    ],
)
def test_valid_rules_load(tmp_path: Path, extra: str) -> None:
    assert validation_errors(tmp_path, extra) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("", "6: postback 11: action: mode web2campaign needs domain (the Five9 domain, F9domain)"),
        (
            "mode: soap",
            "6: postback 11: action: mode soap needs username and password (a Five9 admin/API"
            " user)",
        ),
        (W2C + "username: api@acme", "6: postback 11: action: give username and password together"),
        (
            SOAP_YAML + "domain: acme",
            "6: postback 11: action: domain applies to mode web2campaign only",
        ),
        (
            SOAP_YAML + "call_asap: true",
            "6: postback 11: action: call_asap applies to mode web2campaign only",
        ),
        (
            SOAP_YAML + "method: GET",
            "6: postback 11: action: method applies to mode web2campaign only",
        ),
        (
            W2C + "call_now_mode: ANY",
            "6: postback 11: action: call_now_mode applies to mode soap (web2campaign has"
            " call_asap)",
        ),
        (
            W2C + "key_fields: []",
            "6: postback 11: action: key_fields must name at least one field (keys make a resend"
            " update)",
        ),
        (W2C + "key_fields: [email]", "6: postback 11: action: key field 'email' is not in fields"),
        (
            W2C + "key_fields: [number1, number1]",
            "6: postback 11: action: a key field is listed twice",
        ),
        (
            "mode: soap\n      username: api@acme\n      password: hunter2",
            "12: postback 11: action.password: must be a ${secret:NAME} reference, not literal"
            " text",
        ),
        (
            W2C + "base_url: https://api.five9.com/?x={email}",
            "11: postback 11: action.base_url: cannot hold macros or secrets",
        ),
        (
            W2C + "base_url: https://api.five9.com/#x",
            "11: postback 11: action.base_url: cannot have a query or a fragment",
        ),
        (
            W2C + "fields: {number1: '{phone}', F9CallASAP: '1'}",
            "6: postback 11: action: field 'F9CallASAP': names starting with F9 are Five9's own",
        ),
        (
            W2C + "fields: {number1: '{phone}', '<x>': '1'}",
            "10: postback 11: action.fields: '<x>' is not a Five9 contact field name"
            " (e.g. number1)",
        ),
        (
            W2C + "mode: fax",
            "11: postback 11: action.mode: must be web2campaign or soap, not 'fax'",
        ),
        (
            W2C + "timeout: 5m",
            "11: postback 11: action.timeout: Input should be less than or equal to 120",
        ),
        (W2C + "list: x", "11: postback 11: unknown key 'action.list'"),
    ],
)
def test_settings_errors_name_file_line_and_postback(
    tmp_path: Path, extra: str, message: str
) -> None:
    assert validation_errors(tmp_path, extra) == [f"offer-1.yaml:{message}"]


def test_list_name_is_required(tmp_path: Path) -> None:
    rule = (RULE % W2C).replace("      list_name: hot leads\n", "")
    assert load_issues(tmp_path / "rules.d", {"offer-1.yaml": rule}) == [
        "offer-1.yaml:6: postback 11: missing required key 'action.list_name'"
    ]


# --- end to end -------------------------------------------------------------------------------


async def test_webhook_to_rule_to_five9_both_modes(tmp_path: Path, fake: FakeFive9) -> None:
    rules = {
        "offer-1.yaml": f"""\
offer: 1
postbacks:
  - id: 11
    trigger: conversion_done
    affiliate: "*"
    action:
      type: five9_list
      base_url: {fake.url}
      domain: acme
      list_name: hot leads
      fields: {{number1: "{{phone}}", first_name: "{{first_name}}", comments: "{{extra.note}}"}}
  - id: 12
    trigger: conversion_done
    affiliate: "*"
    action:
      type: five9_list
      mode: soap
      base_url: {fake.url}
      username: api@acme
      password: ${{secret:five9_password}}
      list_name: hot leads
      fields: {{number1: "{{phone}}", first_name: "{{first_name}}", comments: "{{extra.note}}"}}
"""
    }
    daemon = await start_daemon(tmp_path, rules, environ=secret_env(SECRETS))
    try:
        with capture_logs() as logs:
            await daemon.post(
                conversion_id="E1",
                offer=1,
                affiliate=42,
                status="approved",
                phone="5551208111",
                first_name="Zoë",
                note='call after 5 <pm> & ask for "Zoë"',
            )

            async def both_ended() -> Any:
                rows = await daemon.deliveries()
                ended = [r for r in rows if r.state == DeliveryState.SUCCEEDED]
                return rows if len(ended) == 2 else None

            rows = await wait_for(both_ended)
        assert sorted(r.path_qs for r in fake.received) == [
            "/web2campaign/AddToList",
            "/wsadmin/v13/AdminWebService",
        ]
        (call,) = fake.soap_calls
        assert call.record["comments"] == 'call after 5 <pm> & ask for "Zoë"'
        assert fake.contacts[("5551208111",)]["comments"] == 'call after 5 <pm> & ask for "Zoë"'
        details = [await daemon.services.store.get_delivery(r.delivery_id) for r in rows]
        for detail in details:
            assert detail is not None
            (attempt,) = detail.attempts
            assert attempt.outcome == "succeeded"
        _assert_clean(repr(details), repr(logs))
    finally:
        await daemon.client.close()
