"""URL templates (SPEC 8): an http(s) URL template whose scheme, host and port are literal text,
rendered with each value percent-encoded for the part of the URL it lands in.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Annotated, Final
from urllib.parse import SplitResult, urlsplit

from daemon.errors import RenderError, TemplateError
from daemon.macros import (
    _LITERAL,
    _URL_ENCODERS,
    SecretLookup,
    Template,
    _init,
    _parse,
    _TemplateField,
)

_IN_PATH, _IN_QUERY, _IN_FRAGMENT = 0, 1, 2
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_HOST = re.compile(r"[\w.-]+|\[[0-9A-Fa-f:.]+\]")
# WHATWG parsers read `\` as `/`: `https://a\@b/` goes to host a, not b.
_NOT_IN_AUTHORITY = re.compile(r"[\\\s\x00-\x1f\x7f]")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_FIXED_PART = "a macro cannot set the URL's scheme, host or port"


class UrlTemplate(Template):
    """An http(s) URL template whose scheme, userinfo, host and port are literal text."""

    __slots__ = ("_fixed", "_host", "_netloc", "_port", "_scheme")
    _scheme: str
    _netloc: str
    _host: str
    _port: int
    # The literal `scheme://authority` and the `/`, `?` or `#` that ends it ("" when the URL
    # ends with its authority): a rendered URL that starts with it has the template's scheme,
    # host and port, so render_url proves it without parsing the rendered URL.
    _fixed: str

    def __init__(self, source: str) -> None:
        # The authority is checked before the macros, so `https://{x}/` says what is wrong.
        brace = source.find("{")
        head = source if brace == -1 else source[:brace]
        scheme, netloc, authority_end = _authority(head, has_refs=brace != -1)
        split = _check_authority(head[:authority_end], netloc)
        _init(self, source, _url_contexts(_parse(source), authority_end))
        port = split.port
        set_ = object.__setattr__
        set_(self, "_scheme", scheme)
        set_(self, "_netloc", netloc)
        set_(self, "_host", split.hostname or "")
        set_(self, "_port", port if port is not None else _DEFAULT_PORTS[scheme])
        set_(self, "_fixed", source[: authority_end + 1] if authority_end < len(head) else "")

    @property
    def scheme(self) -> str:
        """`http` or `https`, lower case."""
        return self._scheme

    @property
    def host(self) -> str:
        """The host name (lower case) or IP address, without IPv6 brackets."""
        return self._host

    @property
    def port(self) -> int:
        """The port, 80 or 443 when the URL does not say."""
        return self._port

    def render_url(self, values: Mapping[str, str], *, secret: SecretLookup | None = None) -> str:
        """The URL with each value percent-encoded for the part it lands in; RenderError if the
        result's scheme, host or port is not the template's (which encoding should prevent)."""
        url = self._render(values, _URL_ENCODERS, secret)
        fixed = self._fixed
        if fixed and url.startswith(fixed):
            # urlsplit would find this same scheme and netloc: the netloc is literal text that
            # ends at a literal delimiter and holds nothing urlsplit strips or rejects
            # (_check_authority).
            return url
        try:
            split = urlsplit(url)
        except ValueError as err:
            raise RenderError("the rendered URL does not parse") from err
        if split.scheme.lower() != self._scheme or split.netloc != self._netloc:
            raise RenderError("a value changed the URL's scheme, host or port")
        return url


def _authority(head: str, *, has_refs: bool) -> tuple[str, str, int]:
    """(scheme, netloc, index where the authority ends) of the literal head of a URL template;
    `has_refs` says whether a macro or secret follows the head."""
    scheme_match = _SCHEME.match(head)
    if scheme_match is None:
        if has_refs and re.fullmatch(r"[A-Za-z0-9+.-]*", head):
            raise TemplateError(_FIXED_PART)
        raise TemplateError("not an absolute URL: it must start with http:// or https://")
    scheme = scheme_match.group(1).lower()
    if scheme not in _DEFAULT_PORTS:
        raise TemplateError(f"the URL's scheme must be http or https, not {scheme}")
    if not head.startswith("//", scheme_match.end()):
        raise TemplateError(f"not an absolute URL: write {scheme}://host/...")
    start = scheme_match.end() + 2
    ends = [i for i in (head.find(c, start) for c in "/?#") if i != -1]
    if not ends and has_refs:
        raise TemplateError(_FIXED_PART)
    end = min(ends) if ends else len(head)
    return scheme, head[start:end], end


def _check_authority(prefix: str, netloc: str) -> SplitResult:
    hostport = netloc.rpartition("@")[2]
    host = hostport.partition("]")[0] + "]" if hostport.startswith("[") else hostport.split(":")[0]
    if _NOT_IN_AUTHORITY.search(netloc):
        raise TemplateError(
            f"the URL's authority {netloc!r} holds a backslash, space or control character"
        )
    if not _HOST.fullmatch(host):
        raise TemplateError(f"the URL's host {host!r} is not a host name or address")
    try:
        split = urlsplit(prefix)
        split.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError as err:
        raise TemplateError(f"the URL's authority {netloc!r} is not valid: {err}") from err
    return split


def _url_contexts(
    parts: list[tuple[int, str, int]], authority_end: int
) -> list[tuple[int, str, int]]:
    """Tag each macro and secret with the URL part it lands in (path, query or fragment)."""
    context = _IN_PATH
    out: list[tuple[int, str, int]] = []
    for index, (kind, text, _) in enumerate(parts):
        if kind == _LITERAL:
            for char in text[authority_end:] if index == 0 else text:
                if char == "#":
                    context = _IN_FRAGMENT
                elif char == "?" and context == _IN_PATH:
                    context = _IN_QUERY
        out.append((kind, text, context))
    return out


@functools.lru_cache(maxsize=1 << 16)
def parse_url_template(text: str) -> UrlTemplate:
    """Immutable: one text is parsed once and its object shared (see parse_template)."""
    return UrlTemplate(text)


UrlTemplateStr = Annotated[UrlTemplate, _TemplateField(parse_url_template)]
