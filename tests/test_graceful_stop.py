"""SIGTERM under load against the real process: attempts in flight finish, queued deliveries stay
queued, and after a restart on the same store every acknowledged conversion's deliveries reach
the receiver exactly once (counted by idempotency key at a loopback sink)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Sink, wait_for
from tests.process_support import DaemonProcess, free_port, write_config

pytestmark = pytest.mark.slow

POSTBACKS = (1, 2)
SINK_DELAY = 0.2  # slow enough that attempts are in flight whenever SIGTERM comes


class SlowSink(Sink):
    """Answers every request after SINK_DELAY; knows how many it is answering right now."""

    active = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        try:
            response = await super()._handle(request)
            await asyncio.sleep(SINK_DELAY)
            return response
        finally:
            self.active -= 1


def rules_for(sink: Sink) -> str:
    return "offer: 1\npostbacks:\n" + "".join(
        f"""  - id: {pid}
    trigger: conversion_done
    affiliate: "*"
    action: {{type: ping_url, url: "{sink.url}/pb{pid}?tx={{conversion_id}}"}}
"""
        for pid in POSTBACKS
    )


async def pending(daemon: DaemonProcess, http: aiohttp.ClientSession) -> int:
    """Deliveries not yet final in the whole store, from the daemon's own /metrics."""
    async with http.get(f"{daemon.url}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        if family.name == "postbackd_queue_depth":
            return sum(
                int(s.value)
                for s in family.samples
                if s.labels["state"] in ("queued", "in_flight", "retrying")
            )
    raise AssertionError("no postbackd_queue_depth in /metrics")


async def test_sigterm_under_load_loses_nothing_and_sends_nothing_twice(tmp_path: Path) -> None:
    sink = await SlowSink().start()
    port = free_port()
    config = write_config(tmp_path, port=port)
    (tmp_path / "rules.d" / "o.yaml").write_text(rules_for(sink))
    daemon = DaemonProcess(config, port)
    acked: set[str] = set()
    counter = itertools.count()
    running = True

    async def tracker(http: aiohttp.ClientSession) -> None:
        while running:
            cid = f"g{next(counter)}"
            params = {"conversion_id": cid, "offer": "1", "affiliate": "9", "status": "approved"}
            try:
                async with http.get(f"{daemon.url}/webhooks/generic", params=params) as resp:
                    if resp.status == 200:
                        acked.add(cid)
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.01)  # stopping or stopped: a tracker retries later

    try:
        daemon.start()
        await daemon.ready()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            workers = [asyncio.create_task(tracker(http)) for _ in range(6)]
            await wait_for(
                lambda: sink.active > 0 and len(acked) * len(POSTBACKS) - len(sink.received) >= 60,
                deadline=30,
            )
            daemon.signal(signal.SIGTERM)  # conversions keep coming while it stops
            assert daemon.proc is not None
            assert await asyncio.to_thread(daemon.proc.wait, 30) == 0
            running = False
            await asyncio.gather(*workers)
        assert daemon.events("daemon_stopped")
        sent_before_restart = len(sink.received)
        expected = {f"generic:{cid}:1:{pid}" for cid in acked for pid in POSTBACKS}
        assert sent_before_restart < len(expected)  # work was left queued for the restart

        daemon.start()
        await daemon.ready()
        async with aiohttp.ClientSession() as http:
            await wait_for(
                lambda: expected <= {r.headers["Idempotency-Key"] for r in sink.received},
                deadline=60,
            )

            async def drained() -> bool:
                return await pending(daemon, http) == 0

            await wait_for(drained, deadline=60)  # nothing left that could still be sent
        keys = collections.Counter(r.headers["Idempotency-Key"] for r in sink.received)
        assert [key for key, count in keys.items() if count > 1] == []
        assert expected <= set(keys)
        for r in sink.received:  # each key went to its own postback's URL
            _, cid, _, pid = r.headers["Idempotency-Key"].split(":")
            assert r.path_qs == f"/pb{pid}?tx={cid}"
        print(
            f"acknowledged {len(acked)}, sent before the stop {sent_before_restart},"
            f" after the restart {len(sink.received) - sent_before_restart}"
        )
    finally:
        daemon.stop()
        await sink.close()
