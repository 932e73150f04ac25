"""Alertmanager beside postbackd (`--only alertmanager`): the Debian package
`prometheus-alertmanager`, installed by the bench when missing and run as root, else skipped
with the reason.

It runs on loopback with one receiver, a webhook to the benchmark's sink, and grouping by every
label (`group_by: ['...']`, `group_wait: 0s`): each alert posted is one notification, as each
conversion of the end-to-end figure is one ping_url. wrk posts one new alert per request to
`POST /api/v2/alerts` for the window; the figures are the alerts accepted per second, the
notifications the sink received per second (in the window, and until the last one), the
server CPU per request and the peak resident size. Alertmanager keeps alerts in memory: an
accepted alert is not durable, where postbackd's 200 comes after an fsync'd commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp

from bench import wrk
from bench.context import Context
from bench.procs import Proc, cpu_seconds, free_port, memory_kib

BINARIES = ("prometheus-alertmanager", "alertmanager")
SINK_KEY = "alertmanager"  # the sink counts arrivals per `k`: every notification has this one

_LUA = r"""
local prefix, counter, threads = "%(prefix)s", 0, {}
setup = function(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
request = function()
  local n = counter * 2 + tid
  counter = counter + 1
  local body = '[{"labels": {"alertname": "bench", "id": "' .. prefix .. '-' .. n ..
    '"}, "annotations": {"summary": "conversion ' .. n .. '"}}]'
  return wrk.format("POST", "/api/v2/alerts", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "duration_us": %%d, "non200": %%d, "socket_errors": %%d, ' ..
    '"p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def find_or_install() -> tuple[str | None, str]:
    """The alertmanager binary, or None and why it is skipped."""
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return found, f"{found} found"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "prometheus-alertmanager is not installed and this is not root: skipped"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus-alertmanager"]
    done = subprocess.run(argv, env=env, capture_output=True, check=False)
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            # The package starts a service of its own: stop it (it would listen on :9093).
            subprocess.run(["systemctl", "stop", "prometheus-alertmanager"],
                           capture_output=True, check=False)  # fmt: skip
            return found, "prometheus-alertmanager installed with apt-get"
    return None, f"prometheus-alertmanager could not be installed (apt-get exit {done.returncode})"


def _version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    text = (out.stdout or out.stderr).splitlines()
    return text[0] if text else "?"


def _config(root: Path, sink_url: str) -> Path:
    config = {
        "route": {
            "receiver": "sink",
            "group_by": ["..."],  # every alert its own group: one notification per alert
            "group_wait": "0s",
            "group_interval": "1s",
            "repeat_interval": "24h",
        },
        "receivers": [
            {
                "name": "sink",
                "webhook_configs": [{"url": f"{sink_url}/am?k={SINK_KEY}", "send_resolved": False}],
            }
        ],
    }
    path = root / "alertmanager.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


async def alertmanager(ctx: Context) -> None:
    report, opts = ctx.report, ctx.opts
    report.start("alertmanager", "Alertmanager beside postbackd: accepted and delivered, memory")
    if opts.wrk is None:
        report.note("skipped: wrk is not available")
        return
    binary, how = find_or_install()
    report.note(how)
    if binary is None:
        return
    sink = await ctx.start_sink()
    root = ctx.workdir / "alertmanager"
    root.mkdir(exist_ok=True)
    port = free_port()
    args = [
        binary,
        f"--config.file={_config(root, sink.base_url)}",
        f"--storage.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no gossip: one instance, loopback only
    ]
    proc = Proc("alertmanager", args, root / "alertmanager.log", port)
    proc.start()
    try:
        await proc.ready("/-/ready", 60)
        report.note(f"{_version(binary)}; in memory (an accepted alert is not durable)")
        await _measure(ctx, proc)
    finally:
        proc.stop()


async def _measure(ctx: Context, proc: Proc) -> None:
    report, opts = ctx.report, ctx.opts
    assert opts.wrk is not None
    sink = await ctx.start_sink()
    seconds = opts.e2e_seconds or opts.seconds
    peak = 0
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop_sampling.is_set():
            with contextlib.suppress(OSError):
                peak = max(peak, memory_kib(proc.pid)["VmRSS"])
            await asyncio.sleep(0.25)

    async with aiohttp.ClientSession() as client:
        await sink.refresh(client)
        base = len(sink.hits.get(SINK_KEY, []))
        sampler = asyncio.create_task(sample())
        cpu = cpu_seconds(proc.pid)
        started = time.monotonic()
        lua = root_script(ctx.workdir, f"am{int(started)}")
        out = await wrk.run_wrk(opts.wrk, proc.url, lua, seconds=seconds,
                                connections=opts.connections)  # fmt: skip
        stop = time.monotonic()
        until = stop + opts.drain_deadline
        while True:
            await sink.refresh(client)
            times = sink.hits.get(SINK_KEY, [])[base:]
            if len(times) >= out.ok or time.monotonic() > until:
                break
            await asyncio.sleep(0.2)
        used = cpu_seconds(proc.pid) - cpu
        stop_sampling.set()
        await sampler
    report.add("Alertmanager: alerts accepted", out.rate, "/s", out.errors_note())
    report.add("Alertmanager: CPU per accepted alert", used / max(out.requests, 1) * 1e6, "µs")
    report.add("Alertmanager: p99 (wrk)", out.p99_ms, "ms")
    in_window = sum(1 for t in times if t <= stop)
    delivered = report.add("Alertmanager: notifications delivered while accepting",
                           in_window / seconds, "/s")  # fmt: skip
    if times:
        whole = max(times) - started
        report.add("Alertmanager: delivered over the whole run", len(times) / whole, "/s",
                   f"{len(times)} of {out.ok} in {whole:.1f} s")  # fmt: skip
    report.add("Alertmanager: peak RSS", peak / 1024, "MiB", "sampled")
    ctx.figures["am_accepted"] = out.rate
    ctx.figures["am_delivered"] = delivered
    ctx.figures["am_rss_mib"] = peak / 1024
    for ours, theirs, what in (
        ("ingest_sqlite", "am_accepted", "accepted"),
        ("e2e_delivered_sqlite", "am_delivered", "delivered while accepting"),
        ("e2e_sqlite", "am_delivered", "end to end sustained / AM delivered"),
    ):
        if ours in ctx.figures and ctx.figures.get(theirs):
            report.ratio(f"postbackd / Alertmanager, {what}", ctx.figures[ours],
                         ctx.figures[theirs], "same run")  # fmt: skip
    if "rss_sqlite_mib" in ctx.figures and peak:
        report.ratio("peak RSS postbackd / Alertmanager", ctx.figures["rss_sqlite_mib"],
                     peak / 1024, "")  # fmt: skip


def root_script(workdir: Path, prefix: str) -> Path:
    path = workdir / f"wrk-{prefix}.lua"
    path.write_text(_LUA % {"prefix": prefix})
    return path
