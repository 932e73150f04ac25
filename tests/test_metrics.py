"""`/metrics` read with the Prometheus client's own parser, scraped before and after conversions
flow through the daemon to loopback sinks: every counter of SPEC 14 moves by what happened."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import Metrics, QueueDepth
from daemon.store.base import DeliveryState
from tests.harness import Daemon, Sink, start_daemon, wait_for

Key = tuple[str, frozenset[tuple[str, str]]]


def parse(text: str) -> dict[Key, float]:
    """Every sample, keyed by its name and labels."""
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Mapping[Key, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(daemon: Daemon) -> dict[Key, float]:
    resp = await daemon.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return parse(await resp.text())


def rules(sink: Sink, refusing: Sink, failing: Sink) -> dict[str, str]:
    def pb(pid: int, trigger: str, url: str) -> str:
        return f"""
  - id: {pid}
    trigger: {trigger}
    affiliate: "*"
    action: {{type: ping_url, url: "{url}/pb{pid}?tx={{conversion_id}}"}}"""

    return {
        "o.yaml": "offer: 5\npostbacks:"
        + pb(1, "conversion_done", sink.url)
        + pb(2, "conversion_reject", refusing.url)
        + pb(3, "conversion_pending", failing.url)
        + "\n  - {id: 4, trigger: conversion_done, affiliate: 1, status: disabled,"
        + f' action: {{type: ping_url, url: "{sink.url}/off"}}}}\n'
    }


async def test_counters_move_as_conversions_flow(tmp_path: Path, sink: Sink) -> None:
    refusing, failing = await Sink().start(), await Sink().start()
    refusing.script = [(400, "no such offer", {})]  # not retried: dead
    failing.script = [(503, "busy", {})]  # retried later
    daemon = await start_daemon(tmp_path, rules(sink, refusing, failing))
    # Every scrape recounts the final states here (by default a recount waits at least 10 s:
    # test_queue_depth_recounts_the_final_states_when_due).
    daemon.services.metrics.depth = QueueDepth(min_every=0.0, spacing=0.0)
    try:
        before = await scrape(daemon)
        version = str(daemon.services.reloader.runtime.rules.version)
        assert value(before, "postbackd_rules_info", version=version) == 1
        assert value(before, "postbackd_postbacks_loaded", status="active") == 3
        assert value(before, "postbackd_postbacks_loaded", status="disabled") == 1

        for cid, status in [("A", "approved"), ("B", "approved"), ("A", "approved")]:
            await daemon.post(conversion_id=cid, offer=5, affiliate=9, status=status)
        await daemon.post(conversion_id="B", offer=5, affiliate=9, status="rejected")
        await daemon.post(conversion_id="C", offer=5, affiliate=9, status="pending")
        assert (await daemon.client.get("/webhooks/nosuch?conversion_id=x")).status == 404
        assert (await daemon.client.get("/no/such/route/x9")).status == 404
        await wait_for(lambda: len(sink.received) == 2 and refusing.received and failing.received)
        await daemon.services.dispatcher.drain()
        after = await scrape(daemon)
    finally:
        await daemon.client.close()
        await refusing.close()
        await failing.close()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("postbackd_conversions_total", source="generic", transition="new") == 3
    assert moved("postbackd_conversions_total", source="generic", transition="duplicate") == 1
    assert moved("postbackd_conversions_total", source="generic", transition="status_changed") == 1
    assert moved("postbackd_deliveries_total", action="ping_url", outcome="succeeded") == 2
    assert moved("postbackd_deliveries_total", action="ping_url", outcome="dead") == 1
    assert moved("postbackd_deliveries_total", action="ping_url", outcome="retry") == 1
    assert moved("postbackd_attempt_duration_seconds_count", action="ping_url") == 4
    assert moved("postbackd_attempt_duration_seconds_sum", action="ping_url") > 0
    assert (
        value(after, "postbackd_attempt_duration_seconds_bucket", action="ping_url", le="+Inf") == 4
    )
    webhook = {"route": "/webhooks/{source}"}
    assert moved("postbackd_http_requests_total", code="200", **webhook) == 5
    assert moved("postbackd_http_requests_total", code="404", **webhook) == 1
    assert moved("postbackd_http_requests_total", route="unmatched", code="404") == 1
    assert moved("postbackd_http_requests_total", route="/metrics", code="200") == 1
    assert not [k for k in after if "x9" in str(k) or "nosuch" in str(k)]  # no raw URLs
    depth = {s.value: value(after, "postbackd_queue_depth", state=s.value) for s in DeliveryState}
    assert depth == {
        "queued": 0,
        "in_flight": 0,
        "retrying": 1,
        "succeeded": 2,
        "dead": 1,
        "cancelled": 0,
    }
    assert value(after, "postbackd_store_up") == 1
    ours = {name for name, _ in after}
    assert all(name.startswith(("postbackd_", "process_")) for name in ours)


async def test_reload_metrics_follow_the_reloader(tmp_path: Path, sink: Sink) -> None:
    daemon = await start_daemon(tmp_path, rules(sink, sink, sink))
    try:
        start = await scrape(daemon)
        loaded_at = value(start, "postbackd_last_reload_success_timestamp_seconds")
        assert loaded_at > 0
        assert value(start, "postbackd_last_reload_ok") == 1
        reloader = daemon.services.reloader

        assert await reloader.reload("test")
        ok = await scrape(daemon)
        assert value(ok, "postbackd_reloads_total", result="ok") == 1
        assert value(ok, "postbackd_reloads_total", result="failed") == 0
        assert value(ok, "postbackd_last_reload_success_timestamp_seconds") >= loaded_at

        (daemon.rules_dir / "bad.yaml").write_text("offer: 6\npostbacks: [{id: 1}]\n")
        assert not await reloader.reload("test")
        failed = await scrape(daemon)
        assert value(failed, "postbackd_reloads_total", result="failed") == 1
        assert value(failed, "postbackd_last_reload_ok") == 0
        assert value(failed, "postbackd_last_reload_success_timestamp_seconds") == value(
            ok, "postbackd_last_reload_success_timestamp_seconds"
        )
        assert value(failed, "postbackd_postbacks_loaded", status="active") == 3  # kept

        (daemon.rules_dir / "bad.yaml").unlink()
        (daemon.rules_dir / "o.yaml").write_text("offer: 5\n")
        assert await reloader.reload("test")
        emptied = await scrape(daemon)
        assert value(emptied, "postbackd_last_reload_ok") == 1
        assert value(emptied, "postbackd_postbacks_loaded", status="active") == 0
        assert value(emptied, "postbackd_reloads_total", result="ok") == 2
    finally:
        await daemon.client.close()


class BrokenStore:
    async def queue_depth(self, live_only: bool = False) -> dict[DeliveryState, int]:
        from daemon.errors import StoreError

        raise StoreError("postgresql: ConnectionRefusedError")


async def test_a_store_that_does_not_answer_keeps_the_last_depth(tmp_path: Path) -> None:
    from daemon.store.sqlite import SQLiteStore

    metrics = Metrics()
    store = SQLiteStore(tmp_path / "m.db")
    await store.open()
    try:
        await metrics.refresh(store)
    finally:
        await store.close()
    await metrics.refresh(BrokenStore())  # type: ignore[arg-type]
    samples = parse(metrics.render().decode())
    assert value(samples, "postbackd_store_up") == 0
    assert value(samples, "postbackd_queue_depth", state="queued") == 0
    assert ("postbackd_queue_depth", frozenset({("state", "queued")})) in samples


def test_each_app_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.arrival("generic", "new")
    assert value(parse(first.render().decode()), "postbackd_conversions_total",
                 source="generic", transition="new") == 1  # fmt: skip
    assert value(parse(second.render().decode()), "postbackd_conversions_total",
                 source="generic", transition="new") == 0  # fmt: skip


async def test_delivery_lag_is_the_age_of_the_oldest_waiting_delivery(
    tmp_path: Path, sink: Sink
) -> None:
    from tests.harness import FakeClock

    clock = FakeClock()
    daemon = await start_daemon(tmp_path, rules(sink, sink, sink), clock=clock, dispatch=False)
    try:
        assert value(await scrape(daemon), "postbackd_delivery_lag_seconds") == 0
        await daemon.post(conversion_id="L1", offer=5, affiliate=1, status="approved")
        clock.advance(42.0)  # accepted, not delivered (no dispatcher here)
        assert value(await scrape(daemon), "postbackd_delivery_lag_seconds") == 42.0
        await daemon.services.dispatcher.dispatch_once()
        await daemon.services.dispatcher.drain()
        assert value(await scrape(daemon), "postbackd_delivery_lag_seconds") == 0
    finally:
        await daemon.client.close()
