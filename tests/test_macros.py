"""Macro templates: parse errors, rendering per destination, URL safety, pydantic fields."""

from __future__ import annotations

import json
import pickle
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from daemon.errors import RenderError, TemplateError
from daemon.macros import (
    FIXED_MACROS,
    JsonTemplate,
    Template,
    TemplateStr,
    encode_header,
    encode_json_string,
    encode_url_component,
    encode_xml,
    encoded_forms,
    json_template_source,
    parse_json_templates,
    parse_template,
    render_form,
    render_json,
)
from daemon.models import CANONICAL_FIELDS, CONTEXT_FIELDS
from daemon.urltemplate import UrlTemplate, UrlTemplateStr, parse_url_template

HOSTILE = "a&b=c/d?e#f g+h%20;i\r\nj@k:l é😀"


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{payot}", "unknown macro {payot}; did you mean {payout}?"),
        ("x={clickid}", "unknown macro {clickid}; did you mean {click_id}?"),
        ("{Email}", "unknown macro {Email}; did you mean {email}?"),
        ("{extra_foo}", "unknown macro {extra_foo}; did you mean {extra.foo}?"),
        ("{zzzz}", "unknown macro {zzzz} (write {{ and }} for literal braces)"),
        ('{"a": 1}', 'unknown macro {"a": 1} (write {{ and }} for literal braces)'),
        ("{extra}", "macro {extra} needs a parameter name: write {extra.NAME}"),
        (
            "{extra.a b}",
            "bad macro {extra.a b}: an extra parameter name uses letters, digits, _ . -",
        ),
        ("{", "unbalanced { at column 1 (write {{ for a literal brace)"),
        ("ab{payout", "unbalanced { at column 3 (write {{ for a literal brace)"),
        ("a{b{payout}", "unbalanced { at column 2 (write {{ for a literal brace)"),
        ("}", "unbalanced } at column 1 (write }} for a literal brace)"),
        ("{payout}}", "unbalanced } at column 9 (write }} for a literal brace)"),
        ("{{payout}", "unbalanced } at column 9 (write }} for a literal brace)"),
        ("x{}", "empty {} at column 2 (write {{}} for literal braces)"),
        ("${secret:}", "empty secret name in ${secret:}"),
        (
            "${secret:../x}",
            "bad secret name '../x' in ${secret:../x}: use letters, digits, _ . - (and never ..)",
        ),
        (
            "${secret:..}",
            "bad secret name '..' in ${secret:..}: use letters, digits, _ . - (and never ..)",
        ),
        (
            "${secret:a b}",
            "bad secret name 'a b' in ${secret:a b}: use letters, digits, _ . - (and never ..)",
        ),
        ("${secret:abc", "unbalanced ${ at column 1 (write {{ for a literal brace)"),
        (
            "${payout}",
            "${payout} is not a secret reference: ${secret:NAME} is the only ${ form"
            " (write {name} for a macro)",
        ),
    ],
)
def test_parse_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(TemplateError) as caught:
        parse_template(text)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


FIXED = "a macro cannot set the URL's scheme, host or port"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{sub1}://example.com/", FIXED),
        ("ht{sub1}://example.com/", FIXED),
        ("https://{sub1}/x", FIXED),
        ("https://{sub1}.example.com/x", FIXED),
        ("https://example.{sub1}/x", FIXED),
        ("https://example.com{sub1}", FIXED),
        ("https://example.com:{sub1}/x", FIXED),
        ("https://{sub1}@example.com/x", FIXED),
        ("https://user:${secret:pw}@example.com/x", FIXED),
        ("https://{unknownmacro}/", FIXED),
        ("{url}", FIXED),
        ("ftp://example.com/{sub1}", "the URL's scheme must be http or https, not ftp"),
        ("javascript:alert(1)", "the URL's scheme must be http or https, not javascript"),
        ("example.com/{sub1}", "not an absolute URL: it must start with http:// or https://"),
        ("https:/example.com/{sub1}", "not an absolute URL: write https://host/..."),
        ("https:///x", "the URL's host '' is not a host name or address"),
        (
            "https://a\\@example.com/",
            "the URL's authority 'a\\\\@example.com' holds a backslash, space or control character",
        ),
        (
            "https://exa mple.com/",
            "the URL's authority 'exa mple.com' holds a backslash, space or control character",
        ),
        (
            "https://example.com:99999/",
            "the URL's authority 'example.com:99999' is not valid: Port out of range 0-65535",
        ),
        ("https://example.com/{payot}", "unknown macro {payot}; did you mean {payout}?"),
    ],
)
def test_url_template_errors(text: str, message: str) -> None:
    with pytest.raises(TemplateError) as caught:
        parse_url_template(text)
    assert str(caught.value) == message


def test_every_fixed_macro_and_extra_names_parse() -> None:
    expected = {*CANONICAL_FIELDS, *CONTEXT_FIELDS, "postback_id", "offer", "trigger"}
    expected |= {"transition", "previous_status", "timestamp", "rand", "delivery_id"}
    expected |= {"idempotency_key"}
    assert expected == FIXED_MACROS
    text = "".join(f"{{{name}}}" for name in sorted(FIXED_MACROS)) + "{extra.A-b_c.9}"
    template = parse_template(text)
    assert template.macros == FIXED_MACROS | {"extra.A-b_c.9"}
    assert template.secrets == frozenset()


def test_macros_and_secrets_are_collected() -> None:
    template = parse_template("k=${secret:api.key-1}&c={click_id}&c2={click_id}&t=${secret:T}")
    assert template.macros == {"click_id"}
    assert template.secrets == {"api.key-1", "T"}


def test_dollar_signs_that_are_not_secrets_are_literal() -> None:
    template = parse_template("$5 costs ${{not}} $ {payout}$")
    assert template.render({"payout": "9"}) == "$5 costs ${not} $ 9$"


def test_template_is_immutable_hashable_and_picklable() -> None:
    a, b = parse_template("x{payout}"), parse_template("x{payout}")
    assert a == b
    assert hash(a) == hash(b)
    assert a != parse_template("y{payout}")
    assert a != parse_url_template("https://e.com/x{payout}")
    assert str(a) == "x{payout}"
    assert a.source == "x{payout}"
    with pytest.raises(AttributeError):
        a.source = "other"  # type: ignore[misc]
    url = parse_url_template("https://e.com/{sub1}")
    copied = pickle.loads(pickle.dumps(url))  # noqa: S301 (our own object)
    assert copied == url
    assert isinstance(copied, UrlTemplate)
    assert copied.render_url({"sub1": "a/b"}) == "https://e.com/a%2Fb"


# --- plain rendering ------------------------------------------------------------------------


def test_literal_braces_and_missing_values() -> None:
    template = parse_template('{{"cid": "{click_id}", "g": "{goal}"}}')
    assert template.render({"click_id": "c1"}) == '{"cid": "c1", "g": ""}'


def test_encode_applies_to_values_only_never_to_literal_text() -> None:
    template = parse_template("<a href='x'>{first_name}</a>")
    assert template.render({"first_name": "<b>"}, encode=encode_xml) == "<a href='x'>&lt;b&gt;</a>"


def test_secrets_render_through_the_lookup_and_encoder() -> None:
    template = parse_template("Bearer ${secret:tok}")
    assert template.render({}, secret={"tok": "a<b"}.__getitem__, encode=encode_xml) == (
        "Bearer a&lt;b"
    )


def test_explain_mode_masks_secrets_everywhere() -> None:
    assert parse_template("Bearer ${secret:tok}").render({}) == "Bearer ****"
    url = parse_url_template("https://e.com/${secret:a}?k=${secret:b}#${secret:c}")
    assert url.render_url({}) == "https://e.com/****?k=****#****"
    assert render_form({"k": parse_template("${secret:tok}")}, {}) == "k=****"


# --- URLs ----------------------------------------------------------------------------------


def test_url_properties() -> None:
    assert parse_url_template("https://Example.COM/x?a={sub1}").host == "example.com"
    plain = parse_url_template("http://e.com")
    assert (plain.scheme, plain.host, plain.port) == ("http", "e.com", 80)
    assert parse_url_template("HTTPS://e.com?x").port == 443
    v6 = parse_url_template("https://[::1]:8443/{sub1}")
    assert (v6.scheme, v6.host, v6.port) == ("https", "::1", 8443)
    assert parse_url_template("https://u:p@e.com:81/").port == 81


def test_hostile_value_is_one_query_value_and_one_path_segment() -> None:
    url = parse_url_template("https://t.example.com/pb/{sub1}/x?cid={click_id}&n=1#{sub2}")
    values = {"sub1": HOSTILE, "click_id": HOSTILE, "sub2": HOSTILE}
    rendered = url.render_url(values)
    split = urlsplit(rendered)
    assert (split.scheme, split.netloc) == ("https", "t.example.com")
    segments = split.path.split("/")
    assert segments[:2] == ["", "pb"]
    assert segments[3:] == ["x"]
    assert unquote(segments[2]) == HOSTILE
    assert parse_qsl(split.query, keep_blank_values=True) == [("cid", HOSTILE), ("n", "1")]
    assert unquote(split.fragment) == HOSTILE
    assert "\r" not in rendered
    assert "\n" not in rendered
    assert " " not in rendered


def test_url_encoding_is_exact() -> None:
    url = parse_url_template("https://e.com/{sub1}?q={sub2}#{sub3}")
    value = "a&b=c/d?e#f g+%é:@!*"
    assert url.render_url({"sub1": value, "sub2": value, "sub3": value}) == (
        "https://e.com/a%26b%3Dc%2Fd%3Fe%23f%20g%2B%25%C3%A9:@!*"
        "?q=a%26b%3Dc%2Fd%3Fe%23f%20g%2B%25%C3%A9%3A%40!*"
        "#a%26b%3Dc/d?e%23f%20g%2B%25%C3%A9:@!*"
    )
    assert encode_url_component(value) == "a%26b%3Dc%2Fd%3Fe%23f%20g%2B%25%C3%A9%3A%40!*"


@pytest.mark.parametrize(
    "value", ["@evil.com", "//evil.com", ":1234", "evil.com", "\\evil.com", "@evil.com:1/x"]
)
@pytest.mark.parametrize(
    "text",
    [
        "https://good.example/{sub1}",
        "https://good.example/?{sub1}",
        "https://good.example/?x={sub1}",
        "https://good.example#{sub1}",
        "https://good.example?{sub1}",
        "https://good.example/{sub1}{sub1}",
    ],
)
def test_values_never_move_the_host(text: str, value: str) -> None:
    rendered = parse_url_template(text).render_url({"sub1": value})
    split = urlsplit(rendered)
    assert (split.scheme, split.hostname, split.port) == ("https", "good.example", None)
    assert "evil.com" not in split.netloc


def test_lone_surrogate_cannot_be_rendered_into_a_url() -> None:
    url = parse_url_template("https://e.com/?x={sub1}")
    with pytest.raises(RenderError) as caught:
        url.render_url({"sub1": "a\ud800"})
    assert caught.value.detail == "{sub1}: value is not valid Unicode text (lone surrogate)"


_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
_URLS = [
    "https://good.example/p/{sub1}/{sub2}?a={sub1}&b={sub2}&c={sub3}",
    "http://good.example:8080/?a={sub1}&b=x{sub2}y&c={sub3}",
    "https://u:pw@good.example/{sub1}{sub2}?a={sub1}&b={sub2}&c={sub3}#{sub3}",
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_URLS), _TEXT, _TEXT, _TEXT)
def test_any_values_keep_scheme_host_port_and_round_trip(
    text: str, sub1: str, sub2: str, sub3: str
) -> None:
    template = parse_url_template(text)
    split = urlsplit(template.render_url({"sub1": sub1, "sub2": sub2, "sub3": sub3}))
    assert split.scheme == template.scheme
    assert split.hostname == template.host
    assert (split.port or {"http": 80, "https": 443}[split.scheme]) == template.port
    query = parse_qs(split.query, keep_blank_values=True, strict_parsing=False)
    b_prefix, b_suffix = ("x", "y") if "x{sub2}y" in text else ("", "")
    assert query["a"] == [sub1]
    assert query["b"] == [b_prefix + sub2 + b_suffix]
    assert query["c"] == [sub3]
    assert set(query) == {"a", "b", "c"}
    if text.startswith("https://good.example/p/"):
        assert [unquote(s) for s in split.path.split("/")] == ["", "p", sub1, sub2]


# --- other destinations --------------------------------------------------------------------


def test_form_body_encodes_each_rendered_field() -> None:
    fields = {"cid": parse_template("c-{click_id}"), "note": parse_template("{sub1} & more")}
    body = render_form(fields, {"click_id": "a b&c=d", "sub1": "é+%"})
    assert body == "cid=c-a+b%26c%3Dd&note=%C3%A9%2B%25+%26+more"
    assert parse_qsl(body) == [("cid", "c-a b&c=d"), ("note", "é+% & more")]


def test_json_structure_renders_strings_and_keeps_the_rest() -> None:
    body = parse_json_templates(
        {"event": "{trigger}", "n": 5, "ok": True, "none": None, "{k}": ["{sub1}", {"x": "y"}]}
    )
    assert isinstance(body["event"], Template)
    rendered = render_json(body, {"trigger": "conversion_done", "sub1": 'q"\\\n</'})
    assert json.dumps(rendered) == (
        '{"event": "conversion_done", "n": 5, "ok": true, "none": null,'
        ' "{k}": ["q\\"\\\\\\n</", {"x": "y"}]}'
    )
    assert json_template_source(body) == {
        "event": "{trigger}", "n": 5, "ok": True, "none": None, "{k}": ["{sub1}", {"x": "y"}]
    }  # fmt: skip


def test_json_template_error_names_the_path() -> None:
    with pytest.raises(TemplateError) as caught:
        parse_json_templates({"user": {"emails": ["{email}", "{emial}"]}})
    assert str(caught.value) == "at $.user.emails[1]: unknown macro {emial}; did you mean {email}?"
    with pytest.raises(TemplateError) as caught:
        parse_json_templates({"a b": ["{"]})
    assert (
        str(caught.value)
        == 'at $["a b"][0]: unbalanced { at column 1 (write {{ for a literal brace)'
    )


def test_json_nesting_is_bounded() -> None:
    deep: object = "x"
    for _ in range(40):
        deep = [deep]
    with pytest.raises(TemplateError) as caught:
        parse_json_templates(deep)
    assert str(caught.value).endswith(": nested deeper than 32 levels")


def test_json_string_encoding() -> None:
    assert encode_json_string('a"b\\c\nd\u2028é') == 'a\\"b\\\\c\\nd\u2028é'
    assert json.loads('"' + encode_json_string(HOSTILE) + '"') == HOSTILE


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\r\nBcc: x@y", "a\x00b", "a\u2028b", "a\x85b"])
def test_header_values_with_line_breaks_are_refused(bad: str) -> None:
    template = parse_template("Hello {first_name}")
    with pytest.raises(RenderError) as caught:
        template.render({"first_name": bad}, encode=encode_header)
    assert caught.value.detail == (
        "{first_name}: a header value carries CR, LF, NUL or another line break"
    )
    assert bad not in str(caught.value)
    assert encode_header("plain: value\t ok") == "plain: value\t ok"


def test_header_secret_with_newline_is_refused_without_showing_it() -> None:
    with pytest.raises(RenderError) as caught:
        parse_template("Bearer ${secret:tok}").render(
            {}, encode=encode_header, secret=lambda _: "s3cr3t\nX: y"
        )
    assert "s3cr3t" not in str(caught.value)
    assert caught.value.detail.startswith("${secret:tok}: ")


def test_xml_escaping() -> None:
    assert encode_xml("""<a href="x" b='y'>&amp;</a>""") == (
        "&lt;a href=&quot;x&quot; b=&apos;y&apos;&gt;&amp;amp;&lt;/a&gt;"
    )
    with pytest.raises(RenderError):
        encode_xml("bell\x07")


# --- pydantic ------------------------------------------------------------------------------


class _Settings(BaseModel):
    url: UrlTemplateStr
    subject: TemplateStr
    headers: dict[str, TemplateStr] = {}
    body: JsonTemplate = None


def test_pydantic_fields_validate_and_dump_back_to_source() -> None:
    raw = {
        "url": "https://e.com/pb?cid={click_id}",
        "subject": "Lead {first_name} {{x}}",
        "headers": {"Authorization": "Bearer ${secret:tok}"},
        "body": {"a": ["{sub1}", 3]},
    }
    model = _Settings.model_validate(raw)
    assert isinstance(model.url, UrlTemplate)
    assert model.url.host == "e.com"
    assert isinstance(model.subject, Template)
    assert model.headers["Authorization"].secrets == {"tok"}
    assert isinstance(model.body["a"][0], Template)
    assert model.model_dump() == raw
    assert json.loads(model.model_dump_json()) == raw
    assert _Settings.model_validate_json(json.dumps(raw)) == model
    assert _Settings.model_validate(model.model_dump()) == model
    schema = _Settings.model_json_schema()["properties"]
    assert schema["url"]["type"] == "string"
    assert schema["subject"]["type"] == "string"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("subject", "{payot}", "unknown macro {payot}; did you mean {payout}?"),
        ("url", "https://{sub1}/", "a macro cannot set the URL's scheme, host or port"),
        ("url", "ftp://e.com/", "the URL's scheme must be http or https, not ftp"),
        ("body", {"x": ["{"]}, "at $.x[0]: unbalanced { at column 1"),
    ],
)
def test_pydantic_rejects_bad_templates_with_the_message(
    field: str, value: object, message: str
) -> None:
    raw: dict[str, object] = {"url": "https://e.com/", "subject": "s", field: value}
    with pytest.raises(ValidationError) as caught:
        _Settings.model_validate(raw)
    errors = caught.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == (field,)
    assert message in errors[0]["msg"]


def test_pydantic_rechecks_a_plain_template_given_as_a_url() -> None:
    with pytest.raises(ValidationError, match="not an absolute URL"):
        _Settings(url=parse_template("/relative/{sub1}"), subject=parse_template("s"))  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="Input should be a valid string"):
        _Settings.model_validate({"url": "https://e.com/", "subject": 5})


_SECRET = "p@ss w/rd+&=<\"'>!*:?#é"


def test_encoded_forms_cover_every_place_a_secret_lands() -> None:
    lookup = {"tok": _SECRET}.__getitem__
    url = parse_url_template("https://e.com/a/${secret:tok}/b?k=${secret:tok}#${secret:tok}")
    body = parse_json_templates({"k": "x${secret:tok}y"})
    outputs = [
        url.render_url({}, secret=lookup),
        render_form({"k": parse_template("x${secret:tok}y")}, {}, secret=lookup),
        json.dumps(render_json(body, {}, secret=lookup), ensure_ascii=False),
        parse_template("<k>${secret:tok}</k>").render({}, encode=encode_xml, secret=lookup),
        parse_template('"${secret:tok}"').render({}, encode=encode_json_string, secret=lookup),
    ]
    forms = sorted(encoded_forms(_SECRET), key=len, reverse=True)
    for output in outputs:
        redacted = output
        for form in forms:
            redacted = redacted.replace(form, "****")
        assert "****" in redacted
        assert "ss w" not in redacted
        assert "ss%20w" not in redacted
        assert "ss+w" not in redacted
    assert encoded_forms("a\ud800") >= {"a\ud800"}  # refused encoders are skipped, no error


def test_encoded_forms_cover_an_html_echo() -> None:
    import html as html_lib

    value = "p'a\"s&s<w>"
    for echoed in (html_lib.escape(value), html_lib.escape(value).replace("&#x27;", "&#39;")):
        assert echoed in encoded_forms(value)
