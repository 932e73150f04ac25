"""SQLite faults against the real `postbackd run` with conversions flowing: another process
holding the write lock longer than the busy timeout (5 s), and the disk full (a small tmpfs
the test mounts, filled to the last byte by a filler file) while conversions and claims flow,
then space freed."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.support import (
    RESUME_WITHIN,
    FaultSink,
    Node,
    ReadyWatch,
    Traffic,
    all_delivered,
    assert_no_unexplained_duplicates,
    assert_resumed,
    client_session,
    flowing,
)
from tests.harness import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

LOCK_HELD = 7.0  # longer than the store's busy timeout (5 s)

HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


async def test_another_process_holds_the_write_lock_past_the_busy_timeout(
    tmp_path: Path, fault_sink: FaultSink
) -> None:
    db = tmp_path / "var" / "postbackd.db"
    node = Node(tmp_path / "n0", f"sqlite:///{db}", fault_sink)
    node.start()
    async with client_session() as session:
        watch = ReadyWatch(session, node)
        traffic = Traffic(session, [node])
        try:
            await flowing(session, node, watch, traffic, fault_sink)
            holder = await asyncio.create_subprocess_exec(
                sys.executable, "-c", HOLD_LOCK, str(db), str(LOCK_HELD),
                stdout=subprocess.PIPE,
            )  # fmt: skip
            assert holder.stdout is not None
            assert await holder.stdout.readline() == b"locked\n"
            t0 = time.monotonic()
            await watch.reported_not_ready(t0, "sqlite_faults report")
            assert await holder.wait() == 0
            t1 = time.monotonic()
            await assert_resumed(fault_sink, "sqlite_faults resume", t1)
            acked = traffic.count()
            await wait_for(lambda: traffic.count() >= acked + 20, deadline=RESUME_WITHIN)
        finally:
            await traffic.stop()
        await all_delivered(fault_sink, traffic)
        await watch.stop_once_ready()
    assert node.stop() == 0
    node.assert_clean_log()
    # The claim waits on the lock: the dispatcher is stalled (or failing, once a wait ends in
    # SQLITE_BUSY), said once, and recovered once.
    assert [e["loop"] for e in node.events("loop_stalled") + node.events("loop_failing")]
    assert [e["loop"] for e in node.events("loop_recovered")] == ["dispatcher"]
    assert_no_unexplained_duplicates(fault_sink)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the disk-full fault: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write a filler file until the file system has no byte left (a bounded number of writes:
    the daemon frees and takes pages meanwhile)."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out:
        for _ in range(10_000):
            stat = os.statvfs(folder)
            free = stat.f_bavail * stat.f_frsize
            if free == 0:
                break
            try:
                out.write(b"\0" * min(free, 1 << 20))
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
    return filler


async def test_the_disk_full_while_conversions_and_claims_flow_then_space_freed(
    tmp_path: Path, fault_sink: FaultSink
) -> None:
    with small_tmpfs(tmp_path / "var", "32m") as var:
        node = Node(tmp_path / "n0", f"sqlite:///{var / 'postbackd.db'}", fault_sink)
        node.start()
        async with client_session() as session:
            watch = ReadyWatch(session, node)
            traffic = Traffic(session, [node])
            try:
                await flowing(session, node, watch, traffic, fault_sink)
                t0 = time.monotonic()
                filler = var / "filler"
                await asyncio.to_thread(fill, var)
                await watch.reported_not_ready(t0, "sqlite_faults report")
                acked = traffic.count()
                await wait_for(lambda: traffic.refused > 0, deadline=5)  # ingest says 503
                await asyncio.sleep(max(0.0, t0 + 3.0 - time.monotonic()))  # full for 3 s
                filler.unlink()
                t1 = time.monotonic()
                await assert_resumed(fault_sink, "sqlite_faults resume", t1)
                await wait_for(lambda: traffic.count() >= acked + 20, deadline=RESUME_WITHIN)
            finally:
                (var / "filler").unlink(missing_ok=True)  # the space comes back, whatever failed
                await traffic.stop()
            await all_delivered(fault_sink, traffic)
            await watch.stop_once_ready()
        assert node.stop() == 0
    node.assert_clean_log()
    # The outage is logged once when the arrivals start failing and once when they recover;
    # each refused request is one info line with its 503.
    failing = [e["operation"] for e in node.events("store_failing")].count("record_arrival")
    recovered = [e["operation"] for e in node.events("store_recovered")].count("record_arrival")
    assert failing >= 1
    assert recovered == failing  # every failing spell ended with a recovery line
    assert any(e.get("http_status") == 503 for e in node.events("conversion_rejected"))
    # The dispatcher fails only if it had something to claim meanwhile; if it did, it recovered.
    failed = [e["loop"] for e in node.events("loop_failing")]
    assert [e["loop"] for e in node.events("loop_recovered")] == failed
    assert_no_unexplained_duplicates(fault_sink)


# One write batch that changes far more than 64 KiB of pages already in the file: a claim of
# every delivery of 400 conversions committed before it (SQLite keeps the first copy of each
# page a batch changes, in memory up to 64 KiB, then in a temporary file unless told not to).
BIG_BATCH = """
import asyncio, sys
from datetime import timedelta
from pathlib import Path
from daemon.store.sqlite import SQLiteStore
from tests.store.support import T0, arrive, conversion

async def main(path):
    store = SQLiteStore(Path(path))
    await store.open()
    try:
        await asyncio.gather(*(arrive(store, conversion(f"c{i}")) for i in range(400)))
        claims = await store.claim_due("n1", T0 + timedelta(seconds=1), 1000, timedelta(minutes=5))
        print(len(claims), store.commits)
    finally:
        await store.close()

asyncio.run(main(sys.argv[1]))
"""


async def test_a_full_temp_directory_does_not_fail_the_writes(tmp_path: Path) -> None:
    """SQLite's temporary files go to SQLITE_TMPDIR, TMPDIR, /var/tmp or /tmp, not beside the
    store: the writer keeps its statement journals in memory, so a full temporary directory
    (another program filled /tmp) does not fail a write while the store's own disk has room."""
    with small_tmpfs(tmp_path / "tmp", "1m") as tmp:
        fill(tmp)
        env = {**os.environ, "SQLITE_TMPDIR": str(tmp), "TMPDIR": str(tmp)}
        done = await asyncio.create_subprocess_exec(
            sys.executable, "-c", BIG_BATCH, str(tmp_path / "store.db"),
            cwd=Path(__file__).parents[2], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await done.communicate()
    assert done.returncode == 0, err.decode()[-2000:]
    # (the last line: a log line such as store_writes_slow may come before it)
    claimed, commits = map(int, out.decode().splitlines()[-1].split())
    assert claimed == 800  # two deliveries each, every one in the one claim
    assert commits >= 2  # the arrivals committed before the claim's batch
