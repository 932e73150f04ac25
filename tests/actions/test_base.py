"""The settings checks every action shares (daemon/actions/base.py): a credential is exactly one
${secret:NAME}; a base URL is literal text without a query or a fragment."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from daemon.actions.base import (
    BaseUrlStr,
    LiteralUrlStr,
    SecretTemplateStr,
    is_secret_reference,
    origin,
)
from daemon.macros import Template
from daemon.urltemplate import UrlTemplate


class Model(BaseModel):
    secret: SecretTemplateStr | None = None
    base: BaseUrlStr | None = None
    literal: LiteralUrlStr | None = None


def error(**raw: str) -> str:
    with pytest.raises(ValidationError) as caught:
        Model.model_validate(raw)
    (only,) = caught.value.errors()
    return f"{only['loc'][0]}: {only['msg'].removeprefix('Value error, ')}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${secret:a}", True),
        ("${secret:a.b-c_d}", True),
        ("${secret:a}${secret:b}", False),
        ("${secret:a}${secret:a}", False),  # one name, twice: still not the reference alone
        (" ${secret:a}", False),
        ("${secret:a} ", False),
        ("$${secret:a}", False),
        ("Bearer ${secret:a}", False),
        ("${secret:a}{email}", False),
        ("{email}", False),
        ("token", False),
        ("", False),
    ],
)
def test_is_secret_reference(text: str, expected: bool) -> None:
    assert is_secret_reference(Template(text)) is expected
    if expected:
        assert Model.model_validate({"secret": text}).secret == Template(text)
    else:
        assert error(secret=text) == "secret: must be a ${secret:NAME} reference, not literal text"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://api.example.com/{offer}", "cannot hold macros or secrets"),
        ("https://api.example.com/${secret:a}", "cannot hold macros or secrets"),
        ("https://api.example.com/?{offer}", "cannot hold macros or secrets"),  # macros first
        ("https://api.example.com/?a=1", "cannot have a query or a fragment"),
        ("https://api.example.com/#a", "cannot have a query or a fragment"),
        ("https://api.example.com/v1/?", "cannot have a query or a fragment"),
    ],
)
def test_base_url_errors(url: str, message: str) -> None:
    assert error(base=url) == f"base: {message}"


def test_literal_url_may_keep_a_query_but_no_macro() -> None:
    model = Model.model_validate({"literal": "http://127.0.0.1:8/api/?a=1"})
    assert model.literal == UrlTemplate("http://127.0.0.1:8/api/?a=1")
    assert error(literal="http://127.0.0.1:8/{offer}") == "literal: cannot hold macros or secrets"


def test_valid_settings_dump_back_to_their_source() -> None:
    raw = {
        "secret": "${secret:a}",
        "base": "https://api.example.com/v2/",
        "literal": "http://[::1]:8080/x?y",
    }
    model = Model.model_validate(raw)
    assert model.model_dump() == raw
    assert Model.model_validate(model.model_dump()) == model


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://graph.facebook.com", "https://graph.facebook.com:443"),
        ("http://127.0.0.1:8080/api/", "http://127.0.0.1:8080"),
        ("HTTP://[::1]/x", "http://::1:80"),
    ],
)
def test_origin(url: str, expected: str) -> None:
    assert origin(UrlTemplate(url)) == expected
