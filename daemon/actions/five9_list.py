"""five9_list: adds the lead to a Five9 dialing list, through Web2Campaign AddToList or the SOAP
Configuration Web Service's addRecordToList (the platform's "Add to Five9 List").

Both modes name key fields, and the SOAP mode asks Five9 to update the first matching record
(crmUpdateMode UPDATE_FIRST, listAddMode ADD_FIRST): adding the same lead again updates it
instead of adding a duplicate, so a request whose answer was lost may be sent again.

Provider docs: Web2Campaign Developer's Guide (F9errCode / F9errDesc in the HTML answer),
https://documentation.five9.com/bundle/api-web2campaign/page/web2campaign/landing-web2campaign.htm;
Configuration Web Services (addRecordToList, listUpdateSettings, listImportResult),
https://documentation.five9.com/bundle/api-config-web/page/config-web-services/.
"""

from __future__ import annotations

import base64
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from html.parser import HTMLParser
from typing import ClassVar, Literal
from urllib.parse import urlencode

from pydantic import Field, field_validator, model_validator

from daemon.actions.base import (
    ActionSettings,
    BaseUrlStr,
    Job,
    RequestRecord,
    Resources,
    SecretTemplateStr,
    origin,
    secret_lookup,
    send_http,
)
from daemon.durations import Duration
from daemon.errors import PermanentError, RenderError, RetryableError
from daemon.httpstatus import HttpResponse, classify_status
from daemon.macros import Template, TemplateStr, encode_xml
from daemon.urltemplate import parse_url_template

W2C_PATH = "/web2campaign/AddToList"
SOAP_PATH = "/wsadmin/v13/AdminWebService"
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
ADMIN_NS = "http://service.admin.ws.five9.com/"
_FIELD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ .-]{0,63}")
_NOT_NAME = re.compile(r"[^A-Za-z0-9]")
CallNowMode = Literal["NONE", "NEW_CRM_ONLY", "NEW_LIST_ONLY", "ANY"]


class Settings(ActionSettings):
    type: Literal["five9_list"]
    mode: Literal["web2campaign", "soap"] = "web2campaign"
    base_url: BaseUrlStr = parse_url_template("https://api.five9.com")
    list_name: TemplateStr
    fields: dict[str, TemplateStr] = Field(min_length=1)
    key_fields: list[str] = Field(default_factory=lambda: ["number1"])
    domain: TemplateStr | None = None  # web2campaign: F9domain
    method: Literal["GET", "POST"] = "POST"  # web2campaign
    call_asap: bool | None = None  # web2campaign: F9CallASAP
    call_now_mode: CallNowMode | None = None  # soap: listUpdateSettings.callNowMode
    username: TemplateStr | None = None
    password: SecretTemplateStr | None = None
    timeout: Duration | None = Field(default=None, gt=0, le=120)

    @field_validator("fields")
    @classmethod
    def _field_names(cls, value: dict[str, Template]) -> dict[str, Template]:
        for name in value:
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a Five9 contact field name (e.g. number1)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if not self.key_fields:
            raise ValueError("key_fields must name at least one field (keys make a resend update)")
        for key in self.key_fields:
            if key not in self.fields:
                raise ValueError(f"key field {key!r} is not in fields")
        if len(set(self.key_fields)) != len(self.key_fields):
            raise ValueError("a key field is listed twice")
        if (self.username is None) != (self.password is None):
            raise ValueError("give username and password together")
        if self.mode == "soap":
            self._check_soap()
        else:
            self._check_w2c()
        return self

    def _check_soap(self) -> None:
        if self.username is None:
            raise ValueError("mode soap needs username and password (a Five9 admin/API user)")
        for name, given in (
            ("domain", self.domain is not None),
            ("call_asap", self.call_asap is not None),
            ("method", self.method != "POST"),
        ):
            if given:
                raise ValueError(f"{name} applies to mode web2campaign only")

    def _check_w2c(self) -> None:
        if self.domain is None:
            raise ValueError("mode web2campaign needs domain (the Five9 domain, F9domain)")
        if self.call_now_mode is not None:
            raise ValueError("call_now_mode applies to mode soap (web2campaign has call_asap)")
        reserved = sorted(name for name in self.fields if name.upper().startswith("F9"))
        if reserved:
            raise ValueError(f"field {reserved[0]!r}: names starting with F9 are Five9's own")


Secret = Callable[[str], str] | None


class Five9List:
    # Key fields turn a repeated add into an update (see the module docstring).
    idempotent: ClassVar[bool] = True

    def __init__(self, settings: Settings, resources: Resources) -> None:
        self.settings = settings
        self.resources = resources
        path = SOAP_PATH if settings.mode == "soap" else W2C_PATH
        self.url = settings.base_url.source.rstrip("/") + path

    @property
    def destination(self) -> str:
        return origin(self.settings.base_url)

    def _record(self, job: Job, secret: Secret) -> list[tuple[str, str]]:
        """(field, value) of every field with a value; a key field must have one."""
        record = []
        for name, template in self.settings.fields.items():
            value = template.render(job.values, secret=secret).strip()
            if value:
                record.append((name, value))
            elif name in self.settings.key_fields:
                raise PermanentError("missing_key_field", f"key field {name!r} is empty")
        return record

    def _auth(self, job: Job, secret: Secret) -> dict[str, str]:
        s = self.settings
        if s.username is None or s.password is None:
            return {}
        user = s.username.render(job.values, secret=secret)
        password = s.password.render({}, secret=secret)
        token = base64.b64encode(f"{user}:{password}".encode())
        # Five9 answers HTML and XML: an echoed password may come back as character references.
        for form in (token.decode(), html.escape(password), html.escape(password, quote=False)):
            job.redactor.add(form)
        return {"Authorization": f"Basic {token.decode()}"}

    def _render(self, job: Job, secret: Secret) -> tuple[str, str, dict[str, str], bytes | None]:
        s = self.settings
        record = self._record(job, secret)
        headers = self._auth(job, secret)
        list_name = s.list_name.render(job.values, secret=secret)
        if s.mode == "soap":
            headers.update({"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'})
            return "POST", self.url, headers, _envelope(list_name, record, s)
        assert s.domain is not None  # checked at load
        params = [("F9domain", s.domain.render(job.values, secret=secret)), ("F9list", list_name)]
        params += record
        params += [("F9key", key) for key in s.key_fields]
        params.append(("F9retResults", "1"))
        if s.call_asap:
            params.append(("F9CallASAP", "1"))
        query = _form(params)
        if s.method == "GET":
            return "GET", f"{self.url}?{query}", headers, None
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        return "POST", self.url, headers, query.encode()

    def preview(self, job: Job) -> RequestRecord:
        method, url, headers, body = self._render(job, None)
        return RequestRecord(method, url, job.redactor.headers(headers), _text(body))

    async def send(self, job: Job) -> None:
        method, url, headers, body = self._render(job, secret_lookup(job, self.resources))
        response = await send_http(self, job, method, url, headers, body)
        if self.settings.mode == "soap":
            _check_soap(response, self.resources.clock.now(), job.redactor.redact)
        else:
            classify_status(response, self.resources.clock.now())
            _check_w2c(response, job.redactor.redact)


def _form(params: list[tuple[str, str]]) -> str:
    try:
        return urlencode(params, safe="*")
    except UnicodeEncodeError as err:
        raise RenderError("a value is not valid Unicode text (lone surrogate)") from err


def _text(body: bytes | None) -> str | None:
    return body.decode() if body is not None else None


def _envelope(list_name: str, record: list[tuple[str, str]], s: Settings) -> bytes:
    """addRecordToList, built by hand; every value goes through encode_xml."""
    mapping = "".join(
        f"<fieldsMapping><columnNumber>{column}</columnNumber>"
        f"<fieldName>{encode_xml(name)}</fieldName>"
        f"<key>{'true' if name in s.key_fields else 'false'}</key></fieldsMapping>"
        for column, (name, _) in enumerate(record, start=1)
    )
    values = "".join(f"<fields>{encode_xml(value)}</fields>" for _, value in record)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<env:Envelope xmlns:env="{SOAP_ENV}" xmlns:ser="{ADMIN_NS}"><env:Body>'
        f"<ser:addRecordToList><listName>{encode_xml(list_name)}</listName>"
        f"<listUpdateSettings>{mapping}<skipHeaderLine>false</skipHeaderLine>"
        f"<callNowMode>{s.call_now_mode or 'NONE'}</callNowMode>"
        "<cleanListBeforeUpdate>false</cleanListBeforeUpdate>"
        "<crmAddMode>ADD_NEW</crmAddMode><crmUpdateMode>UPDATE_FIRST</crmUpdateMode>"
        "<listAddMode>ADD_FIRST</listAddMode></listUpdateSettings>"
        f"<record>{values}</record></ser:addRecordToList></env:Body></env:Envelope>"
    ).encode()


# --- answers ----------------------------------------------------------------------------------


class _Inputs(HTMLParser):
    """The value of each <input> named (or with the id) F9errCode and F9errDesc."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "input":
            return
        attributes = dict(attrs)
        for key in (attributes.get("name"), attributes.get("id")):
            if key in ("F9errCode", "F9errDesc"):
                self.found.setdefault(key, attributes.get("value") or "")


def _check_w2c(response: HttpResponse, redact: Callable[[str], str]) -> None:
    """W2C answers HTTP 200 with an HTML page even on failure; F9errCode 0 is success."""
    parser = _Inputs()
    parser.feed(response.text())
    parser.close()
    code = parser.found.get("F9errCode", "").strip()
    if not re.fullmatch(r"-?\d{1,9}", code):
        # Not the W2C result page (a maintenance page, a login form): resending is safe.
        raise RetryableError("five9_bad_response", "no F9errCode in the answer")
    if int(code) != 0:
        detail = redact(parser.found.get("F9errDesc", ""))[:200]
        raise PermanentError(f"five9_err_{int(code)}", detail)


def _check_soap(response: HttpResponse, now: float, redact: Callable[[str], str]) -> None:
    root = _parse_xml(response.body)
    fault = _first(root, "Fault") if root is not None else None
    if fault is not None:
        # A SOAP Fault (HTTP 500) is Five9 refusing the request (unknown list, bad field...).
        details = _first(fault, "detail")
        kinds = [_local(child.tag) for child in details] if details is not None else []
        name = _NOT_NAME.sub("", kinds[0].removesuffix("Fault"))[:40] if kinds else ""
        reason = f"five9_{_snake(name)}" if name else "five9_fault"
        raise PermanentError(reason, redact(_child_text(fault, "faultstring"))[:200])
    classify_status(response, now)  # a 5xx without a Fault is retried
    result = _first(root, "addRecordToListResponse") if root is not None else None
    if result is None:
        raise RetryableError("five9_bad_response", "no addRecordToListResponse in the answer")
    errors = _child_text(result, "uploadErrorsCount", deep=True).strip()
    if (errors not in ("", "0")) or _child_text(result, "success", deep=True) == "false":
        message = redact(_child_text(result, "failureMessage", deep=True))[:200]
        raise PermanentError("five9_upload_error", message)


class _DoctypeRefused(Exception):
    pass


class _NoDoctype(ET.TreeBuilder):
    """SOAP forbids a DTD; refusing one at its start means no entity is ever declared, so no
    entity expansion (xml.etree never loads external entities anyway)."""

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        raise _DoctypeRefused


def _parse_xml(body: bytes) -> ET.Element | None:
    # defusedxml is not a dependency: what it guards against needs a DTD, refused above; the
    # body is at most 64 KiB (outbound.BODY_CAP).
    parser = ET.XMLParser(target=_NoDoctype())  # noqa: S314
    try:
        parser.feed(body)
        root: ET.Element = parser.close()
    except (ET.ParseError, _DoctypeRefused):
        return None
    return root


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _first(root: ET.Element, name: str) -> ET.Element | None:
    return next((e for e in root.iter() if _local(e.tag) == name), None)


def _child_text(element: ET.Element, name: str, *, deep: bool = False) -> str:
    children = element.iter() if deep else iter(element)
    found = next((e for e in children if _local(e.tag) == name), None)
    return (found.text or "") if found is not None else ""


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def build(settings: Settings, resources: Resources) -> Five9List:
    return Five9List(settings, resources)
