"""`postbackd run` as a real subprocess on a free loopback port, for process-level tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import wait_for

# Ports for the daemons that tests start and restart. Not bind(0): that picks from the kernel's
# ephemeral range, where every outbound connection of every test also takes its local port, so a
# port found free and closed could be taken by a client socket before the daemon (or its restart)
# binds it ("address already in use"). These come from below that range, a block per xdist
# worker, in turn; a port some other program holds is skipped.
_PORT_BASE = 20_000
_PORT_BLOCK = 1_000
_next_port = [0]


def _worker_index(name: str | None) -> int:
    """gw0 -> 0, gw1 -> 1 ...; 0 outside xdist."""
    digits = (name or "").removeprefix("gw")
    return int(digits) % 10 if digits.isdigit() else 0


def free_port() -> int:
    """A loopback port no other test process is handed and that is free now."""
    base = _PORT_BASE + _worker_index(os.environ.get("PYTEST_XDIST_WORKER")) * _PORT_BLOCK
    for _ in range(_PORT_BLOCK):
        port = base + _next_port[0] % _PORT_BLOCK
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {base}-{base + _PORT_BLOCK - 1}")


def write_config(root: Path, *, port: int, store: str | None = None, **extra: Any) -> Path:
    """A settings file under root/config with rules.d and webhooks beside it."""
    conf = root / "config"
    conf.mkdir(parents=True, exist_ok=True)
    (root / "rules.d").mkdir(exist_ok=True)
    (root / "webhooks").mkdir(exist_ok=True)
    settings: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "store": store or "sqlite:///../var/postbackd.db",
        "rules_dir": "../rules.d",
        "webhooks_dir": "../webhooks",
        "outbound": {"allow_cidrs": ["127.0.0.1/32"], "timeout": "5s"},
        "log": {"format": "json", "level": "info"},
    }
    settings.update(extra)
    (root / "var").mkdir(exist_ok=True)
    path = conf / "postbackd.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    return path


def log_events(log: Path, name: str) -> list[dict[str, Any]]:
    """The JSON lines of the daemon's log `log` whose event is `name`, in order."""
    out = []
    for line in log.read_text("utf-8", "replace").splitlines():
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == name:
                out.append(event)
    return out


class DaemonProcess:
    """Start, kill and restart `postbackd run -c CONFIG`; stdout collected to a log file."""

    def __init__(self, config: Path, port: int, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.port = port
        self.env = {
            k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")
        }
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config.parent.parent / "daemon.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run", "-c", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    async def ready(self, deadline: float = 20.0) -> None:
        async with aiohttp.ClientSession() as session:

            async def up() -> bool:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"daemon exited: {self.log.read_text()[-2000:]}")
                try:
                    async with session.get(f"{self.url}/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(up, deadline=deadline, interval=0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.log, name)


def children(pid: int) -> list[int]:
    """The process ids whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def ping_rules(sink_url: str, postback: int = 7) -> str:
    """One offer with one ping_url postback to `sink_url` (a rule file's text)."""
    return f"""
offer: 1
postbacks:
  - id: {postback}
    trigger: conversion_done
    affiliate: "*"
    status: active
    created_at: 2026-11-01T10:00:00Z
    author: {{id: 1, name: Test}}
    action: {{type: ping_url, url: "{sink_url}/pb?k={{idempotency_key}}"}}
"""
