"""Issue 13 item 4, as the attack: times that overflow once moved to UTC (year 1 at +14:00,
year 9999 at -14:00) and ids in Unicode digits on the API's paths (`'²'.isdigit()` is true, and
int() of it raised: a 500). Each is a 4xx with a clear message, never a 5xx, and nothing is
stored."""

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
