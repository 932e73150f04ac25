"""Macro templates (SPEC 8): parsing `{name}` and `${secret:NAME}` at load, rendering per attempt.

A template is parsed once, when the rules load, into literal text, macro references and secret
references; every error an ops person can make is reported then. Rendering passes each value
through an encoder chosen for where it lands (URL part, form, JSON, XML, mail header); URL
templates, which also prove that no value moved the scheme, host or port, are in
daemon/urltemplate.py.
"""

from __future__ import annotations

import difflib
import functools
import html
import json
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final
from urllib.parse import quote, urlencode

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

from daemon.errors import RenderError, TemplateError
from daemon.models import CANONICAL_FIELDS, CONTEXT_FIELDS
from daemon.secrets import valid_secret_name

_PER_DELIVERY = ("postback_id", "timestamp", "rand", "delivery_id", "idempotency_key")
_CONTEXT = ("offer", "trigger", "transition", "previous_status")
FIXED_MACROS: frozenset[str] = frozenset(
    (*CANONICAL_FIELDS, *CONTEXT_FIELDS, *_CONTEXT, *_PER_DELIVERY)
)
EXTRA_MACRO = re.compile(r"extra\.[A-Za-z0-9_.-]+")
MASK = "****"  # what a secret renders as when no resolver is given (explain, listings)

_LITERAL, _MACRO, _SECRET = 0, 1, 2
_SPECIAL = re.compile(r"[{}$]")
Encoder = Callable[[str], str]
SecretLookup = Callable[[str], str]


def identity(value: str) -> str:
    return value


class Template:
    """An immutable parsed template; `Template(text)` is the same as `parse_template(text)`."""

    __slots__ = ("_parts", "macros", "secrets", "source")
    source: str
    macros: frozenset[str]
    secrets: frozenset[str]
    # (kind, text, context): context picks the encoder in subclasses that have several.
    _parts: tuple[tuple[int, str, int], ...]

    def __init__(self, source: str) -> None:
        parts = _parse(source)
        _init(self, source, parts)

    def render(
        self,
        values: Mapping[str, str],
        *,
        encode: Encoder = identity,
        secret: SecretLookup | None = None,
    ) -> str:
        """Literal text as is, each macro value and secret through `encode`; secrets as ****
        when `secret` is None. A missing macro value renders as ""."""
        return self._render(values, (encode,), secret)

    def _render(
        self, values: Mapping[str, str], encoders: tuple[Encoder, ...], secret: SecretLookup | None
    ) -> str:
        out: list[str] = []
        for kind, text, context in self._parts:
            if kind == _LITERAL:
                out.append(text)
            elif kind == _MACRO:
                try:  # the label is made only for an error (_encode's, written inline)
                    out.append(encoders[context](values.get(text, "")))
                except RenderError as err:
                    raise RenderError(f"{{{text}}}: {err.detail}") from err
            elif secret is None:
                out.append(MASK)  # never encoded: `****` must read as a mask wherever it lands
            else:
                out.append(_encode(encoders[context], secret(text), f"${{secret:{text}}}"))
        return "".join(out)

    def __str__(self) -> str:
        return self.source

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Template):
            return NotImplemented
        return type(self) is type(other) and self.source == other.source

    def __hash__(self) -> int:
        return hash(self.source)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self) -> tuple[type[Template], tuple[str]]:
        return (type(self), (self.source,))


def _init(template: Template, source: str, parts: list[tuple[int, str, int]]) -> None:
    set_ = object.__setattr__
    set_(template, "source", source)
    set_(template, "_parts", tuple(parts))
    set_(template, "macros", frozenset(t for k, t, _ in parts if k == _MACRO))
    set_(template, "secrets", frozenset(t for k, t, _ in parts if k == _SECRET))


def _encode(encode: Encoder, value: str, label: str) -> str:
    try:
        return encode(value)
    except RenderError as err:
        raise RenderError(f"{label}: {err.detail}") from err


@functools.lru_cache(maxsize=1 << 16)
def parse_template(text: str) -> Template:
    """Parse `text`; TemplateError names the first problem and its column. Templates are
    immutable: one text is parsed once and its object shared (a big rule set repeats them)."""
    return Template(text)


def _parse(text: str) -> list[tuple[int, str, int]]:
    parts: list[tuple[int, str, int]] = []
    literal: list[str] = []
    i = 0
    while True:
        found = _SPECIAL.search(text, i)
        if found is None:
            literal.append(text[i:])
            break
        j = found.start()
        literal.append(text[i:j])
        char = text[j]
        if text.startswith(("{{", "}}"), j):
            literal.append(char)
            i = j + 2
            continue
        if char == "$" and (not text.startswith("${", j) or text.startswith("${{", j)):
            literal.append(char)  # a `$` that does not open `${secret:...}` is plain text
            i = j + 1
            continue
        if char == "}":
            raise TemplateError(f"unbalanced }} at column {j + 1} (write }}}} for a literal brace)")
        kind, name, i = _reference(text, j)
        if literal:
            parts.append((_LITERAL, "".join(literal), 0))
            literal = []
        parts.append((kind, name, 0))
    if "".join(literal):
        parts.append((_LITERAL, "".join(literal), 0))
    return parts


def _reference(text: str, start: int) -> tuple[int, str, int]:
    """The `{name}` or `${secret:NAME}` at `start`: (kind, name, index after it)."""
    is_secret = text[start] == "$"
    opening = start + 1 if is_secret else start
    end = text.find("}", opening + 1)
    nested = text.find("{", opening + 1)
    if end == -1 or -1 < nested < end:
        what = "${" if is_secret else "{"
        raise TemplateError(
            f"unbalanced {what} at column {start + 1} (write {{{{ for a literal brace)"
        )
    body = text[opening + 1 : end]
    if is_secret:
        return _SECRET, _secret_name(body), end + 1
    if not body:
        raise TemplateError(f"empty {{}} at column {start + 1} (write {{{{}}}} for literal braces)")
    _check_macro(body)
    return _MACRO, body, end + 1


def _secret_name(body: str) -> str:
    if not body.startswith("secret:"):
        raise TemplateError(
            f"${{{body}}} is not a secret reference: ${{secret:NAME}} is the only ${{ form"
            f" (write {{name}} for a macro)"
        )
    name = body.removeprefix("secret:")
    if not name:
        raise TemplateError("empty secret name in ${secret:}")
    if not valid_secret_name(name):
        raise TemplateError(
            f"bad secret name {name!r} in ${{secret:{name}}}:"
            " use letters, digits, _ . - (and never ..)"
        )
    return name


def _check_macro(name: str) -> None:
    if name in FIXED_MACROS or EXTRA_MACRO.fullmatch(name):
        return
    if name in ("extra", "extra."):
        raise TemplateError(f"macro {{{name}}} needs a parameter name: write {{extra.NAME}}")
    if name.startswith("extra."):
        raise TemplateError(
            f"bad macro {{{name}}}: an extra parameter name uses letters, digits, _ . -"
        )
    suggestion = _closest(name)
    if suggestion:
        raise TemplateError(f"unknown macro {{{name}}}; did you mean {{{suggestion}}}?")
    raise TemplateError(f"unknown macro {{{name}}} (write {{{{ and }}}} for literal braces)")


def _closest(name: str) -> str | None:
    if name.lower() in FIXED_MACROS:
        return name.lower()
    for prefix in ("extra_", "extra:", "extra[", "extra/"):
        if name.startswith(prefix) and EXTRA_MACRO.fullmatch("extra." + name[len(prefix) :]):
            return "extra." + name[len(prefix) :]
    matches = difflib.get_close_matches(name.lower(), sorted(FIXED_MACROS), n=1, cutoff=0.6)
    return matches[0] if matches else None


# --- URLs ---------------------------------------------------------------------------------

# Encoding sets for a value by where it lands. Query values follow JavaScript's
# encodeURIComponent, the form every tracker decodes; a path segment also keeps `:` and `@`
# (RFC 3986 pchar) and a fragment `/` and `?`. None keeps `/ ? # & = + ; %` or a space.
PATH_SEGMENT_SAFE: Final = "!'()*:@"
QUERY_SAFE: Final = "!'()*"
FRAGMENT_SAFE: Final = "!'()*:@/?"


_ALWAYS_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


def _quoter(safe: str) -> Encoder:
    # An ASCII value (nearly every one) is encoded by one str.translate with the table quote()
    # applies byte by byte; any other goes through quote() itself (UTF-8, then per byte).
    kept = _ALWAYS_SAFE | frozenset(safe)
    # Indexed by code point (a list is read faster than a dict by translate).
    table = [chr(c) if chr(c) in kept else f"%{c:02X}" for c in range(128)]

    def encode(value: str) -> str:
        if value.isascii():
            return value.translate(table)
        try:
            return quote(value, safe=safe)
        except UnicodeEncodeError as err:
            raise RenderError("value is not valid Unicode text (lone surrogate)") from err

    return encode


encode_url_component: Encoder = _quoter(QUERY_SAFE)
_URL_ENCODERS = (_quoter(PATH_SEGMENT_SAFE), encode_url_component, _quoter(FRAGMENT_SAFE))


# --- Other places a value can land --------------------------------------------------------

# Everything str.splitlines() breaks on: the email package splits headers the same way.
_LINE_BREAKS = re.compile("[\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_XML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"})


def encode_header(value: str) -> str:
    """A header value (HTTP or email) as is; RenderError if it carries CR, LF, NUL or another
    line break that could start a new header."""
    if _LINE_BREAKS.search(value):
        raise RenderError("a header value carries CR, LF, NUL or another line break")
    return value


def encode_xml(value: str) -> str:
    """Text or attribute content for XML 1.0; RenderError for characters XML cannot carry."""
    if _XML_INVALID.search(value):
        raise RenderError("value carries characters that XML 1.0 cannot represent")
    return value.translate(_XML_ESCAPES)


def encode_json_string(value: str) -> str:
    """The inside of a JSON string literal, without its quotes."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def render_form(
    fields: Mapping[str, Template], values: Mapping[str, str], *, secret: SecretLookup | None = None
) -> str:
    """An application/x-www-form-urlencoded body: each field's rendered value form-encoded."""
    rendered = [(name, template.render(values, secret=secret)) for name, template in fields.items()]
    try:
        # `*` stays as is, as in the WHATWG serializer, so a masked secret still reads ****.
        return urlencode(rendered, safe="*")
    except UnicodeEncodeError as err:
        raise RenderError("a form value is not valid Unicode text (lone surrogate)") from err


def render_json(body: Any, values: Mapping[str, str], *, secret: SecretLookup | None = None) -> Any:
    """A copy of a JSON structure with every Template rendered to a str (keys stay literal)."""

    def render(leaf: Any, path: tuple[object, ...]) -> Any:
        return leaf.render(values, secret=secret) if isinstance(leaf, Template) else leaf

    return _map_leaves(body, render)


def parse_json_templates(body: Any) -> Any:
    """A copy of a JSON structure with every string leaf parsed as a Template; TemplateError
    names the JSON path (`$.user.emails[0]`) of a bad one."""
    return _map_leaves(body, _parse_leaf)


def json_template_source(body: Any) -> Any:
    """The inverse of parse_json_templates: every Template back to its source string."""
    return _map_leaves(body, lambda leaf, path: _source_of(leaf))


MAX_JSON_DEPTH = 32


def _map_leaves(
    body: Any, leaf: Callable[[Any, tuple[object, ...]], Any], path: tuple[object, ...] = ()
) -> Any:
    if len(path) > MAX_JSON_DEPTH:
        raise TemplateError(f"at {_json_path(path)}: nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(body, Mapping):
        return {key: _map_leaves(item, leaf, (*path, key)) for key, item in body.items()}
    if isinstance(body, list | tuple):
        return [_map_leaves(item, leaf, (*path, index)) for index, item in enumerate(body)]
    return leaf(body, path)


def _parse_leaf(leaf: Any, path: tuple[object, ...]) -> Any:
    if not isinstance(leaf, str):
        return leaf
    try:
        return parse_template(leaf)
    except TemplateError as err:
        raise TemplateError(f"at {_json_path(path)}: {err}") from err


def _json_path(path: tuple[object, ...]) -> str:
    out = ["$"]
    for key in path:
        if isinstance(key, int):
            out.append(f"[{key}]")
        else:
            text = str(key)
            out.append(f".{text}" if text.isidentifier() else f"[{json.dumps(text)}]")
    return "".join(out)


def encoded_forms(value: str) -> frozenset[str]:
    """Every form `value` takes once encoded by this module (URL parts, form, JSON, XML), so a
    redactor told about a secret can mask it wherever it landed."""
    forms = {value, encode_json_string(value), value.translate(_XML_ESCAPES)}
    # Services echo what they got as HTML too (&#x27; or &#39; for a quote).
    forms.add(html.escape(value, quote=True))
    forms.add(html.escape(value, quote=True).replace("&#x27;", "&#39;"))
    quoters = (*_URL_ENCODERS, lambda v: urlencode([("", v)], safe="*")[1:])
    for encode in quoters:
        try:
            forms.add(encode(value))
        except (RenderError, UnicodeEncodeError):
            continue  # a value this encoder refuses never reaches the wire through it
    return frozenset(forms)


# --- pydantic support ---------------------------------------------------------------------


class _TemplateField:
    """Validates a str into a template of one class; serializes it back to its source."""

    def __init__(self, parse: Callable[[str], Template]) -> None:
        self._parse = parse

    def __get_pydantic_core_schema__(
        self, source_type: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        from_str = core_schema.chain_schema(
            [core_schema.str_schema(), core_schema.no_info_plain_validator_function(self._parse)]
        )
        return core_schema.json_or_python_schema(
            json_schema=from_str,
            # A Template given back to a model is re-parsed from its source, so a plain
            # Template is still checked as a URL where a UrlTemplate is declared.
            python_schema=core_schema.no_info_before_validator_function(_source_of, from_str),
            serialization=core_schema.plain_serializer_function_ser_schema(
                _source_of, return_schema=core_schema.str_schema()
            ),
        )


class _JsonTemplateField:
    """Validates a JSON structure into one whose strings are Templates, and serializes back."""

    def __get_pydantic_core_schema__(
        self, source_type: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(
            parse_json_templates,
            core_schema.any_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(json_template_source),
        )


def _source_of(value: Any) -> Any:
    return value.source if isinstance(value, Template) else value


TemplateStr = Annotated[Template, _TemplateField(parse_template)]
# A JSON body (any JSON value) whose strings are templates; dumps back to the plain structure.
JsonTemplate = Annotated[Any, _JsonTemplateField()]
