"""Benchmark: the web console's pages on a big install (100,000 postbacks, 1,000,000 deliveries),
server time per page (median and p95 of 20 requests, measured by a middleware around the
handler, so the HTTP client's own time is not counted). Target (issue 16): under 200 ms.

Run: .venv/bin/python -m bench.console [--deliveries N] [--offers N] [--dir DIR]
The deliveries are written straight into a migrated SQLite file (10 per conversion, states
mixed as on a live install) so that building the set takes seconds, not an hour of ingest.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bench.rulesgen import PER_OFFER, write_rules
from daemon.app import create_app
from daemon.settings import Settings
from daemon.store.factory import open_store

TOKEN = "bench-console-admin"  # noqa: S105 - a throwaway token of a throwaway daemon
REPEAT = 20
US = 1_000_000
START_US = (int(time.time()) - 30 * 86400) * US  # a month of history, within retention
_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


def fill_store(path: Path, postbacks: int, deliveries: int) -> None:
    """Conversions, arrivals and deliveries written in bulk (the schema is the daemon's own)."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")
    conversions = max(1, deliveries // 10)
    states = ["succeeded"] * 18 + ["dead", "retrying"]
    spacing = 30 * 86400 * US // max(1, deliveries)
    with conn:
        conn.executemany(
            "INSERT INTO conversion (id, source, conversion_id, status, fields, created_at,"
            " updated_at) VALUES (?, 'generic', ?, 'approved', '{}', ?, ?)",
            (
                (i + 1, f"c{i}", START_US + i * 1000, START_US + i * 1000)
                for i in range(conversions)
            ),
        )
        conn.executemany(
            "INSERT INTO arrival (conversion_pk, seq, transition, status, received_at, data, vals)"
            " VALUES (?, 1, 'new', 'approved', ?, '{}', '{}')",
            ((i + 1, START_US + i * 1000) for i in range(conversions)),
        )

        def rows() -> Any:
            for n in range(deliveries):
                conv = n // 10
                pid = (n * 7919) % postbacks + 1
                state = states[n % len(states)]
                created = START_US + n * spacing  # spread over the month
                yield (
                    hashlib.md5(str(n).encode(), usedforsecurity=False).hexdigest(),
                    conv + 1,
                    f"c{conv}",
                    pid,
                    f"generic:c{conv}:1:{pid}",
                    state,
                    created,
                    created,
                    created + 60 * US if state == "retrying" else None,
                    "http_503" if state != "succeeded" else None,
                )

        conn.executemany(
            "INSERT INTO delivery (id, conversion_pk, arrival_seq, source, conversion_id,"
            " postback_id, action, destination, idempotency_key, state, attempts, created_at,"
            " updated_at, next_attempt_at, last_reason) VALUES (?, ?, 1, 'generic', ?, ?,"
            " 'ping_url', 'http://127.0.0.1:9', ?, ?, 1, ?, ?, ?, ?)",
            rows(),
        )
    conn.execute("ANALYZE")
    conn.close()


def timing(seen: list[float]) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            return await handler(request)
        finally:
            seen.append((time.perf_counter() - started) * 1000)

    return middleware


async def measure(tmp: Path, offers: int, deliveries: int) -> dict[str, tuple[float, float]]:
    rules_dir = tmp / "rules.d"
    postbacks = write_rules(rules_dir, offers, "http://127.0.0.1:9")
    db = tmp / "console.db"
    store = open_store(f"sqlite:///{db}", config_dir=tmp, create_dirs=True)
    await store.open()
    await store.close()
    started = time.monotonic()
    fill_store(db, postbacks, deliveries)
    print(f"{postbacks:,} postbacks, {deliveries:,} deliveries written in "
          f"{time.monotonic() - started:.0f} s")  # fmt: skip
    (tmp / "webhooks").mkdir(exist_ok=True)
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    settings = Settings.model_validate({
        "store": f"sqlite:///{db}", "rules_dir": str(rules_dir),
        "webhooks_dir": str(tmp / "webhooks"), "config_dir": tmp, "retention": "3650d",
        "api": {"tokens": [{"name": "ops", "token_sha256": digest, "role": "admin"}]},
    })  # fmt: skip
    app = create_app(settings, environ={}, dispatch=False, watch=False)
    seen: list[float] = []
    app.middlewares.append(timing(seen))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        page = await client.get("/ui/sign-in")
        check = _CSRF.search(await page.text())
        assert check is not None
        await client.post("/ui/sign-in", data={"csrf": check.group(1), "token": TOKEN})
        first = await client.get("/ui/deliveries")
        cursor = re.search(r'href="\?cursor=([^"&]+)', await first.text())
        middle = offers // 2
        filtered = "trigger=conversion_done&status=active"
        after = cursor.group(1) if cursor else ""
        at = START_US // US + 15 * 86400  # halfway through the month
        since, until = (
            datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M") for t in (at, at + 300)
        )
        one = hashlib.md5(str(deliveries // 2).encode(), usedforsecurity=False).hexdigest()
        pid = middle * PER_OFFER
        paths = {
            "offers (first page)": "/ui/offers",
            "offers (a later page)": f"/ui/offers?after={middle}",
            "an offer's postbacks": f"/ui/offers/{middle}",
            "postbacks filtered (trigger, status)": f"/ui/offers/{middle}?{filtered}",
            "a postback (with its last 24 h of deliveries)": f"/ui/postbacks/{pid}",
            "deliveries (first page)": "/ui/deliveries",
            "deliveries (second page, keyset)": f"/ui/deliveries?cursor={after}",
            "deliveries of a state (dead)": "/ui/deliveries?state=dead",
            "deliveries of an offer (last 24 h)": f"/ui/deliveries?offer={middle}",
            "deliveries of a postback (last 24 h, the default)": f"/ui/deliveries?postback={pid}",
            "deliveries of a postback (all time)": f"/ui/deliveries?postback={pid}&since=",
            "deliveries of an action (every postback, 24 h)": "/ui/deliveries?action=ping_url",
            "deliveries in a time range": f"/ui/deliveries?since={since}&until={until}",
            "a delivery": f"/ui/deliveries/{one}",
            "health (queue depth, lag)": "/ui/health",
        }  # fmt: skip
        figures = {}
        for name, path in paths.items():
            seen.clear()
            for _ in range(REPEAT):
                resp = await client.get(path)
                assert resp.status == 200, (path, resp.status, (await resp.text())[:300])
                await resp.read()
            ordered = sorted(seen)
            figures[name] = (statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))])
        return figures
    finally:
        await client.close()


async def section(ctx: Any) -> None:
    """The `console` section of `make bench` (bench/__main__.py): the same figures, reported."""
    ctx.report.start("console", "web console pages, server time (bench/console.py)")
    workdir = Path(ctx.workdir) / "console"
    workdir.mkdir(parents=True, exist_ok=True)
    figures = await measure(workdir, ctx.large_offers, 1_000_000)
    for name, (median, p95) in figures.items():
        ctx.report.add(f"{name}, p95", p95, "ms", f"median {median:.1f} ms")


def report(figures: dict[str, tuple[float, float]]) -> None:
    width = max(len(n) for n in figures)
    print(f"{'page':<{width}}  median ms  p95 ms")
    for name, (median, p95) in figures.items():
        flag = "" if p95 < 200 else "  over 200 ms"
        print(f"{name:<{width}}  {median:9.1f}  {p95:6.1f}{flag}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--offers", type=int, default=10_000, help="x 10 postbacks (10,000)")
    parser.add_argument("--deliveries", type=int, default=1_000_000)
    parser.add_argument("--dir", help="where the SQLite file goes (default: the temp dir)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="postbackd-console-", dir=args.dir) as tmp:
        figures = asyncio.run(measure(Path(tmp), args.offers, args.deliveries))
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
