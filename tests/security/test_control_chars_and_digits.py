"""Issue 13 item 11, as the attack: CR/LF (any control character) in inbound values, and
payouts in digits Python reads but trackers never write (`٣`, `1_000`: conditions saw 3 and
1000 while the `{payout}` macro sent the text). Each is a 400 naming the field, and nothing is
stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import Daemon
from tests.security.support import conversions, start

BASE = {"conversion_id": "B1", "offer": "1", "affiliate": "7", "status": "approved"}


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = await start(tmp_path)
    yield d
    await d.client.close()


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
