"""What the sections of one benchmark run share: options, the report, the work directory, the
sink process and the generated rule sets."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.http_figures import Options
from bench.procs import Daemon, Proc, server
from bench.report import Report
from bench.rulesgen import write_rules
from bench.servers import SinkClient

SMALL_OFFERS = 1  # 1 offer x 10 postbacks
LARGE_OFFERS = 10_000  # 10,000 offers x 10 postbacks = 100,000


@dataclass
class Context:
    report: Report
    opts: Options
    workdir: Path
    large_offers: int = LARGE_OFFERS
    pg_dsn: str | None = None
    per_host: int | None = None  # outbound.per_host_concurrency; None = the shipped default
    sink_proc: Proc | None = None
    sink: SinkClient | None = None
    small_rules: Path | None = None
    large_rules: Path | None = None
    figures: dict[str, float] = field(default_factory=dict)  # for ratios across sections
    daemons: list[Daemon] = field(default_factory=list)

    async def start_sink(self) -> SinkClient:
        if self.sink is None:
            self.sink_proc = server("sink", self.workdir)
            self.sink_proc.start()
            await self.sink_proc.ready("/_stats", 30)
            self.sink = SinkClient(self.sink_proc.url)
        return self.sink

    async def rules(self, large: bool) -> Path:
        """The small or the large rule set, generated on first use (postbacks ping the sink)."""
        sink = await self.start_sink()
        if large:
            if self.large_rules is None:
                self.large_rules = self.workdir / "rules-large"
                write_rules(self.large_rules, self.large_offers, sink.base_url)
            return self.large_rules
        if self.small_rules is None:
            self.small_rules = self.workdir / "rules-small"
            write_rules(self.small_rules, SMALL_OFFERS, sink.base_url)
        return self.small_rules

    def daemon(self, name: str, store: str, rules_dir: Path, per_host: int | None = None) -> Daemon:
        return self.daemon_with(name, store, rules_dir, per_host)

    def daemon_with(
        self,
        name: str,
        store: str,
        rules_dir: Path,
        per_host: int | None = None,
        *,
        extra: dict[str, Any] | None = None,
        cpus: str | None = None,
    ) -> Daemon:
        """A started daemon; `extra` settings, `cpus` a taskset CPU list."""
        per_host = per_host or self.per_host
        daemon = Daemon(name, self.workdir, store, rules_dir, per_host, extra=extra, cpus=cpus)
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        if self.sink_proc is not None:
            self.sink_proc.stop()


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"  # an absolute path: sqlite:////...


def sqlite_stored(path: Path) -> Callable[[str], Awaitable[int]]:
    """An async counter of the conversions stored under an id prefix (read-only connection)."""

    async def count(prefix: str) -> int:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            row = conn.execute(
                "SELECT count(*) FROM conversion WHERE conversion_id LIKE ?", (f"{prefix}-%",)
            ).fetchone()
            return int(row[0])
        finally:
            conn.close()

    return count
