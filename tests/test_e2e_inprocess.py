"""End to end in-process: a tracker-style webhook through the rules to a loopback sink."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from daemon.store.base import DeliveryState
from tests.harness import Sink, lifecycle_rules, start_daemon, wait_for


async def test_tracker_get_reaches_the_sink_with_the_rendered_url(
    tmp_path: Path, sink: Sink
) -> None:
    daemon = await start_daemon(tmp_path, {"offer-7.yaml": lifecycle_rules(sink)})
    try:
        with capture_logs() as logs:
            answer = await daemon.post(
                conversion_id="T 1",
                offer=7,
                affiliate=42,
                status="approved",
                payout="12.50",
                click_id="a&b=c",
            )
            assert answer == {
                "status": "accepted",
                "conversion_id": "T 1",
                "transition": "new",
                "deliveries": 1,
            }
            await wait_for(lambda: sink.received)
            await wait_for(lambda: [e for e in logs if e["event"] == "delivery_attempt"])
        got = sink.received[0]
        assert got.method == "GET"
        assert got.path_qs == "/done?cid=a%26b%3Dc&payout=12.50&tx=T%201"
        assert got.headers["Idempotency-Key"] == "generic:T 1:1:12"
        rows = await daemon.deliveries()
        assert [(r.postback_id, r.state) for r in rows] == [(12, DeliveryState.SUCCEEDED)]
        detail = await daemon.services.store.get_delivery(rows[0].delivery_id)
        assert detail is not None
        (attempt,) = detail.attempts
        assert attempt.outcome == "succeeded"
        assert attempt.response_status == 200
        assert attempt.request is not None
        assert attempt.request["url"].endswith("/done?cid=a%26b%3Dc&payout=12.50&tx=T%201")
        assert attempt.rules_version == str(daemon.services.reloader.runtime.rules.version)
        received = [e for e in logs if e["event"] == "conversion_received"]
        assert received[0]["transition"] == "new"
        assert received[0]["deliveries"] == 1
        line = next(e for e in logs if e["event"] == "delivery_attempt")
        assert line["outcome"] == "succeeded"
        assert line["postback_id"] == 12
        assert line["delivery_id"] == rows[0].delivery_id
        assert line["action"] == "ping_url"
        assert isinstance(line["duration_ms"], int)
        assert line["rules_version"]
    finally:
        await daemon.client.close()


async def test_repeated_webhook_sends_nothing_more(tmp_path: Path, sink: Sink) -> None:
    daemon = await start_daemon(tmp_path, {"offer-7.yaml": lifecycle_rules(sink)})
    try:
        params = dict(conversion_id="R1", offer=7, affiliate=42, status="approved")
        assert (await daemon.post(**params))["transition"] == "new"
        await wait_for(lambda: len(sink.received) == 1)
        for _ in range(3):
            again = await daemon.post(**params)
            assert again["transition"] == "duplicate"
            assert again["deliveries"] == 0
        await daemon.services.dispatcher.dispatch_once()
        await daemon.services.dispatcher.drain()
        assert len(sink.received) == 1
        assert len(await daemon.deliveries()) == 1
    finally:
        await daemon.client.close()


async def test_pending_then_approved_then_rejected_fire_once_each(
    tmp_path: Path, sink: Sink
) -> None:
    daemon = await start_daemon(tmp_path, {"offer-7.yaml": lifecycle_rules(sink)})
    try:
        base = dict(conversion_id="S1", offer=7, affiliate=42, click_id="c1")
        transitions = []
        for status in ("pending", "approved", "rejected", "rejected"):
            transitions.append((await daemon.post(status=status, **base))["transition"])
        assert transitions == ["new", "status_changed", "status_changed", "duplicate"]
        await wait_for(lambda: len(sink.received) == 3)
        await daemon.services.dispatcher.drain()
        paths = sorted(r.path_qs for r in sink.received)
        assert paths == ["/done?cid=c1&payout=&tx=S1", "/pending?tx=S1", "/reject?tx=S1"]
        keys = sorted(r.headers["Idempotency-Key"] for r in sink.received)
        assert keys == ["generic:S1:1:11", "generic:S1:2:12", "generic:S1:3:13"]
    finally:
        await daemon.client.close()


async def test_status_change_with_only_id_and_status_renders_stored_fields(
    tmp_path: Path, sink: Sink
) -> None:
    daemon = await start_daemon(tmp_path, {"offer-7.yaml": lifecycle_rules(sink)})
    try:
        await daemon.post(
            conversion_id="M1", offer=7, affiliate=42, status="pending", click_id="kept", payout="3"
        )
        await daemon.post(conversion_id="M1", offer=7, affiliate=42, status="approved")
        await wait_for(lambda: any(r.path_qs.startswith("/done") for r in sink.received))
        done = next(r for r in sink.received if r.path_qs.startswith("/done"))
        assert done.path_qs == "/done?cid=kept&payout=3&tx=M1"
    finally:
        await daemon.client.close()
