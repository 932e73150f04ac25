"""The processes a benchmark run starts (`postbackd run`, the hello server, the sink): start,
readiness, resident size, log events, stop. Loopback only."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

# One line per conversion and per attempt: never waited for, so not parsed.
_PER_REQUEST = (b'"conversion_received"', b'"delivery_attempt"')


PACED = "paced"  # started()'s key for the arrivals that waited (not a way deliveries start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def child_env() -> dict[str, str]:
    """Our environment without what would change the daemon's settings or talk to systemd."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACKD_")}
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    return env


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in KiB."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(rest.split()[0])
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Proc:
    """One child process with its output in a log file."""

    def __init__(self, name: str, args: Sequence[str], log: Path, port: int) -> None:
        self.name = name
        self.args = list(args)
        self.log = log
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, env=child_env()
            )

    async def ready(self, path: str, deadline: float) -> float:
        """Wait until GET path answers 200; the seconds since start."""
        until = time.monotonic() + deadline
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    tail = self.log.read_text("utf-8", "replace")[-3000:]
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
                try:
                    async with session.get(self.url + path) as resp:
                        if resp.status == 200:
                            return time.monotonic() - self.started_at
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > until:
                    raise RuntimeError(f"{self.name} not ready within {deadline:.0f} s")
                await asyncio.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def server(kind: str, workdir: Path, cpus: str | None = None, extra: Sequence[str] = ()) -> Proc:
    """A helper server of bench/servers.py as a process (on `cpus`: taskset)."""
    port = free_port()
    args = [sys.executable, "-m", "bench.servers", kind, "--port", str(port), *extra]
    if cpus and shutil.which("taskset"):
        args = ["taskset", "-c", cpus, *args]
    return Proc(kind, args, workdir / f"{kind}.log", port)


_STARTED = re.compile(r'^postbackd_deliveries_started_total\{via="([a-z_]+)"\} (\S+)$', re.M)
_PACED = re.compile(r'^postbackd_ingest_paced_total\{released_by="[a-z_]+"\} (\S+)$', re.M)


class Daemon(Proc):
    """`postbackd run -c SETTINGS` with its settings file written for the benchmark."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        store: str,
        rules_dir: Path,
        per_host: int | None = None,
        *,
        extra: dict[str, Any] | None = None,
        cpus: str | None = None,
    ) -> None:
        port = free_port()
        root = workdir / name
        root.mkdir(parents=True, exist_ok=True)
        (root / "webhooks").mkdir(exist_ok=True)
        settings: dict[str, Any] = {
            "listen": f"127.0.0.1:{port}",
            "store": store,
            "rules_dir": str(rules_dir),
            "webhooks_dir": str(root / "webhooks"),
            "outbound": {"allow_cidrs": ["127.0.0.1/32"]},  # the sink; the rest is default
            "log": {"format": "json", "level": "info"},  # as under systemd (journald)
            "state_dir": str(root),  # its own parsed-rules cache (daemon/rulecache.py)
            **(extra or {}),
        }
        if per_host is not None:
            settings["outbound"]["per_host_concurrency"] = per_host
        config = root / "postbackd.yaml"
        config.write_text(json.dumps(settings))  # JSON is YAML
        args = [sys.executable, "-m", "daemon", "run", "-c", str(config)]
        if cpus and shutil.which("taskset"):
            args = ["taskset", "-c", cpus, *args]  # every worker inherits the CPU set
        super().__init__(name, args, root / "daemon.log", port)
        self._read_to = 0
        self._events: dict[str, list[dict[str, Any]]] = {}

    async def ready_daemon(self, deadline: float = 60.0) -> float:
        return await self.ready("/readyz", deadline)

    async def started(self) -> dict[str, float]:
        """How its deliveries started so far (postbackd_deliveries_started_total, by `via`:
        claim, lease_at_insert), and under PACED the arrivals that waited for delivery
        (postbackd_ingest_paced_total, daemon/pacing.py; 0 where nothing paces)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}/metrics") as resp,
        ):
            text = await resp.text()
        counts = {via: float(n) for via, n in _STARTED.findall(text)}
        counts[PACED] = sum(float(n) for n in _PACED.findall(text))
        return counts

    def events(self, event: str) -> list[dict[str, Any]]:
        """Every log line of `event` (not a per-request one) so far. The log is read from where
        the last call stopped (it grows by tens of MiB under load)."""
        with self.log.open("rb") as log:
            log.seek(self._read_to)
            chunk = log.read()
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._read_to += end
        for raw in chunk[:end].splitlines():
            if raw.startswith(b"{") and not any(name in raw for name in _PER_REQUEST):
                try:
                    parsed = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                self._events.setdefault(parsed.get("event", ""), []).append(parsed)
        return list(self._events.get(event, []))

    async def wait_event(self, event: str, count: int, deadline: float) -> dict[str, Any]:
        """The `count`-th log line of `event` (1-based), once it has been written."""
        until = time.monotonic() + deadline
        while True:
            found = self.events(event)
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() > until:
                raise RuntimeError(f"{self.name}: no {event} line within {deadline:.0f} s")
            await asyncio.sleep(0.2)


async def started(daemons: Sequence[Daemon]) -> dict[str, float]:
    """How the nodes' deliveries started so far, summed over them (by `via`)."""
    total: dict[str, float] = {}
    for daemon in daemons:
        for via, count in (await daemon.started()).items():
            total[via] = total.get(via, 0.0) + count
    return total


def leased_share(since: dict[str, float], now: dict[str, float]) -> float | None:
    """The share of the deliveries started between two started() readings that were leased at
    insert, or None when none started."""
    got = {via: count - since.get(via, 0.0) for via, count in now.items() if via != PACED}
    total = sum(got.values())
    return got.get("lease_at_insert", 0.0) / total if total else None
