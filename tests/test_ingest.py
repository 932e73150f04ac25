"""The front door against hostile input (SPEC 6): every bad request gets its exact 4xx and error
body, never a 5xx, and nothing reaches the store; slow clients are cut off at the read timeout."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import sqlite3
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon.auth import sign
from tests.harness import Daemon, FakeClock, start_daemon

SIGNING_KEY = b"k" * 32
SECRETS = {
    "POSTBACKD_SECRET_SIGNED_KEY": "whsec_" + base64.b64encode(SIGNING_KEY).decode(),
    "POSTBACKD_SECRET_TRACKER_TOKEN": "s3cret-token",
}
SOURCES = {
    "signed.yaml": "auth: {hmac: {secret: signed_key}}\n",
    "tokened.yaml": "auth: {token: {param: key, secret: tracker_token}}\n",
    "plain.yaml": "response: text\n",
}
OK_QUERY = "conversion_id=C1&offer=7&affiliate=42&status=approved"


async def start(tmp_path: Path, clock: FakeClock | None = None, **kw: Any) -> Daemon:
    hooks = tmp_path / "webhooks"
    hooks.mkdir(exist_ok=True)
    for name, text in kw.pop("sources", SOURCES).items():
        (hooks / name).write_text(text)
    return await start_daemon(
        tmp_path, {}, clock=clock, dispatch=False, environ=kw.pop("environ", SECRETS), **kw
    )


def stored(tmp_path: Path) -> tuple[int, int]:
    """(conversions, arrivals) as the SQLite file holds them."""
    with sqlite3.connect(tmp_path / "postbackd.db") as db:
        conversions = db.execute("SELECT count(*) FROM conversion").fetchone()[0]
        arrivals = db.execute("SELECT count(*) FROM arrival").fetchone()[0]
    return conversions, arrivals


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(
    method: str, target: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    given = {k.lower() for k in (headers or {})}
    if body is not None and "content-length" not in given and "transfer-encoding" not in given:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def raw_http(port: int, data: bytes) -> Answer:
    """Send bytes exactly as given (no client normalises them) and read the answer to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        try:
            writer.write(data)
            await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server answered (413) and stopped reading: the answer is still there
        raw = await asyncio.wait_for(reader.read(), 20.0)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return Answer(int(lines[0].split()[1]), headers, body)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One answer with a Content-Length body, without waiting for the connection to close."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    body = await reader.readexactly(int(headers.get("Content-Length", "0")))
    return Answer(int(lines[0].split()[1]), headers, body)


def port_of(daemon: Daemon) -> int:
    port = daemon.client.server.port
    assert port is not None
    return port


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = await start(tmp_path, clock=FakeClock())
    yield d
    await d.client.close()


def err(message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": message, "field": field}


LONG = "x" * 10_000
DEEP = '{"a":' * 9 + "1" + "}" * 9
JSON_CT = {"Content-Type": "application/json"}
FORM_CT = {"Content-Type": "application/x-www-form-urlencoded"}
GEN = "/webhooks/generic"


def jbody(**extra: Any) -> bytes:
    base: dict[str, Any] = {"conversion_id": "C1", "offer": "7", "affiliate": "42"}
    base.update(extra)
    return json.dumps(base).encode()


@dataclass
class Case:
    id: str
    method: str
    target: str
    status: int
    answer: dict[str, Any] | str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


CASES = [
    # SPEC 6: required fields
    Case("missing-conversion-id", "GET", f"{GEN}?offer=7&affiliate=42&status=approved", 400,
         err("required field missing", "conversion_id")),
    Case("missing-offer", "GET", f"{GEN}?conversion_id=C1&affiliate=42&status=approved", 400,
         err("required field missing", "offer")),
    Case("missing-affiliate", "GET", f"{GEN}?conversion_id=C1&offer=7&status=approved", 400,
         err("required field missing", "affiliate")),
    Case("missing-status", "GET", f"{GEN}?conversion_id=C1&offer=7&affiliate=42", 400,
         err("required field missing", "status")),
    Case("blank-id", "GET", f"{GEN}?conversion_id=%20&offer=7&affiliate=42&status=approved", 400,
         err("required field missing", "conversion_id")),
    # unknown status
    Case("unknown-status", "GET", f"{GEN}?conversion_id=C1&offer=7&affiliate=42&status=done", 400,
         err("unknown status value", "status")),
    # payout: not a finite decimal, negative
    Case("payout-nan", "GET", f"{GEN}?{OK_QUERY}&payout=NaN", 400,
         err("not a finite decimal number", "payout")),
    Case("payout-infinity", "GET", f"{GEN}?{OK_QUERY}&payout=Infinity", 400,
         err("not a finite decimal number", "payout")),
    Case("payout-1e999", "GET", f"{GEN}?{OK_QUERY}&payout=1e999", 400,
         err("not a finite decimal number", "payout")),
    Case("payout-text", "GET", f"{GEN}?{OK_QUERY}&payout=ten", 400,
         err("not a decimal number", "payout")),
    Case("payout-negative", "GET", f"{GEN}?{OK_QUERY}&payout=-1.5", 400,
         err("must not be negative", "payout")),
    Case("json-nan", "POST", GEN, 400, err("NaN is not a number"),
         b'{"conversion_id": "C1", "payout": NaN}', JSON_CT),
    Case("json-infinity", "POST", GEN, 400, err("-Infinity is not a number"),
         b'{"conversion_id": "C1", "payout": -Infinity}', JSON_CT),
    Case("json-1e999", "POST", GEN, 400, err("not a finite decimal number", "payout"),
         jbody(status="approved")[:-1] + b', "payout": 1e999}', JSON_CT),
    Case("revenue-nan", "GET", f"{GEN}?{OK_QUERY}&revenue=nan", 400,
         err("not a finite decimal number", "revenue")),
    # long values, control characters, lone surrogates
    Case("value-1025-query", "GET", f"{GEN}?{OK_QUERY}&sub1={'y' * 1025}", 400,
         err("value longer than 1024 characters", "sub1")),
    Case("value-10000-json", "POST", GEN, 400, err("value longer than 1024 characters", "sub1"),
         jbody(status="approved", sub1=LONG), JSON_CT),
    Case("value-10000-form", "POST", GEN, 400, err("value longer than 1024 characters", "sub1"),
         f"{OK_QUERY}&sub1={LONG}".encode(), FORM_CT),
    Case("value-10000-extra", "POST", GEN, 400, err("value longer than 1024 characters", "note"),
         jbody(status="approved", note=LONG), JSON_CT),
    Case("control-char-query", "GET", f"{GEN}?{OK_QUERY}&click_id=a%01b", 400,
         err("value contains control characters", "click_id")),
    Case("control-char-json", "POST", GEN, 400, err("value contains control characters", "offer"),
         b'{"conversion_id": "C1", "offer": "7\\u0000", "affiliate": "42"}', JSON_CT),
    Case("nul-in-name", "GET", f"{GEN}?{OK_QUERY}&a%00b=1", 400,
         err("parameter name contains control characters", "a\\x00b")),
    Case("surrogate-query", "GET", f"{GEN}?{OK_QUERY}&sub2=%ED%A0%80", 400,
         err("not valid UTF-8 (or a lone surrogate)", "sub2")),
    Case("surrogate-name-query", "GET", f"{GEN}?{OK_QUERY}&%ED%A0%80=1", 400,
         err("not valid UTF-8 (or a lone surrogate)")),
    Case("invalid-utf8-query", "GET", f"{GEN}?{OK_QUERY}&sub2=%FF", 400,
         err("not valid UTF-8 (or a lone surrogate)", "sub2")),
    Case("surrogate-json", "POST", GEN, 400, err("value contains a lone surrogate", "sub1"),
         jbody(status="approved")[:-1] + b', "sub1": "\\ud800"}', JSON_CT),
    Case("surrogate-json-key", "POST", GEN, 400,
         err("parameter name contains a lone surrogate", "\\ud800"),
         jbody(status="approved")[:-1] + b', "\\ud800": "x"}', JSON_CT),
    # parameters given twice
    Case("twice-query", "GET", f"{GEN}?{OK_QUERY}&offer=8", 400,
         err("parameter given twice with different values", "offer")),
    Case("twice-query-and-form", "POST", f"{GEN}?offer=8", 400,
         err("parameter given twice with different values", "offer"), OK_QUERY.encode(), FORM_CT),
    Case("twice-json-key", "POST", GEN, 400,
         err("parameter given twice with different values", "offer"),
         b'{"conversion_id": "C1", "offer": "7", "offer": "8"}', JSON_CT),
    Case("twice-json-flattened", "POST", GEN, 400,
         err("parameter given twice with different values", "a.b"),
         b'{"a.b": "1", "a": {"b": "2"}}', JSON_CT),
    # JSON shape
    Case("malformed-json", "POST", GEN, 400,
         err("malformed JSON: Expecting value at line 1 column 19"), b'{"conversion_id": ', JSON_CT),
    Case("json-array", "POST", GEN, 400, err("a JSON body must be an object"),
         b'[{"conversion_id": "C1"}]', JSON_CT),
    Case("json-scalar", "POST", GEN, 400, err("a JSON body must be an object"), b"42", JSON_CT),
    Case("json-string", "POST", GEN, 400, err("a JSON body must be an object"), b'"x"', JSON_CT),
    Case("json-null", "POST", GEN, 400, err("a JSON body must be an object"), b"null", JSON_CT),
    Case("json-too-deep", "POST", GEN, 400, err("JSON nested deeper than 8 levels"),
         DEEP.encode(), JSON_CT),
    Case("json-very-deep", "POST", GEN, 400, err("JSON nested deeper than 8 levels"),
         b"[" * 30000 + b"]" * 30000, JSON_CT),
    Case("json-not-utf8", "POST", GEN, 400, err("body is not valid UTF-8"),
         b'{"conversion_id": "\xff"}', JSON_CT),
    Case("json-empty-key", "POST", GEN, 400, err("a parameter has an empty name"),
         b'{"": "x"}', JSON_CT),
    Case("form-not-utf8", "POST", GEN, 400, err("body is not valid UTF-8"),
         b"conversion_id=\xff", FORM_CT),
    # content types, encodings, sizes
    Case("wrong-content-type", "POST", GEN, 415,
         err("content type 'text/plain' is not accepted; send application/json or "
             "application/x-www-form-urlencoded"), OK_QUERY.encode(), {"Content-Type": "text/plain"}),
    Case("no-content-type", "POST", GEN, 415,
         err("content type 'application/octet-stream' is not accepted; send application/json or "
             "application/x-www-form-urlencoded"), b"{}"),
    Case("latin1-charset", "POST", GEN, 415, err("only UTF-8 bodies are accepted"),
         OK_QUERY.encode(), {"Content-Type": "application/x-www-form-urlencoded; charset=latin-1"}),
    Case("gzip-body", "POST", GEN, 415, err("compressed bodies are not accepted"),
         gzip.compress(jbody(status="approved")), {**JSON_CT, "Content-Encoding": "gzip"}),
    Case("empty-body", "POST", GEN, 400, err("required field missing", "conversion_id"), b"",
         JSON_CT),
    Case("65k-body", "POST", GEN, 413, err("body over 64 KiB"), b"{" + b" " * 65536 + b"}",
         JSON_CT),
    Case("10mib-body", "POST", GEN, 413, err("body over 64 KiB"), b"a" * (10 * 1024 * 1024),
         FORM_CT),
    Case("chunked-over-64k", "POST", GEN, 413, err("body over 64 KiB"),
         b"".join(b"4000\r\n" + b"a" * 0x4000 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n",
         {**FORM_CT, "Transfer-Encoding": "chunked"}),
    Case("too-many-params", "GET", f"{GEN}?" + "&".join(f"p{i}=1" for i in range(201)), 400,
         err("more than 200 parameters")),
    Case("long-name", "GET", f"{GEN}?{OK_QUERY}&{'n' * 129}=1", 400,
         err("parameter name longer than 128 characters", "n" * 64)),
    Case("empty-name", "GET", f"{GEN}?{OK_QUERY}&=1", 400, err("a parameter has an empty name")),
    Case("currency", "GET", f"{GEN}?{OK_QUERY}&currency=dollars", 400,
         err("not an ISO 4217 currency code", "currency")),
    Case("event-time", "GET", f"{GEN}?{OK_QUERY}&event_time=yesterday", 400,
         err("not an ISO 8601 time or unix seconds", "event_time")),
    # routing
    Case("unknown-source", "GET", f"/webhooks/nope?{OK_QUERY}", 404, err("unknown source")),
    Case("method", "PUT", f"{GEN}?{OK_QUERY}", 405, "405: Method Not Allowed", b""),
    # text sources answer in text
    Case("text-source", "GET", "/webhooks/plain?offer=7", 400,
         "ERROR required field missing"),
    # Standard Webhooks: malformed and expired signatures
    Case("hmac-missing", "POST", "/webhooks/signed", 401, err("missing webhook-id header",
         "webhook-id"), jbody(status="approved"), JSON_CT),
    Case("hmac-v1garbage", "POST", "/webhooks/signed", 401,
         err("malformed webhook-signature header", "webhook-signature"), jbody(status="approved"),
         {**JSON_CT, "webhook-id": "m1", "webhook-timestamp": "1790000000",
          "webhook-signature": "v1garbage"}),
    Case("hmac-bad-base64", "POST", "/webhooks/signed", 401,
         err("malformed webhook-signature header", "webhook-signature"), jbody(status="approved"),
         {**JSON_CT, "webhook-id": "m1", "webhook-timestamp": "1790000000",
          "webhook-signature": "v1,not*base64"}),
    Case("hmac-timestamp-text", "POST", "/webhooks/signed", 401,
         err("malformed webhook-timestamp header", "webhook-timestamp"), jbody(status="approved"),
         {**JSON_CT, "webhook-id": "m1", "webhook-timestamp": "soon",
          "webhook-signature": sign(SIGNING_KEY, "m1", "soon", jbody(status="approved"))}),
    Case("hmac-expired", "POST", "/webhooks/signed", 401,
         err("webhook-timestamp is more than 300 s from our clock", "webhook-timestamp"),
         jbody(status="approved"),
         {**JSON_CT, "webhook-id": "m1", "webhook-timestamp": "1789999699",
          "webhook-signature": sign(SIGNING_KEY, "m1", "1789999699", jbody(status="approved"))}),
    Case("hmac-future", "POST", "/webhooks/signed", 401,
         err("webhook-timestamp is more than 300 s from our clock", "webhook-timestamp"),
         jbody(status="approved"),
         {**JSON_CT, "webhook-id": "m1", "webhook-timestamp": "1790000301",
          "webhook-signature": sign(SIGNING_KEY, "m1", "1790000301", jbody(status="approved"))}),
    Case("hmac-tampered", "POST", "/webhooks/signed", 401,
         err("no valid signature", "webhook-signature"), jbody(status="rejected"),
         {**JSON_CT, "webhook-id": "m1", "webhook-timestamp": "1790000000",
          "webhook-signature": sign(SIGNING_KEY, "m1", "1790000000", jbody(status="approved"))}),
    Case("token-missing", "GET", f"/webhooks/tokened?{OK_QUERY}", 401,
         err("missing credentials", "key")),
    Case("token-wrong", "GET", f"/webhooks/tokened?{OK_QUERY}&key=guess", 401,
         err("invalid credentials", "key")),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_input_gets_its_status_and_error_and_stores_nothing(
    daemon: Daemon, tmp_path: Path, case: Case
) -> None:
    answer = await raw_http(
        port_of(daemon), request_bytes(case.method, case.target, case.body, case.headers)
    )
    assert answer.status == case.status, answer.body[:300]
    if isinstance(case.answer, str):
        assert answer.body.decode() == case.answer
    else:
        assert answer.headers["Content-Type"].startswith("application/json")
        assert answer.json() == case.answer
    assert stored(tmp_path) == (0, 0)
    assert (await daemon.client.get("/healthz")).status == 200


async def test_the_same_parameter_twice_with_the_same_value_is_accepted(
    daemon: Daemon, tmp_path: Path
) -> None:
    target = f"{GEN}?{OK_QUERY}&offer=7"
    answer = await raw_http(
        port_of(daemon), request_bytes("POST", target, b"offer=7&sub1=a%20b", FORM_CT)
    )
    assert answer.status == 200
    assert answer.json() == {
        "status": "accepted",
        "conversion_id": "C1",
        "transition": "new",
        "deliveries": 0,
    }
    row = await daemon.services.store.get_conversion("generic", "C1")
    assert row is not None
    assert row.fields["sub1"] == "a b"
    assert row.fields["offer"] == "7"
    assert stored(tmp_path) == (1, 1)


async def test_json_objects_flatten_to_dotted_names_and_arrays_to_json_text(
    daemon: Daemon,
) -> None:
    body = {
        "conversion_id": "J1",
        "offer": 7,
        "affiliate": 42,
        "status": "pending",
        "payout": 2.50,
        "meta": {"a": {"b": True}, "list": [1, {"x": None}]},
        "empty": None,
    }
    resp = await daemon.client.post(GEN, json=body)
    assert resp.status == 200, await resp.text()
    row = await daemon.services.store.get_conversion("generic", "J1")
    assert row is not None
    assert row.fields["payout"] == "2.5"
    assert row.fields["extra"] == {
        "meta.a.b": "true",
        "meta.list": '[1,{"x":null}]',
        "empty": "",
    }


async def test_a_replayed_signature_is_refused_and_not_stored_again(
    daemon: Daemon, tmp_path: Path
) -> None:
    body = jbody(status="approved")
    headers = {
        **JSON_CT,
        "webhook-id": "msg_1",
        "webhook-timestamp": "1790000000",
        "webhook-signature": sign(SIGNING_KEY, "msg_1", "1790000000", body),
    }
    port = port_of(daemon)
    first = await raw_http(port, request_bytes("POST", "/webhooks/signed", body, headers))
    assert first.status == 200
    assert first.json()["transition"] == "new"
    assert stored(tmp_path) == (1, 1)
    again = await raw_http(port, request_bytes("POST", "/webhooks/signed", body, headers))
    assert again.status == 401
    assert again.json() == err("webhook-id already accepted (replay)", "webhook-id")
    assert stored(tmp_path) == (1, 1)


async def test_a_store_that_cannot_commit_answers_503_and_frees_the_webhook_id(
    daemon: Daemon, tmp_path: Path
) -> None:
    body = jbody(status="approved")
    headers = {
        **JSON_CT,
        "webhook-id": "msg_2",
        "webhook-timestamp": "1790000000",
        "webhook-signature": sign(SIGNING_KEY, "msg_2", "1790000000", body),
    }
    store = daemon.services.store
    await store.close()  # the store is gone: the tracker must be told to retry
    answer = await raw_http(
        port_of(daemon), request_bytes("POST", "/webhooks/signed", body, headers)
    )
    assert answer.status == 503
    assert answer.json() == err("store unavailable, retry later")
    await store.open()
    retry = await raw_http(
        port_of(daemon), request_bytes("POST", "/webhooks/signed", body, headers)
    )
    assert retry.status == 200, retry.body  # the retry of the same message is not a replay
    assert stored(tmp_path) == (1, 1)


async def test_a_body_trickled_past_the_read_timeout_gets_408(tmp_path: Path) -> None:
    daemon = await start(tmp_path, settings={"inbound": {"read_timeout": 0.5}})
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(daemon))
        head = request_bytes("POST", GEN, None, {**FORM_CT, "Content-Length": "1000"})
        writer.write(head + b"conversion_id=")
        await writer.drain()
        answer = await asyncio.wait_for(read_answer(reader), 10)
        writer.close()
        assert answer.status == 408
        assert answer.headers["Connection"] == "close"
        assert answer.json() == err("body not received within 0.5 s")
        assert stored(tmp_path) == (0, 0)
    finally:
        await daemon.client.close()
