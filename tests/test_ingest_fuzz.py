"""Fuzzing the front door: whatever the query string, form or JSON body and headers (dates at
any offset, numbers in any Unicode digit class), a webhook never gets a 5xx, nor does an API path
parameter, and the daemon keeps serving. Requests go over a real loopback socket with
http.client from a worker thread while the daemon runs on the test's event loop."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.models import CANONICAL_FIELDS
from tests.harness import start_daemon

KEY = b"fuzz-key-0123456789abcdef"
ENVIRON = {
    "POSTBACKD_SECRET_HOOK_KEY": "whsec_" + base64.b64encode(KEY).decode(),
    "POSTBACKD_SECRET_TOKEN": "t0ken",
    "POSTBACKD_SECRET_PASSWORD": "pa55",
}
SOURCE_FILES = {
    "signed.yaml": "auth: {hmac: {secret: hook_key}}\n",
    "tokened.yaml": "auth: {token: {param: key, secret: token}}\n",
    "basic.yaml": "auth: {basic: {username: tracker, secret: password}}\n",
    "proxied.yaml": "allow_ips: [198.51.100.0/24]\ntrusted_proxies: [127.0.0.0/8]\n",
    "everflow.yaml": "preset: everflow\nresponse: text\n",
    "limited.yaml": "rate_limit: {requests: 1000000, per: 1s}\n",
}
SOURCES = ["generic", "nope", *(name.removesuffix(".yaml") for name in SOURCE_FILES)]
NAMES = st.sampled_from(
    [*CANONICAL_FIELDS, "key", "transaction_id", "offer_id", "status", "a.b", "extra"]
) | st.text(max_size=12)
VALUES = (
    st.text(max_size=40)
    | st.sampled_from(["approved", "pending", "rejected", "NaN", "-1", "1e999", "12.50", ""])
    | st.integers().map(str)
)
TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=20)
HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
HEADERS = st.dictionaries(
    st.sampled_from(
        [
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
            "Authorization",
            "X-Postback-Token",
            "X-Forwarded-For",
            "Content-Type",
            "Content-Encoding",
        ]
    )
    | TOKEN,
    HEADER_VALUE
    | st.sampled_from(["v1,AAAA", "v1garbage", "Basic dHJhY2tlcjpwYTU1", "198.51.100.9, ::1"])
    | st.binary(max_size=40).map(lambda b: "v1," + base64.b64encode(b).decode()),
    max_size=5,
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20) | VALUES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NAMES, inner, max_size=6),
    max_leaves=30,
)


def encode_pairs(pairs: list[tuple[bytes, bytes]], raw_tail: str) -> str:
    return "&".join(f"{quote_from_bytes(k)}={quote_from_bytes(v)}" for k, v in pairs) + raw_tail


PAIRS = st.lists(
    st.tuples(
        NAMES.map(lambda s: s.encode("utf-8", "surrogatepass")) | st.binary(max_size=8),
        VALUES.map(lambda s: s.encode("utf-8", "surrogatepass")) | st.binary(max_size=20),
    ),
    max_size=12,
)
RAW_TAIL = st.text(alphabet="%&=+;abcXYZ019", max_size=12)
BASE = {"conversion_id": "F1", "offer": "1", "affiliate": "2", "status": "approved"}
BASE_QUERY = "&".join(f"{k}={v}" for k, v in BASE.items()) + "&"


# Dates: ISO times at every offset a datetime can carry (year 1 at +14:00 overflowed once in
# UTC), unix seconds, and digits of every Unicode decimal class (Nd) where ASCII ones belong.
DIGIT = st.characters(categories=["Nd"])
OFFSETS = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda m: f"{'+' if m >= 0 else '-'}{abs(m) // 60:02d}:{abs(m) % 60:02d}"
)
ISO_TIMES = st.tuples(st.datetimes(), OFFSETS | st.sampled_from(["Z", ""])).map(
    lambda t: t[0].isoformat() + t[1]
)
DIGIT_RUNS = st.lists(DIGIT, min_size=1, max_size=14).map("".join)
DATES = (
    ISO_TIMES
    | st.integers(min_value=0, max_value=10**13).map(str)
    | st.tuples(DIGIT_RUNS, DIGIT_RUNS).map(lambda t: f"{t[0]}.{t[1]}")
    | st.sampled_from(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "-1", "1e9"])
    | ISO_TIMES.map(
        lambda text: "".join(chr(0x660 + int(c)) if c.isdigit() else c for c in text)
    )  # the same time in Arabic-Indic digits
)
# Numbers: every decimal digit class of Unicode, separators and exponents Python accepts.
NUMBERS = (
    DIGIT_RUNS
    | st.tuples(DIGIT_RUNS, st.sampled_from([".", "_", "e", "E+", ",", " "]), DIGIT_RUNS).map(
        "".join
    )
    | st.decimals(allow_nan=True, allow_infinity=True).map(str)
    | st.sampled_from(["٣", "1_000", "１２", "³", "0x10", "1e999", "-0", ".5", "5."])
)
# The API's path parameters: ids in any script, encoded or not, over-long, with separators.
ADMIN_TOKEN = "fuzz-admin-token-0123456789"
AFFILIATE_TOKEN = "fuzz-affiliate-token-0123456789"
API_TOKENS = [
    {"name": "ops", "token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest(),
     "role": "admin"},
    {"name": "a42", "token_sha256": hashlib.sha256(AFFILIATE_TOKEN.encode()).hexdigest(),
     "role": "affiliate", "affiliate": 42},
]  # fmt: skip
API_ROUTES = [
    ("GET", "/api/v1/postbacks/{}"),
    ("GET", "/api/v1/deliveries/{}"),
    ("POST", "/api/v1/deliveries/{}/retry"),
    ("PATCH", "/api/v1/postbacks/{}"),
    ("DELETE", "/api/v1/postbacks/{}"),
    ("POST", "/api/v1/postbacks/{}/status"),
    ("GET", "/api/v1/postbacks/{}/history"),
    ("PUT", "/api/v1/affiliate/secrets/{}"),
    ("DELETE", "/api/v1/affiliate/secrets/{}"),
]
PATH_SEGMENTS = (
    DIGIT_RUNS.map(lambda s: s.encode())
    | st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass"))
    | st.binary(min_size=1, max_size=30)
    | st.integers(min_value=-(10**30), max_value=10**30).map(lambda n: str(n).encode())
)

SEEN: set[int] = set()


def send(port: int, method: str, target: str, body: bytes, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if method == "POST" and "content-length" not in {k.lower() for k in headers}:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body if method == "POST" else None)
        response = conn.getresponse()
        response.read()
        SEEN.add(response.status)
        return response.status
    finally:
        conn.close()


def fuzz(port: int) -> None:
    common = settings(
        max_examples=250,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )

    @common
    @given(
        source=st.sampled_from(SOURCES),
        method=st.sampled_from(["GET", "POST"]),
        pairs=PAIRS,
        tail=RAW_TAIL,
        headers=HEADERS,
        base=st.booleans(),
    )
    def query_and_headers(
        source: str, method: str, pairs: Any, tail: str, headers: dict[str, str], base: bool
    ) -> None:
        target = f"/webhooks/{source}?{BASE_QUERY if base else ''}{encode_pairs(pairs, tail)}"
        status = send(port, method, target, b"", headers)
        assert status < 500, (target, headers)

    @common
    @given(
        source=st.sampled_from(SOURCES),
        pairs=PAIRS,
        tail=RAW_TAIL,
        raw=st.binary(max_size=64),
        headers=HEADERS,
        use_raw=st.booleans(),
    )
    def form_bodies(
        source: str, pairs: Any, tail: str, raw: bytes, headers: dict[str, str], use_raw: bool
    ) -> None:
        body = raw if use_raw else encode_pairs(pairs, tail).encode()
        headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
        status = send(port, "POST", f"/webhooks/{source}", body, headers)
        assert status < 500, (body, headers)

    @common
    @given(
        source=st.sampled_from(SOURCES),
        value=JSON_VALUES,
        conversion=st.dictionaries(NAMES, VALUES, max_size=10),
        raw=st.binary(max_size=64),
        which=st.sampled_from(["value", "conversion", "raw"]),
        headers=HEADERS,
    )
    def json_bodies(
        source: str,
        value: Any,
        conversion: dict[str, str],
        raw: bytes,
        which: str,
        headers: dict[str, str],
    ) -> None:
        if which == "raw":
            body = raw
        else:
            chosen = value if which == "value" else {**BASE, **conversion}
            body = json.dumps(chosen, allow_nan=True, ensure_ascii=False).encode(
                "utf-8", "surrogatepass"
            )
        headers = {**headers, "Content-Type": "application/json"}
        status = send(port, "POST", f"/webhooks/{source}", body, headers)
        assert status < 500, (body, headers)

    @common
    @given(
        source=st.sampled_from(["generic", "everflow", "limited"]),
        name=st.sampled_from(["event_time", "payout", "revenue", "offer", "sub1"]),
        value=DATES | NUMBERS,
        json_body=st.booleans(),
    )
    def dates_and_numbers(source: str, name: str, value: str, json_body: bool) -> None:
        params = {**BASE, name: value}
        if json_body:
            body = json.dumps(params, ensure_ascii=False).encode("utf-8", "surrogatepass")
            headers = {"Content-Type": "application/json"}
            status = send(port, "POST", f"/webhooks/{source}", body, headers)
        else:
            target = f"/webhooks/{source}?" + encode_pairs(
                [(k.encode(), v.encode("utf-8", "surrogatepass")) for k, v in params.items()], ""
            )
            status = send(port, "GET", target, b"", {})
        assert status < 500, (name, value)

    @common
    @given(
        route=st.sampled_from(API_ROUTES),
        segment=PATH_SEGMENTS,
        admin=st.booleans(),
    )
    def api_path_parameters(route: tuple[str, str], segment: bytes, admin: bool) -> None:
        method, template = route
        target = template.format(quote_from_bytes(segment, safe=""))
        token = ADMIN_TOKEN if admin else AFFILIATE_TOKEN
        status = send(port, method, target, b"", {"Authorization": f"Bearer {token}"})
        assert status < 500, target

    query_and_headers()
    form_bodies()
    json_bodies()
    dates_and_numbers()
    api_path_parameters()


async def test_no_input_gets_a_5xx(tmp_path: Path) -> None:
    hooks = tmp_path / "webhooks"
    hooks.mkdir()
    for name, text in SOURCE_FILES.items():
        (hooks / name).write_text(text)
    daemon = await start_daemon(
        tmp_path, {}, dispatch=False, environ=ENVIRON, settings={"api": {"tokens": API_TOKENS}}
    )
    try:
        port = daemon.client.server.port
        assert port is not None
        await asyncio.to_thread(fuzz, port)
        assert {200, 400, 401, 403, 404, 415} <= SEEN  # the fuzz reached every stage
        assert not {s for s in SEEN if s >= 500}
        assert (await daemon.client.get("/healthz")).status == 200
        resp = await daemon.client.get(
            "/webhooks/generic",
            params={"conversion_id": "after", "offer": "1", "affiliate": "2", "status": "pending"},
        )
        assert resp.status == 200
    finally:
        await daemon.client.close()
