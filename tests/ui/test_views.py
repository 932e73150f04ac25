"""The console's pure parts: labels, the action form derived from settings models."""

from __future__ import annotations

import pytest

from daemon.errors import InputError
from daemon.ui.action_form import field_specs, prefill, settings_from_form
from daemon.ui.base import safe_next
from daemon.ui.views import label


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("conversion_done", "Conversion Done"),
        ("conversion_pending", "Conversion Pending"),
        ("ping_url", "Ping Url"),
        ("facebook_conversion", "Facebook Conversion"),
        ("lms_post_lead", "LMS Post Lead"),
        ("in_flight", "In flight"),
        ("", "-"),
        (None, "-"),
    ],
)
def test_labels_are_the_products(value: str | None, shown: str) -> None:
    assert label(value) == shown


def test_the_ping_url_form_has_its_settings_required_first() -> None:
    specs = {s.name: s for s in field_specs("ping_url")}
    assert next(iter(specs)) == "url"
    assert specs["url"].required
    assert specs["method"].kind == "choice"
    assert specs["method"].options == ("GET", "POST")
    assert specs["headers"].kind == "json"
    assert specs["json"].kind == "json"  # the alias, as written in a rule file
    assert specs["idempotency_header"].kind == "bool"
    assert specs["idempotency_header"].default == "yes"


def test_the_form_becomes_an_action_mapping() -> None:
    values = {
        "a.url": " https://t.example/pb?cid={click_id} ",
        "a.method": "POST",
        "a.headers": '{"X-Key": "${affiliate_secret:key}"}',
        "a.idempotency_header": "no",
        "a.expect": "",
    }
    assert settings_from_form("ping_url", values) == {
        "type": "ping_url",
        "url": "https://t.example/pb?cid={click_id}",
        "method": "POST",
        "headers": {"X-Key": "${affiliate_secret:key}"},
        "idempotency_header": False,
    }
    again = prefill(field_specs("ping_url"), {"url": "u", "headers": {"a": "b"}, "method": "GET"})
    assert again == {"a.url": "u", "a.headers": '{\n  "a": "b"\n}', "a.method": "GET"}


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"a.headers": "{"}, "action.headers", "not JSON"),
        ({"a.method": "PUT"}, "action.method", "must be one of GET, POST"),
        ({"a.idempotency_header": "maybe"}, "action.idempotency_header", "must be yes or no"),
        ({"a.url": "https://t.example/?k=****"}, "action.url", "must be typed again"),
    ],
)
def test_unreadable_form_values_name_their_field(
    values: dict[str, str], field: str, message: str
) -> None:
    with pytest.raises(InputError) as caught:
        settings_from_form("ping_url", values)
    assert caught.value.field == field
    assert message in caught.value.message


def test_an_unknown_action_type_is_refused() -> None:
    with pytest.raises(InputError):
        field_specs("ftp_upload")


@pytest.mark.parametrize(
    ("target", "safe"),
    [
        ("/ui/offers/7?status=active", "/ui/offers/7?status=active"),
        ("https://evil.example/ui/", "/ui/"),
        ("//evil.example/ui/", "/ui/"),
        ("/ui/\\\\evil.example", "/ui/"),
        ("/api/v1/reload", "/ui/"),
        ("/ui/\x07", "/ui/"),
        ("javascript:alert(1)", "/ui/"),
    ],
)
def test_sign_in_returns_only_to_console_paths(target: str, safe: str) -> None:
    assert safe_next(target) == safe
