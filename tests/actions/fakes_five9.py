"""A fake Five9 on 127.0.0.1 with both list APIs over one small contact store keyed by the
request's key fields (a repeated add updates, as UPDATE_FIRST / ADD_FIRST do):

- `GET|POST /web2campaign/AddToList`: checks F9domain, F9list, F9key and number1 and answers an
  HTML page whose F9errCode / F9errDesc inputs carry the result (HTTP 200 even on failure);
- `POST /wsadmin/v13/AdminWebService`: checks Basic auth and parses the SOAP envelope with
  xml.etree (refusing a DTD), answers addRecordToListResponse/listImportResult, or a SOAP Fault
  with HTTP 500 for an unknown list.

A script of replies overrides the answers one request at a time ("hang" waits for close)."""

from __future__ import annotations

import base64
import html
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from aiohttp import web

from tests.actions.kit import FakeServer

ENV = "{http://schemas.xmlsoap.org/soap/envelope/}"
SER = "{http://service.admin.ws.five9.com/}"


def w2c_page(code: int, desc: str) -> str:
    return (
        "<HTML><HEAD><TITLE>Five9 Web2Campaign</TITLE></HEAD><BODY><FORM>"
        f'<INPUT readonly id="F9errCode" name="F9errCode" value="{code}">'
        f'<INPUT readonly id="F9errDesc" name="F9errDesc" value="{html.escape(desc)}">'
        "</FORM></BODY></HTML>"
    )


def soap_fault(message: str, kind: str = "ObjectNotFoundFault") -> str:
    return (
        f'<env:Envelope xmlns:env="{ENV[1:-1]}"><env:Body><env:Fault>'
        f"<faultcode>env:Server</faultcode><faultstring>{html.escape(message)}</faultstring>"
        f'<detail><ns2:{kind} xmlns:ns2="{SER[1:-1]}"><message>{html.escape(message)}'
        f"</message></ns2:{kind}></detail></env:Fault></env:Body></env:Envelope>"
    )


def list_import_result(list_name: str, inserted: int, updated: int, errors: int = 0) -> str:
    return (
        f'<env:Envelope xmlns:env="{ENV[1:-1]}"><env:Body>'
        f'<ns2:addRecordToListResponse xmlns:ns2="{SER[1:-1]}"><return>'
        f"<uploadDuplicatesCount>0</uploadDuplicatesCount>"
        f"<uploadErrorsCount>{errors}</uploadErrorsCount><warningsCount/>"
        f"<crmRecordsInserted>{inserted}</crmRecordsInserted>"
        f"<crmRecordsUpdated>{updated}</crmRecordsUpdated>"
        f"<listName>{html.escape(list_name)}</listName><listRecordsDeleted>0</listRecordsDeleted>"
        f"<listRecordsInserted>{inserted}</listRecordsInserted>"
        "</return></ns2:addRecordToListResponse></env:Body></env:Envelope>"
    )


@dataclass
class SoapCall:
    list_name: str
    mapping: list[tuple[int, str, bool]]  # columnNumber, fieldName, key
    settings: dict[str, str]  # the other listUpdateSettings elements
    values: list[str]

    @property
    def record(self) -> dict[str, str]:
        return {name: self.values[column - 1] for column, name, _ in self.mapping}


@dataclass
class FakeFive9(FakeServer):
    domain: str = "acme"
    lists: set[str] = field(default_factory=lambda: {"hot leads"})
    username: str = "api@acme"
    password: str = "f9-secret"
    w2c_auth: bool = False
    soap_calls: list[SoapCall] = field(default_factory=list)
    contacts: dict[tuple[str, ...], dict[str, str]] = field(default_factory=dict)
    content_type: ClassVar[str | None] = "text/html"

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_route("*", "/web2campaign/AddToList", self._w2c)
        router.add_post("/wsadmin/v13/AdminWebService", self._soap)

    async def _record(self, request: web.Request) -> tuple[bytes, web.StreamResponse | None]:
        got = await self.record(request)
        return got.body, await self.scripted(request)

    def late_reply(self) -> web.StreamResponse:
        return web.Response(text=w2c_page(0, "late"))

    def _authorized(self, request: web.Request) -> bool:
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return request.headers.get("Authorization") == f"Basic {expected}"

    def _upsert(self, keys: list[str], record: dict[str, str]) -> bool:
        """True when a contact with the same key values existed (and was updated)."""
        key = tuple(record.get(k, "") for k in keys)
        existed = key in self.contacts
        self.contacts.setdefault(key, {}).update(record)
        return existed

    async def _w2c(self, request: web.Request) -> web.StreamResponse:
        body, scripted = await self._record(request)
        if scripted is not None:
            return scripted
        if self.w2c_auth and not self._authorized(request):
            return web.Response(status=401, text="Unauthorized")
        pairs = parse_qsl(request.query_string if request.method == "GET" else body.decode())
        params: dict[str, Any] = {}
        for name, value in pairs:
            params.setdefault(name, []).append(value)
        first = {name: values[0] for name, values in params.items()}
        if first.get("F9domain") != self.domain:
            return _page(w2c_page(700, "Domain not found or Web2Campaign is disabled"))
        if first.get("F9list") not in self.lists:
            return _page(w2c_page(701, f"List {first.get('F9list')} does not exist"))
        if not first.get("number1"):
            return _page(w2c_page(702, "number1 is required"))
        record = {k: v for k, v in first.items() if not k.startswith("F9")}
        self._upsert(params.get("F9key", ["number1"]), record)
        return _page(w2c_page(0, "The request was successfully processed"))

    async def _soap(self, request: web.Request) -> web.StreamResponse:
        body, scripted = await self._record(request)
        if scripted is not None:
            return scripted
        if not self._authorized(request):
            return web.Response(status=401, text="Unauthorized")
        if b"<!DOCTYPE" in body:
            return _xml(500, soap_fault("DTD is not allowed", "ParseFault"))
        call = _parse_call(body)
        self.soap_calls.append(call)
        if call.list_name not in self.lists:
            return _xml(500, soap_fault(f'List "{call.list_name}" is not found'))
        keys = [name for _, name, key in call.mapping if key]
        updated = self._upsert(keys, call.record)
        return _xml(200, list_import_result(call.list_name, int(not updated), int(updated)))


def _parse_call(body: bytes) -> SoapCall:
    root = ET.fromstring(body)  # noqa: S314 -- our own test client's XML, DTD checked above
    add = root.find(f"{ENV}Body/{SER}addRecordToList")
    assert add is not None, body
    settings = add.find("listUpdateSettings")
    assert settings is not None
    mapping = [
        (
            int(m.findtext("columnNumber", "0")),
            m.findtext("fieldName", ""),
            m.findtext("key") == "true",
        )
        for m in settings.findall("fieldsMapping")
    ]
    others = {e.tag: e.text or "" for e in settings if e.tag != "fieldsMapping"}
    values = [f.text or "" for f in add.findall("record/fields")]
    return SoapCall(add.findtext("listName", ""), mapping, others, values)


def _page(text: str) -> web.Response:
    return web.Response(status=200, text=text, content_type="text/html")


def _xml(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/xml")
