"""Issue 13 item 1, as the attack: Standard Webhooks signs `{id}.{timestamp}.{body}`, so with
`hmac` a query string (which no signature covers) must never become conversion fields, and a
signed message that was refused must not come back, changed or not."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.auth import sign
from tests.harness import Daemon, FakeClock
from tests.security.support import SIGNED, SIGNING_KEY, conversions, start

STAMP = "1790000000"  # FakeClock's now
FORGED = "conversion_id=forged&offer=1&affiliate=7&status=approved&payout=5000"


def signed_headers(msg_id: str, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": STAMP,
        "webhook-signature": sign(SIGNING_KEY, msg_id, STAMP, body),
    }


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = await start(tmp_path, sources=SIGNED)
    yield d
    await d.client.close()


async def test_a_query_beside_a_valid_signature_over_an_empty_body_is_refused(
    daemon: Daemon, tmp_path: Path
) -> None:
    resp = await daemon.client.get(
        f"/webhooks/signed?{FORGED}", headers=signed_headers("msg_forged", b"")
    )
    assert resp.status == 400
    body = await resp.json()
    assert body["field"] == "query"
    assert "not covered by the signature" in body["error"]
    assert conversions(tmp_path) == []


async def test_a_query_beside_a_signed_json_body_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    body = json.dumps(
        {"conversion_id": "C1", "offer": "1", "affiliate": "7", "status": "pending"}
    ).encode()
    resp = await daemon.client.post(
        "/webhooks/signed?payout=5000&sub1=forged",  # nothing the body says: no conflict
        data=body,
        headers={**signed_headers("msg_1", body), "Content-Type": "application/json"},
    )
    assert resp.status == 400
    assert conversions(tmp_path) == []
    # The same message as it was signed is still welcome: the refusal reserved nothing.
    resp = await daemon.client.post(
        "/webhooks/signed",
        data=body,
        headers={**signed_headers("msg_1", body), "Content-Type": "application/json"},
    )
    assert resp.status == 200, await resp.text()
    assert conversions(tmp_path) == [("C1", "pending")]


async def test_a_refused_signed_message_cannot_be_replayed_with_changes(
    daemon: Daemon, tmp_path: Path
) -> None:
    # A captured message the daemon refused for what it says (no conversion_id)...
    body = b"offer=1&affiliate=7&status=pending"
    headers = {
        **signed_headers("msg_captured", body),
        "Content-Type": "application/x-www-form-urlencoded",
    }
    first = await daemon.client.post("/webhooks/signed", data=body, headers=headers)
    assert first.status == 400
    # ...replayed with the missing fields added in the query: refused...
    resp = await daemon.client.post(f"/webhooks/signed?{FORGED}", data=body, headers=headers)
    assert resp.status == 400
    # ...and replayed as it was: the webhook-id stays spent.
    again = await daemon.client.post("/webhooks/signed", data=body, headers=headers)
    assert again.status == 401
    assert (await again.json())["error"] == "webhook-id already accepted (replay)"
    assert conversions(tmp_path) == []


async def test_a_rate_limited_signed_message_may_come_back_unchanged(tmp_path: Path) -> None:
    clock = FakeClock()
    source = {
        "limited.yaml": "auth: {hmac: {secret: hook_key}}\nrate_limit: {requests: 1, per: 60s}\n"
    }
    daemon = await start(tmp_path, sources=source, clock=clock)
    try:
        ct = {"Content-Type": "application/x-www-form-urlencoded"}
        first = b"conversion_id=L1&offer=1&affiliate=7&status=pending"
        ok = await daemon.client.post(
            "/webhooks/limited", data=first, headers={**signed_headers("m1", first), **ct}
        )
        assert ok.status == 200, await ok.text()
        second = b"conversion_id=L2&offer=1&affiliate=7&status=pending"
        headers = {**signed_headers("m2", second), **ct}
        limited = await daemon.client.post("/webhooks/limited", data=second, headers=headers)
        assert limited.status == 429
        clock.advance(61)  # the sender retries after Retry-After: its id was freed
        retry = await daemon.client.post("/webhooks/limited", data=second, headers=headers)
        assert retry.status == 200, await retry.text()
        assert conversions(tmp_path) == [("L1", "pending"), ("L2", "pending")]
    finally:
        await daemon.client.close()
