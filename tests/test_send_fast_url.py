"""The fast parse of a rendered URL (outbound._parse_url with a cached check of its authority)
gives what the full parse gives, URL for URL and error for error."""

from __future__ import annotations

import pytest
from yarl import URL

from daemon.errors import PermanentError
from daemon.outbound import _checked_origin, _parse_url, _parse_url_in_full

URLS = [
    "http://127.0.0.1:8080/pb?k=generic:c1:1:1&cid=ck1&p=12.50",
    "https://Example.COM/a/b?x=%2F%3F%40&y=1#frag",
    "HTTPS://example.com:443/x",
    "http://example.com:80/x?y",
    "http://example.com:080/x",
    "http://user:pw@example.com/x?token=abc",
    "http://[::1]:8080/x",
    "http://[2606:2800::1]/p",
    "http://h/a/../b/./c",
    "http://h/p?",
    "http://h/p#",
    "http://h/p?#",
    "http://h/p?a#",
    "http://h/p#a?",
    "http://h?x=1",
    "http://h#f",
    "http://h",
    "http://h/",
    "http://h//double//slash",
    "http://h/%7e/x?a=%2f&b=%zz",
    "http://h:99999/x",
    "http://h:/x",
    "http://:80/x",
    "http:///x",
    "ftp://h/x",
    "mailto:someone@example.com",
    "a:b://h/x",
    "foo/bar://h/x",
    "http://h_x.example/x",
    "http://h!x.example/x",
    "http://xn--bcher-kva.example/x",
    "http://b\u00fccher.example/x",
    "http://h/with space",
    "http://h/caf\u00e9?q=\u00e9",
    "//h/x",
    "/x",
    "",
    "http://h:8080",
    "http://1.2.3.4.5/x",
    "http://0x7f.1/x",
    # where the fast match (outbound._RENDERED) could part from the full parse
    "http://h?x=1://a/b",
    "http://h#f://a/b",
    "http://h/p?a?b#c#d",
    "http://h/p#a?b",
    "http://h/p#a?#b",
    "http://h/a#b/c?",
    "1http://h/x",
    "ht-tp://h/x",
    "h+t.t-p://h/x",
    "://h/x",
    "http:/h/x",
    "http:h/x",
    "Http://H/X?Y#Z",
    "http://h:8080/p?q=%41%2f#%2F",
    # no `//` after the scheme, a `://` further on (the fast path before _RENDERED split these
    # at that `://` and sent another URL than the full parse makes)
    "http:80:///:///",
    "https:a:///_",
    "http:80://://a:",
    "https:443HTTPS#://%2F://u:p@+",
]


def outcome(text: str, parse: object) -> tuple[str, ...]:
    try:
        url = parse(text, "bad_url")  # type: ignore[operator]
    except PermanentError as err:
        return ("error", err.reason, err.detail)
    assert isinstance(url, URL)
    parts = (url.raw_host or "", str(url.port), url.raw_path, url.raw_query_string)
    return (
        "url",
        str(url),
        *parts,
        url.raw_fragment,
        url.raw_path_qs,
        url.scheme,
        str(url.origin()),
    )


@pytest.mark.parametrize("text", URLS)
def test_the_fast_parse_is_the_full_parse(text: str) -> None:
    expected = outcome(text, _parse_url_in_full)
    assert outcome(text, _parse_url) == expected
    assert outcome(text, _parse_url) == expected  # again, with the authority's check cached
    if expected[0] == "url":
        assert _parse_url(text, "bad_url") == _parse_url_in_full(text, "bad_url")


def test_the_cached_authority_check_refuses_what_the_full_parse_refuses() -> None:
    assert _checked_origin("ftp://h") is None
    assert _checked_origin("http://h:99999") is None
    assert _checked_origin("HTTP://Example.com:80") == ("http", "example.com:80")


@pytest.mark.parametrize(
    "text",
    [
        "https://good.example/{sub1}",
        "https://good.example?{sub1}",
        "https://good.example#{sub1}",
        "http://u:p$w@good.example:8080/a$b/{sub1}?x={sub1}",
        "http://[::1]:8080/{sub1}",
    ],
)
@pytest.mark.parametrize("value", ["a", "@evil.com", "//evil.com", "\t\r\n", "a b/c?d#e"])
def test_render_url_without_urlsplit_keeps_the_same_rule(text: str, value: str) -> None:
    from urllib.parse import urlsplit

    from daemon.urltemplate import parse_url_template

    template = parse_url_template(text)
    rendered = template.render_url({"sub1": value})
    split = urlsplit(rendered)
    assert (split.scheme, split.hostname) == (template.scheme, template.host)
    assert "evil" not in split.netloc


def test_a_literal_brace_in_the_authority_is_still_refused_at_render() -> None:
    # `}}` is a literal `}` once rendered: the netloc is not the template's, as before.
    from daemon.errors import RenderError
    from daemon.urltemplate import parse_url_template

    template = parse_url_template("http://a}}b@good.example/{sub1}")
    with pytest.raises(RenderError, match="scheme, host or port"):
        template.render_url({"sub1": "x"})
