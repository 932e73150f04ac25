"""Affiliate postbacks (issue 15), in-process: matching cost with 100,000 file postbacks plus
100,000 store postbacks against 10 file postbacks; the cost of one store change merged into that
index; and API writes per second (POST /api/v1/postbacks on an SQLite store, loopback)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

from bench.context import SMALL_OFFERS, Context
from bench.procs import free_port
from bench.scale import MATCH_ROUNDS, _match_cpu_us, _prepared
from bench.sections import _schema, pg_reachable
from daemon.actions.base import Resources
from daemon.affiliates.index import AffiliateSecrets, StoreIndex
from daemon.loader import load_rules
from daemon.reload import Runtime, build_runtime
from daemon.store.affiliate_types import FIRST_STORE_ID, StoredPostback

PER_OFFER = 10
ROUNDS = 2 * MATCH_ROUNDS + 1  # the best of each: a loaded machine makes single rounds noisy
WRITERS = 16


class _Clock:
    def now(self) -> float:
        return time.time()


def _row(pid: int, offer: int, at: datetime) -> StoredPostback:
    """A store postback: one in ten (per offer) of the bench conversions' affiliate 42, with a
    condition that is false (evaluated, fires nothing); the others of affiliates of their own."""
    affiliate = "42" if pid % PER_OFFER == 0 else f"a{pid}"
    body: dict[str, object] = {
        "trigger": "conversion_done",
        "author": {"id": "bench", "name": "bench", "affiliate": affiliate},
        "action": {"type": "ping_url", "url": "http://127.0.0.1:9/pb?tx={conversion_id}"},
    }
    if affiliate == "42":
        body["when"] = {"==": [{"var": "sub1"}, "fire-store"]}
    return StoredPostback(pid, affiliate, str(offer), "active", None, body, at, at, 1)


def _composed(rules_dir: Path, offers: int) -> tuple[Runtime, Runtime, StoreIndex, float]:
    resources = Resources(http=None, secret=lambda name: "", clock=_Clock())
    file_runtime = build_runtime(load_rules(rules_dir), {}, resources)
    index = StoreIndex(resources, AffiliateSecrets())
    index.compose(file_runtime)
    at = datetime.now(UTC)
    rows = [_row(FIRST_STORE_ID + n, n // PER_OFFER + 1, at) for n in range(offers * PER_OFFER)]
    started = time.perf_counter()
    index.apply(rows, 1)
    took = time.perf_counter() - started
    return file_runtime, index.compose(file_runtime), index, took


def _one_change_ms(index: StoreIndex, file_runtime: Runtime, offers: int) -> float:
    """Wall ms to take one changed store postback in and compose the running set again."""
    at = datetime.now(UTC)
    samples = []
    for n in range(200):
        row = _row(FIRST_STORE_ID + n, n % offers + 1, at)
        row = StoredPostback(**{**row.__dict__, "change_seq": 2 + n, "status": "disabled"})
        started = time.perf_counter()
        index.apply([row])
        index.compose(file_runtime)
        samples.append(time.perf_counter() - started)
    samples.sort()
    return samples[len(samples) // 2] * 1000


async def affiliates(ctx: Context) -> None:
    report = ctx.report
    report.start("affiliates", "store postbacks: matching, one change, API writes/s")
    offers = ctx.large_offers
    small, large = await ctx.rules(large=False), await ctx.rules(large=True)
    small_set = build_runtime(load_rules(small), {}, Resources(None, lambda n: "", _Clock()))
    file_runtime, runtime, index, took = _composed(large, offers)
    count = offers * PER_OFFER
    report.add(f"take in {count:,} store postbacks", took, "s", "validated and indexed")
    one_offer = _prepared(SMALL_OFFERS)
    others = _prepared(SMALL_OFFERS, affiliate="43")  # one with no store postback
    spread = _prepared(offers)
    runs = {
        "10 file postbacks": (small_set.rules, others),
        f"{count:,} file + {count:,} store postbacks, one offer": (runtime.rules, others),
        f"{count:,} + {count:,}, one offer, 1 store postback of its own": (
            runtime.rules,
            one_offer,
        ),
        f"{count:,} file + {count:,} store postbacks, all offers": (runtime.rules, spread),
    }
    best = {name: float("inf") for name in runs}
    for _ in range(ROUNDS):
        for name, (rules, prepared) in runs.items():
            best[name] = min(best[name], _match_cpu_us(rules, prepared))
    base, same, own, wide = (
        report.add(f"match, {name}", best[name], "µs CPU/conv") for name in runs
    )
    both = f"{count:,}+{count:,}"
    report.ratio(f"match {both} / 10, same offer", same, base, "within 1.10 = flat")
    report.ratio(f"match {both} / 10, +1 own store postback", own, base, "11 evaluated")
    report.ratio(f"match {both} / 10, all offers", wide, base, "cold CPU caches")
    change = _one_change_ms(index, file_runtime, offers)
    report.add("one store change merged (median)", change, "ms", f"over {count * 2:,} postbacks")
    del runtime, index, runs, file_runtime
    await _api_writes(ctx, small)
    await _propagation(ctx, small)


async def _propagation(ctx: Context, rules_dir: Path) -> None:
    """Two nodes on one PostgreSQL: a store postback written through node A, until node B's
    running rule set has it (NOTIFY, with the 1 s version check behind it)."""
    if ctx.pg_dsn is None or await pg_reachable(ctx.pg_dsn) is not None:
        ctx.report.note("propagation between nodes: skipped (no PostgreSQL)")
        return
    from daemon.affiliates.wiring import attach_affiliates
    from daemon.reload import Reloader
    from daemon.store.affiliate_types import PostbackChange, Who
    from daemon.store.postgres import PostgresStore

    samples = []
    async with _schema(ctx.pg_dsn) as (url, _):
        writer, reader = PostgresStore(url, max_size=2), PostgresStore(url, max_size=2)
        await writer.open()
        await reader.open()
        resources = Resources(http=None, secret=lambda name: "", clock=_Clock())
        reloader = Reloader(rules_dir, resources)
        _, sync = attach_affiliates(reader, reloader, resources, time.time)
        await reloader.load_initial()
        await sync.initial()
        task = asyncio.create_task(sync.run())
        try:
            await asyncio.wait_for(sync.listening.wait(), 10)
            body = {
                "trigger": "conversion_done",
                "action": {"type": "ping_url", "url": "http://127.0.0.1:9/pb"},
            }
            for _ in range(20):
                started = time.perf_counter()
                row = await writer.create_affiliate_postback(
                    "42", PostbackChange("1", "active", body), Who("b", "b", "42"),
                    datetime.now(UTC), None,
                )  # fmt: skip
                while row.id not in reloader.runtime.rules.postbacks:  # noqa: ASYNC110 - polled: the sync has no per-id event
                    await asyncio.sleep(0.001)
                samples.append(time.perf_counter() - started)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await writer.close()
            await reader.close()
    samples.sort()
    ctx.report.add(
        "written through node A, in node B's rule set (median)",
        samples[len(samples) // 2] * 1000,
        "ms",
        f"max {samples[-1] * 1000:.0f} ms of 20; PostgreSQL NOTIFY, 1 s version check behind",
    )


async def _api_writes(ctx: Context, rules_dir: Path) -> None:
    """POST /api/v1/postbacks from WRITERS clients for the window; creates per second."""
    from daemon.app import create_app
    from daemon.settings import Settings

    token = "bench-affiliate-token"  # noqa: S105 - a throwaway token of this bench
    digest = hashlib.sha256(token.encode()).hexdigest()
    policy = "max_postbacks: 10000\nmax_writes_per_minute: 1000000\n"
    (rules_dir / "affiliates.yaml").write_text(policy)
    settings = Settings.model_validate(
        {
            "store": f"sqlite:///{ctx.workdir / 'affiliates.db'}",
            "rules_dir": str(rules_dir),
            "webhooks_dir": str(ctx.workdir),
            "config_dir": ctx.workdir,
            "api": {
                "tokens": [
                    {"name": "b", "token_sha256": digest, "role": "affiliate", "affiliate": 42}
                ]
            },
        }
    )
    # One info line per create would flood the report: warnings and errors only here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    runner = web.AppRunner(create_app(settings, environ={}, dispatch=False, watch=False))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/api/v1/postbacks"
    body = {
        "offer": 1,
        "trigger": "conversion_done",
        "action": {"type": "ping_url", "url": "http://127.0.0.1:9/pb?tx={conversion_id}"},
    }
    done = 0
    stop = time.monotonic() + ctx.opts.seconds
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:

            async def writer() -> None:
                nonlocal done
                while time.monotonic() < stop:
                    async with http.post(url, json=body) as r:
                        if r.status != 201:
                            raise RuntimeError(f"create answered {r.status}: {await r.text()}")
                        done += 1

            started = time.monotonic()
            await asyncio.gather(*(writer() for _ in range(WRITERS)))
            elapsed = time.monotonic() - started
    finally:
        await runner.cleanup()
        (rules_dir / "affiliates.yaml").unlink()
    ctx.report.add(
        "API writes (POST /api/v1/postbacks), SQLite",
        done / elapsed,
        "creates/s",
        f"{WRITERS} clients in the same process, synchronous=FULL",
    )
