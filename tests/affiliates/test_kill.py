"""kill -9 during API writes (issue 15): afterwards every write that was answered 2xx is there,
and no postback exists half-made (each live row validates, has its create in the audit trail,
and its last audit row is the row as it stands)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.affiliates.records import build_postback
from daemon.store.sqlite import SQLiteStore
from tests.affiliates.kit import AFF_A, TOKENS, rules
from tests.harness import Sink
from tests.process_support import DaemonProcess, free_port, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def test_kill_9_during_api_writes_keeps_every_acknowledged_write(
    tmp_path: Path, sink: Sink
) -> None:
    rng = random.Random(20261206)
    port = free_port()
    config = write_config(tmp_path, port=port, api={"tokens": TOKENS})
    for name, text in rules(sink, "max_postbacks: 10000\nmax_writes_per_minute: 1000000\n").items():
        (tmp_path / "rules.d" / name).write_text(text.replace("\n            ", "\n"))
    daemon = DaemonProcess(config, port)
    created: set[int] = set()
    deleted: set[int] = set()
    disabled: set[int] = set()
    running = True
    headers = {"Authorization": f"Bearer {AFF_A}"}
    api = f"http://127.0.0.1:{port}/api/v1/postbacks"

    async def writer(http: aiohttp.ClientSession, n: int) -> None:
        body = {
            "offer": 7,
            "trigger": "conversion_done",
            "action": {"type": "ping_url", "url": f"{sink.url}/w{n}?tx={{conversion_id}}"},
        }
        while running:
            try:
                choice = rng.random()
                live = sorted(created - deleted)
                if choice < 0.6 or not live:
                    async with http.post(api, json=body, headers=headers) as resp:
                        if resp.status == 201:
                            created.add((await resp.json())["id"])
                elif choice < 0.8:
                    pid = rng.choice(live)
                    async with http.post(
                        f"{api}/{pid}/status", json={"status": "disabled"}, headers=headers
                    ) as resp:
                        if resp.status == 200:
                            disabled.add(pid)
                else:
                    pid = rng.choice(live)
                    async with http.delete(
                        f"{api}/{pid}", json={"confirm": pid}, headers=headers
                    ) as resp:
                        if resp.status == 200:
                            deleted.add(pid)
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.02)  # down: try again

    try:
        daemon.start()
        await daemon.ready()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            workers = [asyncio.create_task(writer(http, n)) for n in range(4)]
            for _ in range(5):
                await asyncio.sleep(rng.uniform(0.3, 0.8))
                daemon.kill()
                daemon.start()
                await daemon.ready()
            running = False
            await asyncio.gather(*workers)
    finally:
        daemon.stop()
    assert len(created) > 20
    assert deleted
    store = SQLiteStore(tmp_path / "var" / "postbackd.db")
    await store.open()
    try:
        rows = {row.id: row for row in (await store.affiliate_changes(0)).postbacks}
        for pid in created:
            assert pid in rows, pid
        for pid in deleted:
            assert rows[pid].status == "deleted", pid
        for pid in disabled - deleted:
            assert rows[pid].status in ("disabled", "deleted"), pid
        for row in rows.values():
            history = await store.affiliate_history(row.id)
            assert history[0].change == "create"
            last: dict[str, Any] | None = history[-1].after
            if row.status == "deleted":
                assert history[-1].change == "delete"
                assert last is None
            else:
                assert last == row.snapshot()
                build_postback(row, goals_enabled=True)  # it validates: nothing half-made
    finally:
        await store.close()
    print(f"created {len(created)}, disabled {len(disabled)}, deleted {len(deleted)}")
