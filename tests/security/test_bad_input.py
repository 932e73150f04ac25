"""Issue 13 items 4 and 11, as the attack: times that overflow once moved to UTC, ids in Unicode
digits on the API's paths, CR/LF (any control character) in inbound values, payouts in digits
Python reads but trackers never write. Each is a 4xx with a clear message, never a 5xx, and
nothing is stored."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import Daemon
from tests.security.support import conversions, start

ADMIN = "admin-token-0123456789"
TOKENS = [
    {"name": "ops", "token_sha256": hashlib.sha256(ADMIN.encode()).hexdigest(), "role": "admin"}
]
BASE = {"conversion_id": "B1", "offer": "1", "affiliate": "7", "status": "approved"}


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = await start(tmp_path, settings={"api": {"tokens": TOKENS}})
    yield d
    await d.client.close()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0001-01-01T00:00:00+14:00", "time out of range (years 1 to 9999 in UTC)"),
        ("9999-12-31T23:59:59-14:00", "time out of range (years 1 to 9999 in UTC)"),
        ("0001-01-01T00:00:00+23:59", "time out of range (years 1 to 9999 in UTC)"),
        ("١٧٠٠٠٠٠٠٠٠", "not an ISO 8601 time or unix seconds"),  # Arabic-Indic digits
        ("999999999999", "not an ISO 8601 time or unix seconds"),
    ],
)
async def test_event_times_out_of_range_are_a_400(
    daemon: Daemon, tmp_path: Path, value: str, message: str
) -> None:
    resp = await daemon.client.get("/webhooks/generic", params={**BASE, "event_time": value})
    assert resp.status == 400
    assert await resp.json() == {"error": message, "field": "event_time"}
    assert conversions(tmp_path) == []


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/postbacks/%C2%B2",  # '²'.isdigit() is true; int('²') raised
        "/api/v1/postbacks/%D9%A3",  # Arabic-Indic three
        "/api/v1/postbacks/%EF%BC%91",  # fullwidth one
        "/api/v1/postbacks/1%0A",
        "/api/v1/postbacks/" + "9" * 40,
        "/api/v1/deliveries/%C2%B2",
        "/api/v1/deliveries/abc%0A",
        "/api/v1/deliveries/%F0%9D%9F%8F",  # mathematical bold digit one
    ],
)
async def test_path_ids_in_unicode_digits_are_a_404(daemon: Daemon, path: str) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    resp = await daemon.client.get(path, headers=headers)
    assert resp.status == 404
    assert (await resp.json())["error"].startswith("no ")
    if path.startswith("/api/v1/deliveries/"):
        retry = await daemon.client.post(path + "/retry", headers=headers)
        assert retry.status == 404


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("click_id", "abc\r\nX-Injected: 1"),
        ("email", "a@b.c\n"),
        ("sub1", "x\ty"),
        ("offer", "1\r"),
        ("sub2", "\x85next-line"),
        ("extra_note", "line\nbreak"),
    ],
)
async def test_control_characters_in_values_are_a_400(
    daemon: Daemon, tmp_path: Path, field: str, value: str
) -> None:
    resp = await daemon.client.get("/webhooks/generic", params={**BASE, field: value})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "value contains control characters"
    json_resp = await daemon.client.post("/webhooks/generic", json={**BASE, field: value})
    assert json_resp.status == 400
    assert conversions(tmp_path) == []


@pytest.mark.parametrize("value", ["٣", "1_000", "１２", "³", "1 000", "0x10", "12,50"])
@pytest.mark.parametrize("field", ["payout", "revenue"])
async def test_payouts_in_anything_but_ascii_decimal_are_a_400(
    daemon: Daemon, tmp_path: Path, field: str, value: str
) -> None:
    resp = await daemon.client.get("/webhooks/generic", params={**BASE, field: value})
    assert resp.status == 400
    assert (await resp.json())["field"] == field
    assert conversions(tmp_path) == []
