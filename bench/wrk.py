"""wrk, the closed-loop load generator of `make bench` (a C program: it is not the bottleneck).

Each request is a `GET /webhooks/generic?...` with a new conversion id `{prefix}-{n}` (n unique
across wrk's threads) on offer `offer_of(n)`, the same URLs as bench/rulesgen.py builds in
Python. A Lua `done` hook prints one JSON line: requests, non-200 answers, socket errors and
latency percentiles.

`ensure_wrk()` finds wrk on PATH; when it is missing and we are root it installs the Debian
package with apt-get, else it says why the wrk figures are skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_LUA = r"""
local prefix, sub1, offers, nthreads = "%(prefix)s", "%(sub1)s", %(offers)d, %(threads)d
local counter = 0
local threads = {}
setup = function(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
init = function(args) bad = 0 end
request = function()
  local n = counter * nthreads + tid
  counter = counter + 1
  local cid = prefix .. "-" .. n
  local offer = (n * 7919) %% offers + 1
  return wrk.format("GET", "/webhooks/generic?conversion_id=" .. cid .. "&offer=" ..
    offer .. "&affiliate=42&status=approved&payout=12.50&currency=USD&click_id=ck" .. cid ..
    "&sub1=" .. sub1)
end
response = function(status, headers, body)
  if status ~= 200 then bad = bad + 1 end
end
done = function(summary, latency, requests)
  local bad_total = 0
  for _, t in ipairs(threads) do bad_total = bad_total + (t:get("bad") or 0) end
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "duration_us": %%d, "non200": %%d, "socket_errors": %%d, ' ..
    '"p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d}\n',
    summary.requests, summary.duration, bad_total,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int  # every request answered (200 or not)
    seconds: float
    non200: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def ok(self) -> int:
        return self.requests - self.non200

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def errors_note(self) -> str:
        bad = self.non200 + self.socket_errors
        return f"{bad} errors" if bad else ""


def ensure_wrk() -> tuple[str | None, str]:
    """wrk's path, or None and why not; installs the Debian package when root and missing."""
    found = shutil.which("wrk")
    if found:
        return found, "wrk found at " + found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "wrk is not installed (apt-get install wrk as root to get these figures)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", "wrk"], env=env, capture_output=True, check=False
    )
    found = shutil.which("wrk")
    if done.returncode != 0 or not found:
        return None, f"wrk could not be installed with apt-get (exit {done.returncode})"
    return found, "wrk installed with apt-get"


def script(workdir: Path, prefix: str, sub1: str, offers: int, threads: int) -> Path:
    """The Lua script of one run: conversion ids `{prefix}-{n}`, n unique across `threads`
    (wrk talks to one host: several nodes get one wrk each, with prefixes of their own)."""
    text = _LUA % {"prefix": prefix, "sub1": sub1, "offers": offers, "threads": threads}
    path = workdir / f"wrk-{prefix}.lua"
    path.write_text(text)
    return path


async def run_wrk(
    wrk: str,
    url: str,
    lua: Path,
    *,
    seconds: float,
    connections: int,
    threads: int = 2,
    cpus: str | None = None,
) -> WrkResult:
    """One wrk run against url for `seconds`; cpus: a taskset CPU list for the generator."""
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    argv += ["--latency", "-s", str(lua), url]
    if cpus and shutil.which("taskset"):
        argv = ["taskset", "-c", cpus, *argv]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        if line.startswith("{"):
            data = json.loads(line)
            return WrkResult(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                non200=data["non200"],
                socket_errors=data["socket_errors"],
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                max_ms=data["max_us"] / 1000,
            )
    raise RuntimeError(f"wrk printed no summary (exit {proc.returncode}): {err.decode()[-500:]}")


@dataclass(frozen=True)
class Closed:
    """A closed-loop run over one or more nodes: what every wrk saw, summed."""

    results: tuple[WrkResult, ...]
    prefixes: tuple[str, ...]  # conversion ids of node i are f"{prefixes[i]}-{n}"

    @property
    def ok(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.results)

    @property
    def seconds(self) -> float:
        return max(r.seconds for r in self.results)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def p99_ms(self) -> float:
        return max(r.p99_ms for r in self.results)

    def errors_note(self) -> str:
        bad = sum(r.non200 + r.socket_errors for r in self.results)
        return f"{bad} errors" if bad else ""


async def closed(
    wrk: str,
    urls: list[str],
    prefix: str,
    sub1: str,
    offers: int,
    *,
    seconds: float,
    connections: int,
    cpus: str | None = None,
) -> Closed:
    """One wrk per node at once (connections split between them), each with its own prefix;
    one thread per node for a single connection (one request at a time), else two."""
    threads = min(2, connections)
    per_node = max(threads, connections // len(urls))
    prefixes = tuple(f"{prefix}n{i}" for i in range(len(urls)))
    with tempfile.TemporaryDirectory(prefix="postbackd-wrk-") as tmp:
        runs = [
            run_wrk(
                wrk,
                url,
                script(Path(tmp), p, sub1, offers, threads),
                seconds=seconds,
                connections=per_node,
                threads=threads,
                cpus=cpus,
            )
            for url, p in zip(urls, prefixes, strict=True)
        ]
        return Closed(tuple(await asyncio.gather(*runs)), prefixes)
