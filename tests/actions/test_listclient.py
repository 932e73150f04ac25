"""The shared list client: settings every list action shares (one test per load error), wire
shapes (JSON, form, GET query; key in a header, the query or the body), MD5 hashing, the
success / already_there predicates, and the classification of provider answers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from daemon.actions import edelivery_unsubscribe, opt_intel
from daemon.actions.list_settings import Predicate
from daemon.actions.listclient import ListClient, normalise
from daemon.errors import PermanentError, RenderError
from daemon.loader import load_rules
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
    make_job,
    outcome,
    validate,
)

ADD: dict[str, Any] = {"/add": ("add", None)}
KEY = "k3y-0f-the-l1st"


def unsubscribe(fake: FakeListService, **settings: Any) -> edelivery_unsubscribe.Settings:
    base: dict[str, Any] = {
        "type": "edelivery_unsubscribe",
        "base_url": fake.url,
        "add_path": "/add",
        "list_id": "L1",
        "auth": {"header": {"name": "X-Api-Key", "value": "${secret:key}"}},
    }
    base.update(settings)
    return edelivery_unsubscribe.Settings.model_validate(base)


async def send_once(
    fake: FakeListService,
    job_values: dict[str, str] | None = None,
    *,
    raw: dict[str, str] | None = None,
    **settings: Any,
) -> tuple[str, str]:
    action_settings = unsubscribe(fake, **settings)
    async with action_resources({"key": KEY}, timeout=0.5) as res:
        return await outcome(ListClient(action_settings, res), make_job(job_values, raw=raw))


# --- wire shapes -------------------------------------------------------------------------------


async def test_form_body_with_the_key_in_the_body() -> None:
    shape = Shape(ADD, content="form", auth=("body", "api_key", KEY))
    async with serving(shape, "L1") as fake:
        result = await send_once(
            fake,
            {"email": "a+b@example.com", "phone": "555 0100"},
            content_type="form",
            auth={"body": {"name": "api_key", "value": "${secret:key}"}},
        )
        assert result == ("succeeded", "")
        (got,) = fake.received
        assert (got.method, got.path_qs) == ("POST", "/add")
        assert got.text == (f"list_id=L1&email=a%2Bb%40example.com&phone=555+0100&api_key={KEY}")
        assert action_headers(got) == {
            "Content-Type": "application/x-www-form-urlencoded",
            "Content-Length": str(len(got.body)),
        }
        assert fake.members("L1") == {("email", "a+b@example.com"), ("phone", "555 0100")}


async def test_get_puts_fields_and_key_in_the_query() -> None:
    shape = Shape(ADD, content="query", auth=("query", "key", KEY))
    async with serving(shape, "L1") as fake:
        result = await send_once(
            fake,
            {"email": "x@example.com"},
            method="GET",
            auth={"query": {"name": "key", "value": "${secret:key}"}},
        )
        assert result == ("succeeded", "")
        (got,) = fake.received
        assert got.method == "GET"
        assert got.path_qs == f"/add?key={KEY}&list_id=L1&email=x%40example.com"
        assert got.body == b""
        assert action_headers(got) == {}


async def test_query_key_joins_a_path_that_has_a_query() -> None:
    shape = Shape(ADD, auth=("query", "key", "a b&c"))
    async with serving(shape, "L1") as fake:
        action_settings = unsubscribe(
            fake, add_path="/add?v=2", auth={"query": {"name": "key", "value": "${secret:key}"}}
        )
        async with action_resources({"key": "a b&c"}) as res:
            result = await outcome(ListClient(action_settings, res), make_job({"email": "x@y.z"}))
        assert result == ("succeeded", "")
        assert fake.received[0].path_qs == "/add?v=2&key=a%20b%26c"


async def test_identifier_without_a_value_is_left_out_and_none_at_all_is_permanent() -> None:
    async with serving(Shape(ADD, auth=("header", "X-Api-Key", KEY)), "L1") as fake:
        assert await send_once(fake, {"phone": " 555 "}) == ("succeeded", "")
        assert json.loads(fake.received[0].body) == {"list_id": "L1", "phone": "555"}
        assert await send_once(fake, {"email": "  ", "phone": ""}) == ("dead", "no_identifier")
        assert len(fake.received) == 1  # nothing was sent for the empty contact


async def test_static_and_templated_fields_ride_along() -> None:
    async with serving(Shape(ADD, auth=("header", "X-Api-Key", KEY)), "L1") as fake:
        fields = {"email": "{email}", "source": 77, "sub": "{sub1}-{offer}"}
        assert await send_once(fake, {"email": "q@x.io", "sub1": "s1"}, fields=fields) == (
            "succeeded",
            "",
        )
        assert fake.received[0].text == (
            '{"list_id":"L1","email":"q@x.io","source":"77","sub":"s1-1"}'
        )


async def test_a_header_value_with_a_line_break_is_not_rendered() -> None:
    async with serving(Shape(ADD), "L1") as fake:
        action_settings = unsubscribe(fake, auth={"header": {"name": "X-Sub", "value": "{sub1}"}})
        async with action_resources() as res:
            action = ListClient(action_settings, res)
            with pytest.raises(RenderError):
                await action.send(make_job({"email": "a@b.c"}, raw={"sub1": "x\r\nInjected: 1"}))
        assert fake.received == []


@pytest.mark.parametrize(
    "settings", [{"content_type": "json"}, {"content_type": "form"}, {"hashing": "md5"}]
)
async def test_a_lone_surrogate_is_not_rendered(settings: dict[str, str]) -> None:
    async with serving(Shape(ADD), "L1") as fake:
        result = await send_once(fake, raw={"email": "a\ud800@b.io"}, **settings)
        assert result == ("dead", "render_failed")
        assert fake.received == []


# --- MD5 ----------------------------------------------------------------------------------------


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # noqa: S324 -- the format the list stores


@pytest.mark.parametrize(
    ("kind", "raw", "normalised"),
    [
        ("email", "  Jane.Doe@Example.COM ", "jane.doe@example.com"),
        ("email", "plain@x.io", "plain@x.io"),
        ("phone", "+1 (555) 010-0199", "15550100199"),
        ("phone", "555.010.0199 ext", "5550100199"),
        ("phone", "٥٥٥", ""),  # Arabic-Indic digits are not phone digits on the wire
        ("phone", "n/a", ""),
    ],
)
def test_md5_input_is_normalised(kind: str, raw: str, normalised: str) -> None:
    assert normalise(kind, raw) == normalised


async def test_md5_hashes_the_normalised_identifiers_and_nothing_else() -> None:
    async with serving(Shape(ADD, auth=("header", "X-Api-Key", KEY)), "L1") as fake:
        values = {"email": " Jane@Example.com", "phone": "+1 555-010-0199", "sub1": "Keep Me"}
        fields = {"email": "{email}", "phone": "{phone}", "note": "{sub1}"}
        result = await send_once(fake, values, hashing="md5", fields=fields)
        assert result == ("succeeded", "")
        assert json.loads(fake.received[0].body) == {
            "list_id": "L1",
            "email": md5("jane@example.com"),
            "phone": md5("15550100199"),
            "note": "Keep Me",
        }


async def test_md5_never_hashes_an_empty_value() -> None:
    async with serving(Shape(ADD, auth=("header", "X-Api-Key", KEY)), "L1") as fake:
        result = await send_once(fake, {"email": "x@y.io", "phone": "unknown"}, hashing="md5")
        assert result == ("succeeded", "")
        assert json.loads(fake.received[0].body) == {"list_id": "L1", "email": md5("x@y.io")}
        assert await send_once(fake, {"phone": "--"}, hashing="md5") == ("dead", "no_identifier")


# --- predicates ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("predicate", "status", "body", "expected"),
    [
        ({"field": "status", "equals": ["success", "ok"]}, 200, {"status": "ok"}, True),
        ({"field": "status", "equals": ["success", "ok"]}, 200, {"status": "OK"}, False),
        ({"field": "result", "equals": True}, 200, {"result": True}, True),
        ({"field": "result", "equals": True}, 200, {"result": 1}, False),
        ({"field": "result", "equals": True}, 200, {"result": "true"}, False),
        ({"field": "code", "equals": 0}, 200, {"code": 0.0}, True),
        ({"field": "code", "equals": 0}, 200, {"code": False}, False),
        ({"field": "data.result", "equals": "added"}, 200, {"data": {"result": "added"}}, True),
        ({"field": "errors.0.code", "equals": "E1"}, 200, {"errors": [{"code": "E1"}]}, True),
        ({"field": "errors.1.code", "equals": "E1"}, 200, {"errors": [{"code": "E1"}]}, False),
        ({"field": "error", "equals": [None]}, 200, {"error": None}, True),
        ({"field": "error", "equals": [None]}, 200, {}, False),
        ({"field": "status", "equals": "ok"}, 200, ["status"], False),
        ({"status": [409]}, 409, None, True),
        ({"status": 409, "field": "code", "equals": "DUP"}, 409, {"code": "DUP"}, True),
        ({"status": 409, "field": "code", "equals": "DUP"}, 400, {"code": "DUP"}, False),
    ],
)
def test_predicate(predicate: dict[str, Any], status: int, body: Any, expected: bool) -> None:
    assert Predicate.model_validate(predicate).matches(status, body) is expected


SUCCESS = {"field": "status", "equals": ["success", "ok"]}
THERE_BODY = {"field": "status", "equals": "duplicate"}


@pytest.mark.parametrize(
    ("reply", "settings", "expected"),
    [
        ((200, {"status": "ok"}), {"success": SUCCESS}, ("succeeded", "")),
        ((200, {"status": "failed"}), {"success": SUCCESS}, ("dead", "rejected")),
        ((200, "OK"), {"success": SUCCESS}, ("dead", "unexpected_body")),
        ((200, {"status": "ok"}), {"success": {"status": [201]}}, ("dead", "rejected")),
        ((201, {}), {"success": {"status": [201]}}, ("succeeded", "")),
        ((409, {"status": "error"}), {"already_there": {"status": 409}}, ("succeeded", "")),
        ((409, {"status": "error"}), {}, ("dead", "http_409")),
        (
            (200, {"status": "duplicate"}),
            {"success": SUCCESS, "already_there": THERE_BODY},
            ("succeeded", ""),
        ),
        # A retryable answer never means "already there", whatever its body says.
        ((503, {"status": "duplicate"}), {"already_there": THERE_BODY}, ("retry", "http_503")),
        ((500, {"status": "ok"}), {"success": SUCCESS}, ("retry", "http_500")),
        ((400, {"status": "ok"}), {"success": SUCCESS}, ("dead", "http_400")),
    ],
)
async def test_success_and_already_there(
    reply: Scripted, settings: dict[str, Any], expected: tuple[str, str]
) -> None:
    async with serving(Shape(ADD), "L1") as fake:
        fake.script.append(reply)
        assert await send_once(fake, {"email": "a@b.io"}, **settings) == expected


@pytest.mark.parametrize(("name", "reply", "want", "reason"), ANSWERS, ids=[a[0] for a in ANSWERS])
async def test_answers(name: str, reply: Scripted, want: str, reason: str) -> None:
    async with serving(Shape(ADD), "L1") as fake:
        fake.script.append(reply)
        assert await send_once(fake, {"email": "a@b.io"}) == (want, reason)
        assert len(fake.received) == 1


async def test_retry_after_is_passed_on() -> None:
    async with serving(Shape(ADD), "L1") as fake:
        fake.script.append(ANSWERS[9][1])
        action_settings = unsubscribe(fake)
        async with action_resources({"key": KEY}) as res:
            with pytest.raises(Exception) as caught:  # noqa: PT011 -- checked just below
                await ListClient(action_settings, res).send(make_job({"email": "a@b.io"}))
        assert getattr(caught.value, "retry_after", None) == 120.0


async def test_connection_refused_is_retried() -> None:
    async with serving(Shape(ADD), "L1") as fake:
        action_settings = unsubscribe(fake)
    # The fake is closed now: nothing listens on its port.
    async with action_resources({"key": KEY}) as res:
        result = await outcome(ListClient(action_settings, res), make_job({"email": "a@b.io"}))
    assert result == ("retry", "connect_failed")


async def test_preview_masks_the_key_and_lists_every_request() -> None:
    settings = opt_intel.Settings.model_validate(
        {
            "type": "opt_intel",
            "base_url": "https://lists.example.com/l/${secret:list_token}",
            "auth": {"query": {"name": "api_key", "value": "${secret:key}"}},
        }
    )
    async with action_resources() as res:
        action = ListClient(settings, res)
        job = make_job({"email": "e@x.io", "phone": "555"})
        previews = action.previews(job)
        assert [(p.method, p.url, p.body) for p in previews] == [
            (
                "POST",
                "https://lists.example.com/l/****/emails-add?api_key=****",
                '{"email":"e@x.io"}',
            ),
            ("POST", "https://lists.example.com/l/****/phones-add?api_key=****", '{"phone":"555"}'),
        ]
        assert action.preview(job) == previews[0]
        assert action.destination == "https://lists.example.com:443"
        with pytest.raises(PermanentError) as caught:
            action.preview(make_job())
        assert caught.value.reason == "no_identifier"


# --- settings every list action shares: one test per load error --------------------------------

BASE = """
type: edelivery_unsubscribe
base_url: https://lists.example.com/api
list_id: 9
"""
L = FIRST_SETTING_LINE  # the line of `type:`; BASE fills the next two
A = L - 1  # the line of `action:`, where checks across settings report


def at(line: int, message: str) -> list[str]:
    return [f"pb.yaml:{line}: postback 7: {message}"]


BASE_ERRORS = [
    ("auth: {}", L + 3, "action.auth: give exactly one of header, query or body"),
    (
        "auth:\n  header: {name: X-Key, value: a}\n  body: {name: key, value: a}",
        L + 3,
        "action.auth: give exactly one of header, query or body",
    ),
    (
        'auth: {header: {name: "X Key", value: a}}',
        L + 3,
        "action.auth: 'X Key' is not a valid header name",
    ),
    (
        "auth: {header: {name: Content-Type, value: a}}",
        L + 3,
        "action.auth: header 'Content-Type' is set by postbackd",
    ),
    (
        "auth: {query: {name: key}}",
        L + 3,
        "missing required key 'action.auth.query.value'",
    ),
    (
        "auth: {body: {name: key, value: '${secret:}'}}",
        L + 3,
        "action.auth.body.value: empty secret name in ${secret:}",
    ),
    ("success: {}", L + 3, "action.success: give status, field (with equals), or both"),
    (
        "success: {field: status}",
        L + 3,
        "action.success: field needs equals: the values that count",
    ),
    (
        "success: {equals: [ok]}",
        L + 3,
        "action.success: equals needs field: the JSON field of the answer to compare",
    ),
    (
        "success: {field: 'a..b', equals: [ok]}",
        L + 3,
        "action.success: field 'a..b' is not a path such as status or data.result",
    ),
    (
        "success: {field: status, equals: [[ok]]}",
        L + 3,
        "action.success.equals: equals holds strings, numbers, true, false or null",
    ),
    (
        "success: {status: [200, 302]}",
        A,
        "action: success.status: only 2xx answers can succeed; list 2xx codes",
    ),
    (
        "already_there: {status: 503}",
        A,
        "action: already_there.status: 503 is retried (408, 425, 429, 5xx);"
        " it cannot mean the list already holds the contact",
    ),
    (
        "already_there: {status: 99}",
        L + 3,
        "action.already_there.status: Input should be greater than or equal to 100",
    ),
    ("already_there: {colour: red}", L + 3, "unknown key 'action.already_there.colour'"),
    (
        "identifiers: {mail: email}",
        A,
        "action: identifiers: 'mail' is not a key of fields",
    ),
    (
        "identifiers: {}",
        A,
        "action: identifiers: name at least one field that carries email or phone",
    ),
    (
        "identifiers: {email: fax}",
        L + 3,
        "action.identifiers.email: must be email or phone, not 'fax'",
    ),
    (
        "fields: {mail: '{email}x'}",
        A,
        "action: no field is exactly {email} or {phone}: say which fields carry them"
        " in identifiers",
    ),
    (
        "fields: {email: '{emial}'}",
        L + 3,
        "action.fields.email: unknown macro {emial}; did you mean {email}?",
    ),
    (
        "fields: {'': '{email}'}",
        L + 3,
        "action.fields: a field name is a string of 1 to 100 characters",
    ),
    (
        "fields: {list_id: '{email}'}",
        A,
        "action: wire field 'list_id' is set twice (fields, list_id_field)",
    ),
    (
        "auth: {body: {name: email, value: k}}",
        A,
        "action: wire field 'email' is set twice (fields, auth.body)",
    ),
    ("add_path: contacts", A, "action: add_path must start with /"),
    (
        "add_path: '/c/{sub1'",
        A,
        "action: add_path: unbalanced { at column 4 (write {{ for a literal brace)",
    ),
    ("content_type: xml", L + 3, "action.content_type: must be json or form, not 'xml'"),
    ("hashing: sha1", L + 3, "action.hashing: must be plain or md5, not 'sha1'"),
    (
        "method: HEAD",
        L + 3,
        "action.method: must be POST, PUT, PATCH, DELETE or GET, not 'HEAD'",
    ),
    ("timeout: 10m", L + 3, "action.timeout: Input should be less than or equal to 120"),
    ("colour: red", L + 3, "unknown key 'action.colour'"),
]


@pytest.mark.parametrize(("extra", "line", "message"), BASE_ERRORS, ids=[e[2] for e in BASE_ERRORS])
def test_shared_settings_error(tmp_path: Path, extra: str, line: int, message: str) -> None:
    assert validate(tmp_path, BASE + extra) == at(line, message)


def test_base_url_with_a_query_takes_no_path(tmp_path: Path) -> None:
    action = """
        type: edelivery_unsubscribe
        base_url: https://lists.example.com/api?x=1
        list_id: 9
        add_path: /add
    """
    assert validate(tmp_path, action) == at(
        A, "action: base_url has a query or fragment: add_path cannot follow it"
    )


def test_base_url_must_be_http(tmp_path: Path) -> None:
    action = "type: edelivery_unsubscribe\nbase_url: ftp://lists.example.com/\nlist_id: 9"
    assert validate(tmp_path, action) == at(
        L + 1, "action.base_url: the URL's scheme must be http or https, not ftp"
    )


def test_base_url_host_is_not_a_macro(tmp_path: Path) -> None:
    action = "type: edelivery_unsubscribe\nbase_url: https://{sub1}/x\nlist_id: 9"
    assert validate(tmp_path, action) == at(
        L + 1, "action.base_url: a macro cannot set the URL's scheme, host or port"
    )


def test_a_valid_block_with_every_shared_setting_loads(tmp_path: Path) -> None:
    action = """
        type: edelivery_unsubscribe
        base_url: https://lists.example.com/api/${secret:list_token}
        method: PUT
        content_type: form
        auth: {header: {name: Authorization, value: "Bearer ${secret:key}"}}
        list_id: "{extra.list}"
        list_id_field: listId
        fields: {mail: "{email}", mobile: "{phone}", fname: "{first_name}"}
        identifiers: {mail: email, mobile: phone}
        hashing: md5
        success: {field: result, equals: [true]}
        already_there: {status: [409], field: code, equals: [DUPLICATE]}
        timeout: 30s
        operation: remove
        add_path: /contacts
        remove_path: /contacts/remove
    """
    assert validate(tmp_path, action) == []


DOCS = Path(__file__).resolve().parents[2] / "docs" / "actions"
PAGES = [
    "dnpl.md",
    "edelivery_contact_list.md",
    "edelivery_unsubscribe.md",
    "opt_intel.md",
    "opt_intel_unsubscribe.md",
]


@pytest.mark.parametrize("page", PAGES)
def test_the_example_rule_of_each_page_loads(tmp_path: Path, page: str) -> None:
    text = (DOCS / page).read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    rules = [b for b in blocks if b.startswith("offer:")]
    assert rules, f"{page} has no example rule"
    for index, block in enumerate(rules):
        folder = tmp_path / f"r{index}"
        folder.mkdir()
        (folder / "example.yaml").write_text(block)
        loaded = load_rules(folder, git=False)
        assert {lp.postback.action.type for lp in loaded.postbacks.values()} == {
            page.removesuffix(".md")
        }
