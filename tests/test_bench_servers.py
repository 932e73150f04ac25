"""bench/servers.py's durable hello: the yardstick is only honest if it answers after the
commit, as postbackd's ingest does."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.servers import durable_app


async def test_the_durable_hello_answers_after_its_insert_is_committed(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    db = tmp_path / "durable.db"
    client = await aiohttp_client(durable_app(db))
    resp = await client.get("/webhooks/generic?conversion_id=c1&offer=1")
    assert resp.status == 200
    # Another connection was given the store: the row is there, committed.
    blocker = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        assert blocker.execute("SELECT query FROM hit").fetchall() == [
            ("conversion_id=c1&offer=1",)
        ]
        blocker.execute("BEGIN IMMEDIATE")  # now the writer cannot commit
        answer = asyncio.ensure_future(client.get("/x?n=2"))
        await asyncio.sleep(0.3)
        assert not answer.done(), "answered before the commit"
        blocker.execute("ROLLBACK")
        resp = await asyncio.wait_for(answer, 10)
        assert resp.status == 200
        assert blocker.execute("SELECT count(*) FROM hit").fetchone() == (2,)
    finally:
        blocker.close()


def test_the_durable_hello_needs_its_file() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.servers", "durable", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "durable needs --db PATH" in done.stderr
