"""The floors the benchmark measures postbackd against: bench/servers.py's durable hello (only
honest if it answers after the commit, as postbackd's ingest does), bench/client_floor.py's
bare aiohttp client (only honest if it counts the requests it had answered), and how
bench/instructions.py reads callgrind's count."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

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


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["bench.servers", "durable", "--port", "1"], "durable needs --db PATH"),
        (["bench.client_floor", "http://127.0.0.1:1/", "--seconds", "0"], "--seconds must be"),
    ],
    ids=["durable hello without its file", "client floor without a window"],
)
def test_a_floor_refuses_bad_arguments(args: list[str], says: str) -> None:
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert says in done.stderr


async def test_the_client_floor_counts_what_it_sent(aiohttp_server: Any) -> None:
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.query["k"])
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_get("/floor", answer)
    server = await aiohttp_server(app)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.client_floor", str(server.make_url("/floor")),
        "--seconds", "0.3", "--concurrency", "2",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    got = json.loads(out)
    assert got["errors"] == 0
    # the window's requests, after the warm-up's: each one a key of its own, all answered
    assert 0 < got["requests"] < len(seen) == len(set(seen))
    assert got["cpu_s"] > 0
    assert got["seconds"] >= 0.3


def test_a_callgrind_dumps_count_is_read_from_its_totals(tmp_path: Path) -> None:
    from bench.instructions import totals

    dump = tmp_path / "callgrind.out.1.1"
    dump.write_text(
        "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nfn=x\n1 5\nsummary: 1234567\n"
    )
    assert totals(dump) == 1234567
    dump.write_text("events: Ir\nfn=x\n1 5\ntotals: 42\n")
    assert totals(dump) == 42
    dump.write_text("events: Ir\n")  # nothing counted
    assert totals(dump) == 0
