"""Rule scale and memory: matching and loading in-process (10 postbacks against 100,000 over
10,000 offers), then the daemon with each set: start, resident size idle and under load, ingest
and end to end side by side, and a SIGHUP reload."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import http_figures as hf
from bench.context import SMALL_OFFERS, Context, sqlite_url
from bench.procs import Daemon, cpu_seconds, memory_kib
from bench.rulesgen import NONE, PER_OFFER, offer_of
from daemon.loader import RuleSet, load_rules
from daemon.matching import match
from daemon.models import Conversion, Transition, rule_data

MATCH_BUDGET = 0.5  # CPU seconds of match() calls per round
MATCH_ROUNDS = 3  # alternating sets; the best round of each counts (others load the machine)


def _timed_load(rules_dir: Path) -> tuple[RuleSet, float, float]:
    """load_rules as the daemon calls it; (rules, wall seconds, CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    rules = load_rules(rules_dir)
    return rules, time.perf_counter() - wall, time.process_time() - cpu


def _prepared(offers: int, affiliate: str = "42") -> list[tuple[Conversion, dict[str, Any]]]:
    """1,000 parsed conversions of `affiliate` with their rule data, spread over every offer."""
    received = datetime.now(UTC)
    prepared = []
    for n in range(1000):
        params = {
            "conversion_id": f"m{n}",
            "offer": str(offer_of(n, offers)),
            "affiliate": affiliate,
            "status": "approved",
            "payout": "12.50",
            "sub1": NONE,
        }
        conv = Conversion.parse(params)
        data = rule_data(
            conv, source="generic", transition=Transition.NEW, previous_status=None,
            received_at=received,
        )  # fmt: skip
        prepared.append((conv, data))
    return prepared


def _match_cpu_us(rules: RuleSet, prepared: list[tuple[Conversion, dict[str, Any]]]) -> float:
    """CPU microseconds per match() over MATCH_BUDGET seconds of calls."""
    calls, started = 0, time.process_time()
    while time.process_time() - started < MATCH_BUDGET:
        for conv, data in prepared:
            if match(rules, conv, data):
                raise RuntimeError("a benchmark conversion fired: the rule set is not as built")
        calls += len(prepared)
    return (time.process_time() - started) / calls * 1e6


async def rules_inprocess(ctx: Context) -> None:
    report = ctx.report
    report.start("rules", "in-process: load time, and match time per conversion")
    large_count = ctx.large_offers * PER_OFFER
    small, large = await ctx.rules(large=False), await ctx.rules(large=True)
    small_set, wall, _ = _timed_load(small)
    report.add(f"load_rules, {len(small_set.postbacks)} postbacks", wall * 1000, "ms")
    large_set, wall, cpu = _timed_load(large)
    report.add(
        f"load_rules, {large_count:,} postbacks / {ctx.large_offers:,} offers",
        wall,
        "s",
        f"{cpu:.1f} s CPU, {large_count / wall:,.0f} postbacks/s",
    )
    ctx.figures["load_large_s"] = wall
    one_offer = _prepared(SMALL_OFFERS)
    runs = {
        "10 postbacks": (small_set, one_offer),
        f"{large_count:,} postbacks, conversions on one offer": (large_set, one_offer),
        f"{large_count:,} postbacks, conversions over all offers": (
            large_set,
            _prepared(ctx.large_offers),
        ),
    }
    best = {name: float("inf") for name in runs}
    for _ in range(MATCH_ROUNDS):
        for name, (rules, prepared) in runs.items():
            best[name] = min(best[name], _match_cpu_us(rules, prepared))
    base, same, spread = (report.add(f"match, {name}", best[name], "µs CPU/conv") for name in runs)
    report.ratio(f"match {large_count:,} / 10, same offer", same, base, "~1 = indexed")
    report.ratio(f"match {large_count:,} / 10, all offers", spread, base, "cold CPU caches")
    del small_set, large_set, runs
    gc.collect()  # this process is the load generator next: no large heap to walk


def start_large(ctx: Context, rules_dir: Path) -> Daemon:
    """Start the daemon with the large set now: its load runs while other work waits on it."""
    return ctx.daemon("large", sqlite_url(ctx.workdir / "large.db"), rules_dir)


def _mib(kib: int) -> float:
    return kib / 1024


async def _reload(ctx: Context, daemon: Daemon, label: str) -> None:
    """SIGHUP; the time until the `rules_reloaded` line's timestamp, and the CPU it took."""
    seen = len(daemon.events("rules_reloaded"))
    cpu, sent = cpu_seconds(daemon.pid), time.time()
    daemon.signal(signal.SIGHUP)
    line = await daemon.wait_event("rules_reloaded", seen + 1, deadline=1200)
    done = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()
    used = cpu_seconds(daemon.pid) - cpu
    ctx.report.add(f"SIGHUP reload, {label}", done - sent, "s", f"~{used:.1f} s CPU")


async def _daemon_figures(ctx: Context, daemon: Daemon, offers: int, label: str) -> None:
    report, opts = ctx.report, ctx.opts
    await asyncio.sleep(1.0)  # let start-up garbage settle before "idle"
    report.add(f"RSS idle, {label}", _mib(memory_kib(daemon.pid)["VmRSS"]), "MiB")
    # Twice: the first seconds after a start include the garbage collector's first full passes
    # over the freshly loaded rules; the second window is the steady state.
    first = hf.Target(f"{label}, first window", [daemon.url], offers, [daemon.pid])
    before = await hf.ingest(report, first, opts)
    target = hf.Target(f"{label}", [daemon.url], offers, [daemon.pid])
    steady = await hf.ingest(report, target, opts)
    ctx.figures[f"scale_ingest_{offers}"] = steady.rate
    ctx.figures[f"scale_ingest_cpu_{offers}"] = steady.cpu_us
    rss = max(steady.peak_kib[daemon.pid], before.peak_kib[daemon.pid])
    report.add(f"RSS under ingest load, {label}", _mib(rss), "MiB", "peak sampled")
    sink = await ctx.start_sink()
    e2e = await hf.sustained(report, target, sink, opts)
    if e2e is not None:
        ctx.figures[f"scale_e2e_{offers}"] = e2e.rate
        ctx.figures[f"scale_e2e_cpu_{offers}"] = e2e.cpu_us
    report.add(f"RSS after load, {label}", _mib(memory_kib(daemon.pid)["VmRSS"]), "MiB")
    await _reload(ctx, daemon, label)
    report.add(
        f"peak RSS (VmHWM, reload included), {label}",
        _mib(memory_kib(daemon.pid)["VmHWM"]),
        "MiB",
    )


async def _restart_from_cache(ctx: Context, daemon: Daemon, label: str) -> None:
    """Stop the daemon once its parsed-rules cache is on disk, start it again with the same
    rules: start to ready from the cache (daemon/rulecache.py)."""
    cache = daemon.log.parent / "rules-cache" / "parsed.pickle"
    until = time.monotonic() + 300
    while not cache.exists():
        if time.monotonic() > until:
            ctx.report.note("the parsed-rules cache was not written within 300 s")
            return
        await asyncio.sleep(0.2)
    daemon.stop()
    daemon.start()
    warm = await daemon.ready_daemon(deadline=1200)
    ctx.figures["start_warm_s"] = warm
    ctx.report.add(f"daemon start to ready, {label}, rules unchanged", warm, "s",
                   f"from the cache ({cache.stat().st_size / 2**20:.0f} MiB)")  # fmt: skip


async def scale(ctx: Context, large: Daemon | None) -> None:
    report = ctx.report
    count = ctx.large_offers * PER_OFFER
    report.start("scale", f"the daemon with 10 and with {count:,} postbacks (and its memory)")
    during = "while the rules section ran" if large is not None else ""
    if large is None:
        large = start_large(ctx, await ctx.rules(large=True))
    started = await large.ready_daemon(deadline=1200)  # before anything else is measured
    small = ctx.daemon("small", sqlite_url(ctx.workdir / "small.db"), await ctx.rules(False))
    report.add("daemon start to ready, 10 postbacks", await small.ready_daemon(), "s")
    await _daemon_figures(ctx, small, SMALL_OFFERS, "10 postbacks")
    small.stop()
    label = f"{count:,} postbacks"
    note = ", ".join(filter(None, ["cold: parses every file", during]))
    report.add(f"daemon start to ready, {label}", started, "s", note)
    report.add(f"RSS after a cold start, {label}", _mib(memory_kib(large.pid)["VmRSS"]), "MiB")
    await _restart_from_cache(ctx, large, label)
    await _daemon_figures(ctx, large, ctx.large_offers, label)
    large.stop()
    figures = ctx.figures
    for kind in ("ingest", "e2e", "ingest_cpu", "e2e_cpu"):
        a, b = figures.get(f"scale_{kind}_{ctx.large_offers}"), figures.get(f"scale_{kind}_1")
        if a and b:
            what = kind.replace("_cpu", " CPU per conversion")
            report.ratio(f"{what} {count:,} / 10 postbacks", a, b, "~1 = rule count is free")
