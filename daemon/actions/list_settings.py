"""The settings every list action shares (E-Delivery, Opt-Intel, DNPL), checked at load: the
list, the fields and which of them carry the contact's email or phone, where the key goes,
the two predicates that judge an answer (``success``, ``already_there``) and the calls one
delivery makes. The client that sends them is :mod:`daemon.actions.listclient`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from daemon.actions.base import ActionSettings
from daemon.durations import Duration
from daemon.errors import TemplateError
from daemon.httpstatus import RETRYABLE_STATUSES
from daemon.macros import Template, TemplateStr
from daemon.urltemplate import UrlTemplate, UrlTemplateStr


def _number_as_text(value: Any) -> Any:
    # Ops write list ids and static values as YAML numbers (`list_id: 123`).
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


Text = Annotated[TemplateStr, BeforeValidator(_number_as_text)]
MAX_WIRE_NAME = 100
WireName = Annotated[str, Field(min_length=1, max_length=MAX_WIRE_NAME)]
Kind = Literal["email", "phone"]
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
_RESERVED_HEADERS = {"host", "content-length", "content-type", "transfer-encoding", "connection"}
_FIELD_PATH = re.compile(r"^[A-Za-z0-9_$@-]+(\.[A-Za-z0-9_$@-]+)*$")
MISSING = object()  # a field the answer lacks, or an answer that is not JSON


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list | tuple) else [value]


def _scalars(value: Any) -> Any:
    values = _as_list(value)
    for item in values:
        if not (item is None or isinstance(item, str | int | float | bool)):
            raise ValueError("equals holds strings, numbers, true, false or null")
    return values


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Predicate(_Strict):
    """`{status: [409]}`, `{field: result, equals: [true]}`, or both (all given must hold)."""

    status: (
        Annotated[list[Annotated[int, Field(ge=100, le=599)]], BeforeValidator(_as_list)] | None
    ) = None
    field: str | None = None
    equals: Annotated[list[Any], BeforeValidator(_scalars)] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Predicate:
        if self.equals is not None and self.field is None:
            raise ValueError("equals needs field: the JSON field of the answer to compare")
        if self.status is None and self.field is None:
            raise ValueError("give status, field (with equals), or both")
        if self.field is not None and self.equals is None:
            raise ValueError("field needs equals: the values that count")
        if self.field is not None and not _FIELD_PATH.match(self.field):
            raise ValueError(f"field {self.field!r} is not a path such as status or data.result")
        return self

    def matches(self, status: int, body: Any) -> bool:
        """`body` is the parsed JSON answer, or MISSING when it is not JSON."""
        if self.status is not None and status not in self.status:
            return False
        if self.field is None or self.equals is None:
            return True
        found = _lookup(body, self.field)
        return any(_same(found, wanted) for wanted in self.equals)


def _lookup(body: Any, path: str) -> Any:
    node = body
    for step in path.split("."):
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            return MISSING
    return node


def _same(found: Any, wanted: Any) -> bool:
    # JSON types must agree: `true` is not 1 and not "true" (Python says True == 1).
    if isinstance(found, bool) or isinstance(wanted, bool):
        return type(found) is type(wanted) and found == wanted
    if isinstance(found, int | float) and isinstance(wanted, int | float):
        return found == wanted
    return type(found) is type(wanted) and found == wanted


class NamedValue(_Strict):
    name: WireName
    value: Text


class Auth(_Strict):
    """Where the credential goes: exactly one of header, query, body."""

    header: NamedValue | None = None
    query: NamedValue | None = None
    body: NamedValue | None = None

    @model_validator(mode="after")
    def _one(self) -> Auth:
        given = [p for p in ("header", "query", "body") if getattr(self, p) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of header, query or body")
        if self.header is not None:
            name = self.header.name
            if not _TOKEN.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by postbackd")
        return self


@dataclass(frozen=True)
class Call:
    """One planned request: its URL template and the identifier kinds it carries."""

    url: UrlTemplate
    kinds: frozenset[str]


def join_url(base: Template, path: str, setting: str) -> UrlTemplate:
    """`base_url` + a path setting as one URL template, checked at load."""
    if path and not path.startswith("/"):
        raise ValueError(f"{setting} must start with /")
    try:
        Template(path)  # its own mistakes reported with columns of the path, not the URL
    except TemplateError as err:
        raise ValueError(f"{setting}: {err}") from err
    if path and re.search(r"[?#]", base.source):
        raise ValueError(f"base_url has a query or fragment: {setting} cannot follow it")
    try:
        return UrlTemplate(base.source.rstrip("/") + path if path else base.source)
    except TemplateError as err:
        raise ValueError(f"base_url + {setting}: {err}") from err


class ListSettings(ActionSettings):
    """Settings every list action shares; subclasses say which calls a delivery makes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: UrlTemplateStr
    method: Literal["POST", "PUT", "PATCH", "DELETE", "GET"] = "POST"
    content_type: Literal["json", "form"] = "json"
    auth: Auth | None = None
    list_id: Text | None = None
    list_id_field: WireName = "list_id"
    fields: dict[str, Text] = Field(
        default_factory=lambda: {"email": Template("{email}"), "phone": Template("{phone}")}
    )
    # Which fields carry the contact's email or phone (normalised, hashed, required). Default:
    # every field whose template is exactly {email} or {phone}.
    identifiers: dict[str, Kind] | None = None
    hashing: Literal["plain", "md5"] = "plain"
    success: Predicate | None = None
    already_there: Predicate | None = None
    timeout: Duration | None = Field(default=None, gt=0, le=120)
    _kinds: dict[str, Kind] = PrivateAttr(default_factory=dict)
    _calls: tuple[Call, ...] = PrivateAttr(default=())

    @field_validator("fields", mode="before")
    @classmethod
    def _field_names(cls, value: Any) -> Any:
        # One message for a bad name (pydantic's would point at a `[key]` of an empty key).
        for name in value if isinstance(value, Mapping) else ():
            if not isinstance(name, str) or not 0 < len(name) <= MAX_WIRE_NAME:
                raise ValueError(f"a field name is a string of 1 to {MAX_WIRE_NAME} characters")
        return value

    @model_validator(mode="after")
    def _check(self) -> ListSettings:
        self._check_identifiers()
        self._check_names()
        self._check_predicates()
        self._calls = self.plan()
        return self

    def _check_identifiers(self) -> None:
        if self.identifiers is None:
            inferred = {"{email}": "email", "{phone}": "phone"}
            kinds = {n: inferred[t.source] for n, t in self.fields.items() if t.source in inferred}
            if not kinds:
                raise ValueError(
                    "no field is exactly {email} or {phone}: say which fields carry them"
                    " in identifiers"
                )
            self._kinds = kinds  # type: ignore[assignment]
            return
        if not self.identifiers:
            raise ValueError("identifiers: name at least one field that carries email or phone")
        for name in self.identifiers:
            if name not in self.fields:
                raise ValueError(f"identifiers: {name!r} is not a key of fields")
        self._kinds = dict(self.identifiers)

    def _check_names(self) -> None:
        owners: dict[str, str] = {}
        names = [(n, "fields") for n in self.fields]
        if self.list_id is not None:
            names.append((self.list_id_field, "list_id_field"))
        if self.auth is not None and self.auth.body is not None:
            names.append((self.auth.body.name, "auth.body"))
        if self.auth is not None and self.auth.query is not None and self.method == "GET":
            names.append((self.auth.query.name, "auth.query"))
        for name, owner in names:
            if name in owners:
                raise ValueError(f"wire field {name!r} is set twice ({owners[name]}, {owner})")
            owners[name] = owner

    def _check_predicates(self) -> None:
        if self.success is not None and any(not 200 <= s < 300 for s in self.success.status or ()):
            raise ValueError("success.status: only 2xx answers can succeed; list 2xx codes")
        there = self.already_there.status if self.already_there is not None else None
        for code in there or ():
            if retried(code):
                raise ValueError(
                    f"already_there.status: {code} is retried (408, 425, 429, 5xx);"
                    " it cannot mean the list already holds the contact"
                )

    def removes(self) -> bool:
        """True when this postback takes contacts off the list (add is the default)."""
        return False

    def plan(self) -> tuple[Call, ...]:
        """The calls of one delivery, in order; ValueError when a path is wrong."""
        raise NotImplementedError

    @property
    def calls(self) -> tuple[Call, ...]:
        return self._calls

    @property
    def identifier_kinds(self) -> Mapping[str, Kind]:
        """Identifier field -> kind, as given or inferred."""
        return self._kinds


def retried(status: int) -> bool:
    """True for the statuses the shared classifier retries (408, 425, 429, 5xx)."""
    return status in RETRYABLE_STATUSES or 500 <= status < 600


Operation = Literal["add", "remove", "delete"]  # `delete` is DNPL's word for remove


class PathSettings(ListSettings):
    """One request per delivery, to base_url + add_path or base_url + remove_path."""

    add_path: str = ""
    remove_path: str | None = None  # no default: removing where adding goes would add

    def plan(self) -> tuple[Call, ...]:
        kinds = frozenset(self.identifier_kinds.values())
        if not self.removes():
            return (Call(join_url(self.base_url, self.add_path, "add_path"), kinds),)
        if self.remove_path is None:
            raise ValueError(
                'removing needs remove_path (write remove_path: "" when base_url itself removes)'
            )
        return (Call(join_url(self.base_url, self.remove_path, "remove_path"), kinds),)
