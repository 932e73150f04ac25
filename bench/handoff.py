"""The SQLite write hand-off without HTTP (part of `--only workers`): two processes, each a
group-commit writer (daemon/store/sqlite_writer.py) with many callers inserting into one file,
with the flock hand-off (daemon/store/sqlite_lock.py) and without it (SQLite's busy handler
alone), alternating. Writes/s, commits/s, the p99 of a caller's wait and how the writes were
shared between the two processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from daemon.store.sqlite import connect
from daemon.store.sqlite_writer import GroupCommitWriter

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

Outcomes: TypeAlias = "Queue[tuple[int, int, float]]"  # per process: writes, commits, p99 wait (s)
CALLERS = 32  # per process: about what wrk's 64 connections give each of 2 workers


@dataclass
class Result:
    writes: float  # per second, both processes
    commits: float  # per second, both processes
    p99_ms: float  # a caller's wait for its write, the worse process
    share: float  # the smaller process's part of the writes (0.5: even)


def _writer(path: str, handoff: bool, seconds: float, start: float, out: Outcomes) -> None:
    async def main() -> None:
        writer = GroupCommitWriter(lambda: connect(Path(path), 5.0), handoff=handoff)
        await asyncio.to_thread(writer.start)
        waits: list[float] = []
        await asyncio.sleep(max(start - time.time(), 0.0))
        stop = start + seconds

        async def caller() -> None:
            while time.time() < stop:
                t0 = time.perf_counter()
                await writer.submit(
                    lambda conn: conn.execute("INSERT INTO t (payload) VALUES (?)", ("x" * 200,)),
                    on_loop=True,  # as the daemon's arrivals
                )
                waits.append(time.perf_counter() - t0)

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
        commits = writer.commits
        await asyncio.to_thread(writer.stop)
        waits.sort()
        out.put((len(waits), commits, waits[int(len(waits) * 0.99)] if waits else 0.0))

    asyncio.run(main())


def measure(path: Path, handoff: bool, seconds: float) -> Result:
    """One window of `seconds` on a fresh file at `path`."""
    for name in ("", "-wal", "-shm", "-writelock"):
        Path(f"{path}{name}").unlink(missing_ok=True)
    conn = connect(path, 5.0)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
    conn.close()
    ctx = multiprocessing.get_context("spawn")
    out: Outcomes = ctx.Queue()
    start = time.time() + 2.0  # both processes started (spawn imports the daemon)
    procs = [
        ctx.Process(target=_writer, args=(str(path), handoff, seconds, start, out))
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    got = [out.get(timeout=seconds + 120) for _ in procs]
    for proc in procs:
        proc.join()
    counts = [count for count, _, _ in got]
    commits = sum(commits for _, commits, _ in got)
    p99 = max(p99 for _, _, p99 in got)
    total = sum(counts)
    return Result(total / seconds, commits / seconds, p99 * 1000, min(counts) / total)
