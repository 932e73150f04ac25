"""The HTTP figures, for any set of running nodes: ingest rate, the hello yardstick, sustained
end-to-end rate, and receipt-to-delivery latency at a fixed rate."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench import wrk
from bench.load import Outcome, closed_loop, open_loop, percentile
from bench.procs import cpu_seconds, memory_kib, server
from bench.report import Report
from bench.rulesgen import FIRE, NONE, conversion_query, key_of, offer_of
from bench.servers import SinkClient

_runs = itertools.count(1)


@dataclass(frozen=True)
class Options:
    seconds: float = 5.0  # each closed-loop measurement
    warmup: float = 1.0
    connections: int = 64
    rate: float = 1000.0  # the fixed rate of the latency figure
    latency_seconds: float = 8.0
    drain_deadline: float = 60.0  # how long deliveries may take after the senders stop
    backlog: int = 1000  # most conversions acknowledged and not yet delivered (sustained)
    wrk: str | None = None  # wrk's path: closed-loop figures with wrk (else the Python client)
    e2e_seconds: float | None = None  # the end-to-end window with wrk (default: seconds)
    gen_cpus: str | None = None  # taskset CPU list for wrk (None: anywhere)


@dataclass
class Target:
    """Nodes that share one store; requests go round-robin over their ports."""

    name: str
    urls: Sequence[str]
    offers: int  # conversions spread over offers 1..offers
    pids: Sequence[int]

    def urls_for(self, sub1: str) -> tuple[str, Callable[[int], str]]:
        """A prefix unique to this run (conversion ids never repeat) and request n's URL."""
        prefix = f"r{next(_runs)}t{int(time.time()) % 100000}"
        urls, offers = list(self.urls), self.offers

        def url_for(n: int) -> str:
            query = conversion_query(f"{prefix}-{n}", offer_of(n, offers), sub1)
            return f"{urls[n % len(urls)]}/webhooks/generic?{query}"

        return prefix, url_for


async def _sample_memory(pids: Sequence[int], peak: dict[int, int]) -> None:
    while True:
        for pid in pids:
            with contextlib.suppress(OSError):
                peak[pid] = max(peak.get(pid, 0), memory_kib(pid)["VmRSS"])
        await asyncio.sleep(0.25)


@dataclass
class Measured:
    rate: float  # per second
    cpu_us: float  # the server processes' CPU time per request, in microseconds
    peak_kib: dict[int, int] = field(default_factory=dict)  # pid -> peak VmRSS sampled
    delivered: float = 0.0  # end to end with wrk: delivered per second in the window


async def hello(
    report: Report,
    workdir: Path,
    opts: Options,
    cpus: str | None = None,
    label: str = "",
    durable: bool = False,
) -> Measured:
    """Requests per second a bare aiohttp server answers, same generator, same URLs; with
    `durable`, the durable hello (each answer after its group-committed INSERT)."""
    if durable:
        db = workdir / f"durable-hello-{next(_runs)}.db"
        proc = server("durable", workdir, cpus, ("--db", str(db)))
        what = "durable hello"
    else:
        proc = server("hello", workdir, cpus)
        what = "bare aiohttp hello"
    proc.start()
    try:
        await proc.ready("/", 30)
        target = Target("hello", [proc.url], 1, [proc.pid])
        if opts.wrk:
            return await _ingest_wrk(report, target, opts, None, f"{what}{label}")
        _, url_for = target.urls_for(NONE)
        cpu = _cpu(target.pids)
        out = await closed_loop(url_for, opts.connections, opts.seconds, opts.warmup)
        used = _cpu(target.pids) - cpu
    finally:
        proc.stop()
    report.add(f"{what}{label}", out.rate, "req/s", _errors(out))
    cpu_us = report.add(f"{what}{label}: CPU per request", _us(used, out.total), "µs")
    return Measured(out.rate, cpu_us)


async def client_hello(report: Report, sink_url: str, opts: Options, concurrency: int) -> float:
    """CPU per request of a bare aiohttp client sending to the sink (bench/client_floor.py,
    its own process): the floor of a postback's send on this stack."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.client_floor", f"{sink_url}/floor",
        "--seconds", str(opts.seconds), "--concurrency", str(concurrency),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        report.note(f"the aiohttp client floor failed (exit {proc.returncode})")
        return math.nan
    got = json.loads(out)
    name = f"bare aiohttp client, {concurrency} at once"
    note = f"{got['errors']} errors" if got["errors"] else ""
    report.add(name, got["requests"] / got["seconds"], "req/s", note)
    return report.add(f"{name}: CPU per request", _us(got["cpu_s"], got["requests"]), "µs")


async def _ingest_wrk(
    report: Report,
    target: Target,
    opts: Options,
    stored: Callable[[str], Awaitable[int]] | None,
    name: str,
) -> Measured:
    """Closed loop with wrk: a warm-up, then the measured window (CPU and peak RSS)."""
    assert opts.wrk is not None
    prefix, _ = target.urls_for(NONE)
    urls, offers = list(target.urls), target.offers
    if opts.warmup > 0:
        await wrk.closed(opts.wrk, urls, prefix + "w", NONE, offers,
                         seconds=opts.warmup, connections=opts.connections,
                         cpus=opts.gen_cpus)  # fmt: skip
    peak: dict[int, int] = {}
    sampler = asyncio.create_task(_sample_memory(target.pids, peak))
    cpu = _cpu(target.pids)
    try:
        out = await wrk.closed(opts.wrk, urls, prefix, NONE, offers,
                               seconds=opts.seconds, connections=opts.connections,
                               cpus=opts.gen_cpus)  # fmt: skip
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    used = _cpu(target.pids) - cpu
    unit = "req/s" if stored is None else "conversions/s"
    rate = report.add(f"{name}: ingest" if stored else name, out.rate, unit, out.errors_note())
    what = "CPU per conversion" if stored else "CPU per request"
    cpu_us = report.add(f"{name}: {what}", _us(used, out.requests), "µs")
    report.add(f"{name}: p99 (wrk, {opts.connections} connections)", out.p99_ms, "ms")
    if peak:
        report.add(f"{name}: peak RSS", sum(peak.values()) / 1024, "MiB", "sampled")
    if stored is not None:
        count = sum([await stored(p) for p in out.prefixes])
        if count < out.ok:
            report.note(f"only {count} conversions stored for {out.ok} acknowledged: a bug")
    return Measured(rate, cpu_us, peak)


async def ingest(
    report: Report,
    target: Target,
    opts: Options,
    stored: Callable[[str], Awaitable[int]] | None = None,
) -> Measured:
    """Acknowledged (durably committed) conversions per second that fire nothing; the peak
    resident size (KiB) of each node while it lasted."""
    if opts.wrk:
        return await _ingest_wrk(report, target, opts, stored or _none_stored, target.name)
    prefix, url_for = target.urls_for(NONE)
    peak: dict[int, int] = {}
    sampler = asyncio.create_task(_sample_memory(target.pids, peak))
    cpu = _cpu(target.pids)
    try:
        out = await closed_loop(url_for, opts.connections, opts.seconds, opts.warmup)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    used = _cpu(target.pids) - cpu
    rate = report.add(f"{target.name}: ingest", out.rate, "conversions/s", _errors(out))
    cpu_us = report.add(f"{target.name}: ingest CPU per conversion", _us(used, out.total), "µs")
    if stored is not None:
        count = await stored(prefix)
        if count < out.ok:
            report.note(f"only {count} conversions stored for {out.ok} acknowledged: a bug")
    return Measured(rate, cpu_us, peak)


def _cpu(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def _us(used: float, requests: int) -> float:
    return used / max(requests, 1) * 1e6


def _errors(out: Outcome) -> str:
    return f"{out.errors} errors" if out.errors else ""


async def _wait_delivered(
    sink: SinkClient, client: aiohttp.ClientSession, keys: set[str], deadline: float
) -> set[str]:
    """Poll the sink until every key arrived or the deadline passed; the keys still missing."""
    until = time.monotonic() + deadline
    while True:
        await sink.refresh(client)
        missing = keys - sink.hits.keys()
        if not missing or time.monotonic() > until:
            return missing
        await asyncio.sleep(0.2)


class Backlog:
    """A gate that keeps at most `limit` acknowledged conversions waiting for delivery, so a
    node that ingests faster than it delivers is measured at what it can sustain, and its
    queue is short when the measurement ends."""

    def __init__(self, sink: SinkClient, client: aiohttp.ClientSession, limit: int) -> None:
        self.sink, self.client, self.limit = sink, client, limit
        self.acked = 0
        self.delivered = 0
        self._room = asyncio.Event()
        self._room.set()

    def _update(self) -> None:
        if self.acked - self.delivered < self.limit:
            self._room.set()
        else:
            self._room.clear()

    async def watch(self) -> None:
        base = await self.sink.refresh(self.client)
        while True:
            self.delivered = await self.sink.refresh(self.client) - base
            self._update()
            await asyncio.sleep(0.05)

    async def before(self) -> None:
        # Bounded: a node that stops delivering must not hang the benchmark.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._room.wait()

    def after(self, ok: bool) -> None:
        self.acked += ok
        self._update()


async def _none_stored(prefix: str) -> int:
    return 1 << 62  # no store to count in: nothing is reported missing


async def _sustained_wrk(
    report: Report, target: Target, sink: SinkClient, opts: Options
) -> Measured | None:
    """wrk posts conversions that fire one ping_url each for the window, as fast as they are
    acknowledged (no gate: a node that delivers slower than it ingests builds a backlog, and
    the figures show it); then until the last is delivered."""
    assert opts.wrk is not None
    seconds = opts.e2e_seconds or opts.seconds
    prefix, _ = target.urls_for(FIRE)
    peak: dict[int, int] = {}
    sampler = asyncio.create_task(_sample_memory(target.pids, peak))
    cpu = _cpu(target.pids)
    started = time.monotonic()
    out = await wrk.closed(opts.wrk, list(target.urls), prefix,
                           FIRE, target.offers, seconds=seconds,
                           connections=opts.connections)  # fmt: skip
    stop = time.monotonic()
    heads = tuple(f"generic:{p}-" for p in out.prefixes)
    async with aiohttp.ClientSession() as client:
        until = time.monotonic() + opts.drain_deadline
        while True:
            await sink.refresh(client)
            mine = [min(t) for k, t in sink.hits.items() if k.startswith(heads)]
            if len(mine) >= out.ok or time.monotonic() > until:
                break
            await asyncio.sleep(0.2)
    used = _cpu(target.pids) - cpu
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    name = target.name
    report.add(f"{name}: accepted while delivering", out.rate, "conversions/s", out.errors_note())
    report.add(f"{name}: p99 while delivering (wrk)", out.p99_ms, "ms")
    if peak:
        report.add(f"{name}: peak RSS while delivering", sum(peak.values()) / 1024, "MiB")
    in_window = sum(1 for t in mine if t <= stop)
    delivered = report.add(f"{name}: delivered while accepting", in_window / seconds, "/s")
    report.ratio(f"{name}: delivered / accepted (same window)", delivered, out.rate, "")
    if len(mine) < out.ok or not mine:
        report.note(
            f"{out.ok - len(mine)} of {out.ok} not delivered within {opts.drain_deadline} s"
        )
        return None
    whole = max(mine) - started
    rate = out.ok / whole
    note = f"{out.ok} accepted and delivered in {whole:.1f} s"
    report.add(f"{name}: end to end sustained", rate, "conversions/s", note)
    cpu_us = report.add(f"{name}: end to end CPU per conversion", _us(used, out.ok), "µs")
    return Measured(rate, cpu_us, delivered=delivered)


async def sustained(
    report: Report, target: Target, sink: SinkClient, opts: Options
) -> Measured | None:
    """Closed-loop posting of conversions that fire one ping_url each (at most opts.backlog of
    them undelivered at any time), then until the last is delivered: conversions ingested and
    delivered per second over that whole time. With wrk: see _sustained_wrk."""
    if opts.wrk:
        return await _sustained_wrk(report, target, sink, opts)
    prefix, url_for = target.urls_for(FIRE)
    cpu = _cpu(target.pids)
    async with aiohttp.ClientSession() as client:
        backlog = Backlog(sink, client, opts.backlog)
        watcher = asyncio.create_task(backlog.watch())
        try:
            out = await closed_loop(url_for, opts.connections, opts.seconds, 0.0, True, backlog)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        stop = out.started + opts.seconds
        keys = {key_of(f"{prefix}-{n}", offer_of(n, target.offers)) for n in out.acked}
        missing = await _wait_delivered(sink, client, keys, opts.drain_deadline)
    used = _cpu(target.pids) - cpu
    done = [min(sink.hits[k]) for k in keys - missing]
    report.add(f"{target.name}: ingest while delivering", out.rate, "conversions/s")
    in_window = sum(1 for t in done if t <= stop)
    report.add(f"{target.name}: delivered while ingesting", in_window / opts.seconds, "/s")
    if missing or not done:
        report.note(f"{len(missing)} of {len(keys)} not delivered within {opts.drain_deadline} s")
        return None
    whole = max(done) - out.started
    rate = len(keys) / whole
    name = f"{target.name}: end to end"
    note = f"{len(keys)} ingested and delivered in {whole:.1f} s"
    report.add(f"{name} sustained", rate, "conversions/s", note)
    cpu_us = report.add(f"{name} CPU per conversion", _us(used, len(keys)), "µs")
    return Measured(rate, cpu_us)


async def _delivery_latencies(
    sink: SinkClient, out: Outcome, keys: dict[str, int], deadline: float
) -> tuple[list[float], set[str]]:
    """Wait (up to `deadline`) for the deliveries of `keys` (idempotency key -> the request of
    the open loop `out` that fired it); each one's latency (first arrival at the sink minus the
    request's planned send) and the keys that never arrived."""
    async with aiohttp.ClientSession() as client:
        missing = await _wait_delivered(sink, client, set(keys), deadline)
    lat = [min(sink.hits[k]) - out.intended[n] for k, n in keys.items() if k not in missing]
    return lat, missing


# The status-change figure: a conversion's approval follows its pending arrival by this long.
CHANGE_AFTER = 0.2


def change_plan(
    prefix: str, offers: int, rate: float
) -> Callable[[int], tuple[int, str, str | None]]:
    """Request n of the status-change figure at `rate` requests a second: (the conversion it
    is for, its query, the idempotency key of the delivery it fires or None). Even n: a new
    conversion arrives pending (nothing fires); odd n: the conversion that came pending
    CHANGE_AFTER earlier is approved (a status change: one ping_url, on its second arrival).
    The odd requests before any conversion is that old send a pending arrival of their own."""
    lag = max(1, round(rate * CHANGE_AFTER / 2))  # in conversions (two requests each)

    def plan(n: int) -> tuple[int, str, str | None]:
        k = n // 2 - (n % 2) * lag
        cid = f"{prefix}-{k}" if k >= 0 else f"{prefix}-early{n}"
        offer = offer_of(max(k, 0), offers)
        if n % 2 == 0 or k < 0:
            return k, conversion_query(cid, offer, FIRE, "pending"), None
        return k, conversion_query(cid, offer, FIRE, "approved"), key_of(cid, offer, seq=2)

    return plan


async def change_latency(report: Report, target: Target, sink: SinkClient, opts: Options) -> None:
    """Open loop at opts.rate requests a second, half of them approvals of conversions that
    came pending CHANGE_AFTER earlier (change_plan): receipt of the approval to delivery, the
    usual way a sale fires its postbacks. A conversion's two arrivals go to the same node."""
    prefix, _ = target.urls_for(FIRE)  # a prefix of its own
    plan = change_plan(prefix, target.offers, opts.rate)
    urls = list(target.urls)

    def url_for(n: int) -> str:
        k, query, _ = plan(n)
        return f"{urls[max(k, 0) % len(urls)]}/webhooks/generic?{query}"

    out = await open_loop(url_for, opts.rate, opts.latency_seconds, max(opts.connections, 256))
    keys = {key: n for n in out.acked if (key := plan(n)[2]) is not None}
    lat, missing = await _delivery_latencies(sink, out, keys, opts.drain_deadline)
    name, rate = target.name, opts.rate
    if lat:
        what = f"{name}: status change to delivery"
        report.add(f"{what} p50 at {rate:,.0f}/s", percentile(lat, 50) * 1000, "ms")
        report.add(f"{what} p99 at {rate:,.0f}/s", percentile(lat, 99) * 1000, "ms")
        # the approval's own answer (planned send to 200), the part of the above that ingest takes
        acks = [out.acked[n] - out.intended[n] for n in keys.values()]
        report.add(f"{name}: status change answered p50 at {rate:,.0f}/s",
                   percentile(acks, 50) * 1000, "ms")  # fmt: skip
    # An approval sent while its conversion's pending arrival was still on its way (the open
    # loop's requests overtake each other when the node lags) reaches the node first: there
    # the conversion is new and approved, and fires on its first arrival, under that key.
    first = {key for key in missing if first_arrival_key(plan, keys[key], prefix, target.offers)
             in sink.hits}  # fmt: skip
    if first:
        report.note(
            f"status changes at {rate:,.0f}/s: {len(first)} of {len(keys)} approvals reached the "
            "node before their pending arrival and were delivered as the conversion's first"
        )
    if out.errors or missing - first:
        report.note(
            f"status changes at {rate:,.0f}/s: {out.errors} requests failed, "
            f"{len(missing - first)} of {len(keys)} approvals not delivered within "
            f"{opts.drain_deadline:.0f} s"
        )


def first_arrival_key(
    plan: Callable[[int], tuple[int, str, str | None]], n: int, prefix: str, offers: int
) -> str:
    """The key of the delivery request n (an approval of change_plan) fires if it reaches the
    node before its conversion's pending arrival: the conversion's first arrival."""
    k = plan(n)[0]
    return key_of(f"{prefix}-{k}", offer_of(k, offers), seq=1)


async def latency(report: Report, target: Target, sink: SinkClient, opts: Options) -> None:
    """Open loop at opts.rate: receipt-to-delivery latency (sink arrival minus the planned send
    time), and whether the rate was sustained."""
    prefix, url_for = target.urls_for(FIRE)
    conns = max(opts.connections, 256)
    out = await open_loop(url_for, opts.rate, opts.latency_seconds, conns)
    total = len(out.intended)
    keys = {key_of(f"{prefix}-{n}", offer_of(n, target.offers)): n for n in out.acked}
    lat, missing = await _delivery_latencies(sink, out, keys, opts.drain_deadline)
    name, rate = target.name, opts.rate
    if lat:
        report.add(f"{name}: latency p50 at {rate:,.0f}/s", percentile(lat, 50) * 1000, "ms")
        report.add(f"{name}: latency p99 at {rate:,.0f}/s", percentile(lat, 99) * 1000, "ms")
        report.add(f"{name}: latency max at {rate:,.0f}/s", max(lat) * 1000, "ms")
    report.add(f"{name}: generator lag p99", percentile(out.lag, 99) * 1000, "ms")
    last_ack = max(out.acked.values(), default=out.started)
    last_delivery = max((min(sink.hits[k]) for k in keys if k not in missing), default=0.0)
    acked_rate = len(out.acked) / max(last_ack - out.started, 1e-9)
    delivered_rate = len(lat) / max(last_delivery - out.started, 1e-9)
    ok = out.errors == 0 and not missing and min(acked_rate, delivered_rate) >= 0.95 * rate
    verdict = "sustained" if ok else "NOT sustained"
    report.add(f"{name}: acknowledged at {rate:,.0f}/s offered", acked_rate, "/s", verdict)
    report.add(f"{name}: delivered at {rate:,.0f}/s offered", delivered_rate, "/s", verdict)
    if not ok:
        report.note(
            f"{rate:,.0f}/s not sustained: {total} sent, {len(out.acked)} acknowledged "
            f"({out.errors} errors), {len(lat)} delivered; latencies include the queueing"
        )
