"""The source file format (SPEC 6): the models of `webhooks/*.yaml` and the shipped presets, their
parsing, and the checks a model cannot make alone.

A source file names canonical fields' inbound parameters (`fields`), maps the tracker's status
values (`status_map`), fills `defaults`, and says who may post (`auth`, `allow_ips`,
`trusted_proxies`, `rate_limit`, `public`). `preset: NAME` starts from a shipped preset; the
file's own keys override it (mappings are merged key by key).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from daemon.auth import TOKEN_HEADER
from daemon.durations import Duration
from daemon.errors import InputError, Issue
from daemon.models import CANONICAL_FIELDS, Status, check_value, parse_decimal, parse_event_time
from daemon.secrets import valid_secret_name
from daemon.yamlfile import YamlError, YMap, line_of, load_yaml, raw_text

SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_PARAM_NAME = 128
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]+$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
_SECRET_REF = re.compile(r"^\$\{secret:([^}]*)\}$")


# --- the file format -------------------------------------------------------------------------


def _text(value: Any, what: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        raise ValueError(f"must be {what}")
    return raw_text(value).strip()


def _param(value: Any) -> str:
    text = _text(value, "a parameter name")
    if not text or len(text) > MAX_PARAM_NAME or not _PRINTABLE.match(text):
        raise ValueError(f"{text!r} is not a parameter name (1 to {MAX_PARAM_NAME} characters)")
    return text


def _canonical(value: Any) -> str:
    text = _text(value, "a canonical field name")
    if text not in CANONICAL_FIELDS:
        close = difflib.get_close_matches(text, CANONICAL_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown canonical field {text!r}{hint}")
    return text


def _status_key(value: Any) -> str:
    return _text(value, "a status value").lower()


def _status_target(value: Any) -> str:
    text = _text(value, "a status")
    if text not in Status.__members__.values():
        raise ValueError(f"{text!r} is not a status (pending, approved or rejected)")
    return text


def _secret_ref(value: Any) -> str:
    text = _text(value, "a secret name")
    match = _SECRET_REF.match(text)
    name = match.group(1) if match else text
    if not valid_secret_name(name):
        raise ValueError(
            f"{text!r} is not a secret name (letters, digits, _ . -) or ${{secret:NAME}}"
        )
    return name


def _header(value: Any) -> str:
    text = _text(value, "a header name")
    if not _HEADER_NAME.match(text):
        raise ValueError(f"{text!r} is not a header name")
    return text


def _cidr(value: Any) -> str:
    text = _text(value, "a CIDR such as 198.51.100.0/24")
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError as err:
        raise ValueError(f"{text!r} is not an address or CIDR") from err


def _auth(value: Any) -> Any:
    if isinstance(value, str):
        if value.strip() == "none":
            return None
        raise ValueError("must be none or a mapping with one of token, hmac, basic")
    return value


ParamName = Annotated[str, BeforeValidator(_param)]
CanonicalName = Annotated[str, BeforeValidator(_canonical)]
SecretRef = Annotated[str, BeforeValidator(_secret_ref)]
HeaderName = Annotated[str, BeforeValidator(_header)]
Cidr = Annotated[str, BeforeValidator(_cidr)]
StatusKey = Annotated[str, BeforeValidator(_status_key)]
StatusTarget = Annotated[str, BeforeValidator(_status_target)]
DefaultValue = Annotated[str, BeforeValidator(lambda v: _text(v, "a string or a number"))]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenAuth(_Model):
    secret: SecretRef
    param: ParamName | None = None
    header: HeaderName = TOKEN_HEADER


class HmacAuth(_Model):
    scheme: Literal["standard-webhooks"] = "standard-webhooks"
    secret: SecretRef | None = None
    secrets: list[SecretRef] | None = Field(default=None, min_length=1, max_length=5)
    tolerance: Duration = Field(default=300.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_secret(self) -> HmacAuth:
        if (self.secret is None) == (self.secrets is None):
            raise ValueError("give exactly one of secret or secrets (a list, for key rotation)")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return (self.secret,) if self.secret else tuple(self.secrets or ())


class BasicAuth(_Model):
    username: str = Field(min_length=1, max_length=200, pattern=r"^[^:\x00-\x1f\x7f]+$")
    secret: SecretRef


class AuthConfig(_Model):
    token: TokenAuth | None = None
    hmac: HmacAuth | None = None
    basic: BasicAuth | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> AuthConfig:
        if sum(x is not None for x in (self.token, self.hmac, self.basic)) != 1:
            raise ValueError("give exactly one of token, hmac, basic (or write auth: none)")
        return self

    @property
    def secrets(self) -> tuple[str, ...]:
        if self.hmac is not None:
            return self.hmac.names
        plain = self.token or self.basic
        return (plain.secret,) if plain is not None else ()


class RateLimitConfig(_Model):
    requests: StrictInt = Field(ge=1, le=1_000_000)
    per: Duration = Field(default=1.0, gt=0, le=86400)
    burst: StrictInt | None = Field(default=None, ge=1, le=1_000_000)


class SourceFile(_Model):
    name: str | None = Field(default=None, pattern=SOURCE_NAME.pattern)
    preset: str | None = None
    auth: Annotated[AuthConfig | None, BeforeValidator(_auth)] = None
    allow_ips: list[Cidr] | None = None
    trusted_proxies: list[Cidr] | None = None
    fields: dict[CanonicalName, ParamName | None] | None = None  # None: from no parameter
    status_map: dict[StatusKey, StatusTarget] | None = None
    defaults: dict[CanonicalName, DefaultValue] | None = None
    response: Literal["json", "text"] | None = None
    rate_limit: RateLimitConfig | None = None
    public: StrictBool | None = None  # takes conversions without credentials, on purpose

    @field_validator("status_map", mode="before")
    @classmethod
    def _no_case_twins(cls, value: Any) -> Any:
        if isinstance(value, dict):
            seen: dict[str, Any] = {}
            for key in value:
                norm = raw_text(key).strip().lower()
                if norm in seen:
                    raise ValueError(
                        f"{seen[norm]!r} and {key!r} are the same value "
                        "(status values compare case-insensitively)"
                    )
                seen[norm] = key
        return value


# --- presets ---------------------------------------------------------------------------------


def preset_names() -> list[str]:
    folder = resources.files("daemon") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


@cache
def _preset(name: str) -> tuple[SourceFile | None, tuple[Issue, ...]]:
    rel = f"daemon/presets/{name}.yaml"
    data = (resources.files("daemon") / "presets" / f"{name}.yaml").read_bytes()
    spec, _, issues = parse_source_file(rel, data)
    return spec, tuple(issues)


def merge_preset(base: SourceFile, own: SourceFile) -> SourceFile:
    merged: dict[str, Any] = dict(base)
    merged["name"] = own.name  # the file's name (or stem), never the preset's
    for key in own.model_fields_set:
        value = getattr(own, key)
        if key in ("fields", "status_map", "defaults") and value is not None:
            value = {**(getattr(base, key) or {}), **value}
        merged[key] = value
    return SourceFile.model_construct(**merged)


# --- parsing and checks ---------------------------------------------------------------------


def parse_source_file(rel: str, data: bytes) -> tuple[SourceFile | None, YMap | None, list[Issue]]:
    try:
        raw = load_yaml(data)
    except YamlError as err:
        return None, None, [Issue(rel, err.line, err.message)]
    if not isinstance(raw, YMap):
        line = getattr(raw, "line", 1) or 1
        return None, None, [Issue(rel, line, "a source file must be a mapping")]
    try:
        return SourceFile.model_validate(raw), raw, []
    except ValidationError as err:
        return None, raw, [_issue(rel, raw, e) for e in err.errors(include_url=False)]


def _issue(rel: str, raw: Any, e: Mapping[str, Any]) -> Issue:
    loc = tuple(e["loc"])
    names = [str(p) for p in loc if not isinstance(p, int)]
    if names[-1:] == ["[key]"]:
        names = names[:-2]  # a bad key: the message names it; report under its mapping
    where = ".".join(names)
    if e["type"] == "extra_forbidden":
        message = f"unknown key {where!r}"
    elif e["type"] == "missing":
        message = f"missing required key {where!r}"
    else:
        text = str(e["msg"]).removeprefix("Value error, ")
        message = f"{where}: {text}" if where else text
    return Issue(rel, line_of(raw, loc), message)


def preset_for(rel: str, raw: YMap, name: str) -> tuple[SourceFile | None, list[Issue]]:
    known = preset_names()
    if name not in known:
        line = raw.lines.get("preset", 1)
        return None, [Issue(rel, line, f"unknown preset {name!r} (known: {', '.join(known)})")]
    spec, issues = _preset(name)
    return spec, list(issues)


def check_source_file(rel: str, raw: YMap, spec: SourceFile) -> list[Issue]:
    """What a model cannot see alone: default values, and a token that would be stored."""
    issues = []
    own = raw.get("defaults")
    for name, value in (spec.defaults or {}).items():
        mine = isinstance(own, dict) and name in own
        line = line_of(raw, ("defaults", name)) if mine else raw.lines.get("preset", 1)
        try:
            _check_default(name, value, spec.status_map or {})
        except (InputError, ValueError) as err:
            text = err.message if isinstance(err, InputError) else str(err)
            issues.append(Issue(rel, line, f"defaults.{name}: {text}"))
    token = spec.auth.token if spec.auth else None
    if token is not None and token.param in (spec.fields or {}).values():
        issues.append(
            Issue(
                rel,
                line_of(raw, ("auth", "token", "param")),
                f"auth.token.param {token.param!r} is also mapped in fields "
                "(a credential must never be stored)",
            )
        )
    return issues


def _check_default(name: str, value: str, status_map: Mapping[str, str]) -> None:
    check_value(name, value)
    if name == "status" and value.lower() not in status_map:
        _status_target(value.lower())
    elif name in ("payout", "revenue"):
        parse_decimal(name, value)
    elif name == "currency" and not re.fullmatch(r"[A-Za-z]{3}", value):
        raise ValueError("not an ISO 4217 currency code")
    elif name == "event_time":
        parse_event_time(value)
