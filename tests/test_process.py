"""Against the real `postbackd run` process: tracker-style GETs to a loopback sink, duplicates,
the status lifecycle, and a crash test with SIGKILL at random moments under load."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Sink, lifecycle_rules, wait_for
from tests.process_support import DaemonProcess, free_port, write_config

pytestmark = pytest.mark.slow


async def test_real_process_end_to_end(tmp_path: Path, sink: Sink) -> None:
    port = free_port()
    config = write_config(tmp_path, port=port)
    (tmp_path / "rules.d" / "o.yaml").write_text(lifecycle_rules(sink))
    daemon = DaemonProcess(config, port)
    daemon.start()
    try:
        await daemon.ready()
        async with aiohttp.ClientSession() as http:
            url = (
                f"{daemon.url}/webhooks/generic?conversion_id=T1&offer=7&affiliate=42"
                "&status=approved&payout=12.50&click_id=abc%20d"
            )
            async with http.get(url) as resp:
                assert resp.status == 200
                assert await resp.json() == {
                    "status": "accepted",
                    "conversion_id": "T1",
                    "transition": "new",
                    "deliveries": 1,
                }
            await wait_for(lambda: sink.received)
            assert sink.received[0].path_qs == "/done?cid=abc%20d&payout=12.50&tx=T1"
            async with http.get(url) as resp:  # the tracker retries: nothing more is sent
                assert (await resp.json())["transition"] == "duplicate"
            for status in ("pending", "approved", "rejected"):
                async with http.get(
                    f"{daemon.url}/webhooks/generic",
                    params={
                        "conversion_id": "L1",
                        "offer": "7",
                        "affiliate": "42",
                        "status": status,
                    },
                ) as resp:
                    assert resp.status == 200
            await wait_for(lambda: len(sink.received) == 4)
        assert sorted(r.path_qs for r in sink.received[1:]) == [
            "/done?cid=&payout=&tx=L1",
            "/pending?tx=L1",
            "/reject?tx=L1",
        ]
        attempts = daemon.events("delivery_attempt")
        assert {a["outcome"] for a in attempts} == {"succeeded"}
        assert len(daemon.events("conversion_received")) == 5
    finally:
        assert daemon.stop() == 0


async def test_sigkill_at_random_moments_loses_no_acknowledged_conversion(
    tmp_path: Path,
) -> None:
    """Ten SIGKILLs under load: every conversion that got a 200 has its delivery received by
    the sink afterwards, and every resend carries the same idempotency key."""
    rng = random.Random(20261127)

    async def slowish(request: web.Request) -> web.Response:
        await asyncio.sleep(rng.uniform(0, 0.05))  # keep attempts in flight when the kill comes
        return web.Response(text="OK")

    sink = await Sink().start()
    sink.script = [slowish] * 100_000
    port = free_port()
    config = write_config(tmp_path, port=port)
    (tmp_path / "rules.d" / "o.yaml").write_text(f"""
offer: 1
postbacks:
  - id: 1
    trigger: conversion_done
    affiliate: "*"
    action: {{type: ping_url, url: "{sink.url}/pb?tx={{conversion_id}}"}}
""")
    daemon = DaemonProcess(config, port)
    acked: set[str] = set()
    counter = iter(range(10**9))
    running = True

    async def tracker(http: aiohttp.ClientSession) -> None:
        while running:
            cid = f"k{next(counter)}"
            params = {"conversion_id": cid, "offer": "1", "affiliate": "9", "status": "approved"}
            try:
                async with http.get(f"{daemon.url}/webhooks/generic", params=params) as resp:
                    if resp.status == 200:
                        acked.add(cid)
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.02)  # the daemon is down: a tracker would retry later
            # At most about 800 conversions a second in all, a few times what the slowish sink
            # takes (8 at once, 25 ms each), so a backlog builds as before. Unpaced, what the
            # trackers got acknowledged grew with the daemon's ingest rate, and the backlog
            # left at the end could take longer to drain than the deadline below, however
            # correct the daemon.
            await asyncio.sleep(0.01)

    try:
        daemon.start()
        await daemon.ready()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            workers = [asyncio.create_task(tracker(http)) for _ in range(8)]
            for _ in range(10):
                await asyncio.sleep(rng.uniform(0.3, 0.9))
                daemon.kill()
                daemon.start()
                await daemon.ready()
            await asyncio.sleep(0.5)
            running = False
            await asyncio.gather(*workers)
        expected = {f"generic:{cid}:1:1" for cid in acked}
        await wait_for(
            lambda: expected <= {r.headers.get("Idempotency-Key") for r in sink.received},
            deadline=60,
        )
        assert len(acked) > 100
        assert daemon.starts == 11
        for r in sink.received:
            cid = r.path_qs.removeprefix("/pb?tx=")
            assert r.headers["Idempotency-Key"] == f"generic:{cid}:1:1"
        resent = len(sink.received) - len({r.headers["Idempotency-Key"] for r in sink.received})
        print(f"acknowledged {len(acked)}, received {len(sink.received)}, resent {resent}")
    finally:
        daemon.stop()
        await sink.close()


async def test_a_delivery_leased_at_insert_is_sent_again_at_once_after_kill_9(
    tmp_path: Path,
) -> None:
    """A delivery leased to the node as its arrival was written (no claim) whose attempt is under
    way when the node is killed: the restarted node takes back its own leases at start and sends
    it again with the same key, without waiting for the lease (300 s) to end."""
    hang = asyncio.Event()

    async def hangs(request: web.Request) -> web.Response:
        await hang.wait()
        return web.Response(text="OK")

    sink = await Sink().start()
    sink.script = [(200, "OK", {}), hangs]
    port = free_port()
    config = write_config(tmp_path, port=port)
    (tmp_path / "rules.d" / "o.yaml").write_text(f"""
offer: 1
postbacks:
  - id: 1
    trigger: conversion_done
    affiliate: "*"
    action: {{type: ping_url, url: "{sink.url}/pb?tx={{conversion_id}}"}}
""")
    daemon = DaemonProcess(config, port)

    def params(cid: str) -> dict[str, str]:
        return {"conversion_id": cid, "offer": "1", "affiliate": "9", "status": "approved"}

    try:
        daemon.start()
        await daemon.ready()
        async with aiohttp.ClientSession() as http:

            async def leased() -> str:
                async with http.get(f"{daemon.url}/metrics") as resp:
                    text = await resp.text()
                [line] = [x for x in text.splitlines() if 'via="lease_at_insert"' in x]
                return line

            # W1 is sent (claimed or leased): either way the dispatcher has found nothing
            # else due since, so L1's delivery is leased as it is written.
            async with http.get(f"{daemon.url}/webhooks/generic", params=params("W1")) as resp:
                assert resp.status == 200
            await wait_for(lambda: sink.received)
            before = float((await leased()).split()[-1])
            async with http.get(f"{daemon.url}/webhooks/generic", params=params("L1")) as resp:
                assert resp.status == 200
            await wait_for(lambda: len(sink.received) == 2)
            assert float((await leased()).split()[-1]) == before + 1
            daemon.kill()
            daemon.start()
            await daemon.ready()
            await wait_for(lambda: len(sink.received) == 3, deadline=15)
        assert [r.headers["Idempotency-Key"] for r in sink.received[1:]] == ["generic:L1:1:1"] * 2
    finally:
        hang.set()
        daemon.stop()
        await sink.close()


async def test_sighup_reloads_and_sigterm_stops_cleanly(tmp_path: Path, sink: Sink) -> None:
    port = free_port()
    config = write_config(tmp_path, port=port)
    rules = tmp_path / "rules.d" / "o.yaml"
    rules.write_text("offer: 1\n")
    daemon = DaemonProcess(config, port)
    daemon.start()
    try:
        await daemon.ready()
        rules.write_text(lifecycle_rules(sink))
        daemon.signal(signal.SIGHUP)
        await wait_for(
            lambda: [e for e in daemon.events("rules_reloaded") if e["reason"] == "SIGHUP"]
        )
    finally:
        assert daemon.stop() == 0
    assert daemon.events("daemon_stopped")
