"""The helper servers of the benchmark, each run as its own process on loopback: a bare
aiohttp "hello" server (the yardstick for ingest), a "durable hello" (the floor of a durable
answer on this stack) and the sink that receives postbacks and notes when each arrived.

Run: python -m bench.servers hello|sink --port PORT
     python -m bench.servers durable --port PORT --db PATH

The durable hello answers each request only after its query string is committed to an SQLite
file, through postbackd's own connection settings (WAL, synchronous=FULL) and group-commit
writer thread (daemon.store.sqlite_writer), one INSERT per request into a table with no index
but its primary key: no rules, validation, log line or metric. What it costs over hello is what
any aiohttp service that acknowledges only committed data pays here, so the ingest figure can be
read against both.

The sink stamps every request with time.monotonic(); on Linux that clock (CLOCK_MONOTONIC) is
the same for every process of the machine, so the load generator can compare it with its own.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

HITS = web.AppKey("hits", list)
WRITER = web.AppKey("writer", object)


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


def hello_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _hello)
    return app


_DURABLE_TABLE = """CREATE TABLE IF NOT EXISTS hit (
    id INTEGER PRIMARY KEY, query TEXT NOT NULL, received_at INTEGER NOT NULL)"""

_DURABLE_INSERT = "INSERT INTO hit (query, received_at) VALUES (?, ?)"


async def _durable(request: web.Request) -> web.Response:
    row = (request.query_string, time.time_ns() // 1000)
    writer: Any = request.app[WRITER]
    # on_loop: as postbackd submits an arrival (daemon/store/sqlite_writer.py)
    await writer.submit(lambda conn: conn.execute(_DURABLE_INSERT, row), on_loop=True)
    return web.Response(text="OK")


def durable_app(path: Path) -> web.Application:
    """Hello that answers after a durable commit (see the module's docstring)."""
    from daemon.store.sqlite import connect
    from daemon.store.sqlite_writer import GroupCommitWriter

    def open_conn() -> sqlite3.Connection:
        conn = connect(path, 5.0)
        conn.execute(_DURABLE_TABLE)
        return conn

    writer = GroupCommitWriter(open_conn)  # as SQLiteStore makes it
    app = web.Application()
    app[WRITER] = writer

    async def start(app: web.Application) -> None:
        await asyncio.to_thread(writer.start)  # as SQLiteStore.open

    async def stop(app: web.Application) -> None:
        # Off the loop, as SQLiteStore.close: a batch lent to this loop needs it running.
        await asyncio.to_thread(writer.stop)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", _durable)
    return app


async def _record(request: web.Request) -> web.Response:
    request.app[HITS].append((request.query.get("k", ""), time.monotonic()))
    return web.Response(text="OK")


async def _stats(request: web.Request) -> web.Response:
    """{"count": N, "hits": [[idempotency_key, monotonic_time], ...]} from index `since`."""
    hits = request.app[HITS]
    since = int(request.query.get("since", "0"))
    return web.json_response({"count": len(hits), "hits": hits[since:]})


def sink_app() -> web.Application:
    app = web.Application()
    app[HITS] = []
    app.router.add_get("/_stats", _stats)
    app.router.add_route("*", "/{tail:.*}", _record)
    return app


class SinkClient:
    """Reads the sink's record incrementally (only what arrived since the last read)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.hits: dict[str, list[float]] = {}  # key -> every arrival time (resends too)
        self._seen = 0

    async def refresh(self, session: aiohttp.ClientSession) -> int:
        async with session.get(f"{self.base_url}/_stats", params={"since": self._seen}) as resp:
            data: dict[str, Any] = await resp.json()
        for key, when in data["hits"]:
            self.hits.setdefault(key, []).append(when)
        self._seen += len(data["hits"])
        return self._seen


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark helper servers")
    parser.add_argument("kind", choices=["hello", "durable", "sink"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", type=Path, help="the durable hello's SQLite file")
    args = parser.parse_args()
    if args.kind == "durable":
        if args.db is None:
            parser.error("durable needs --db PATH")
        app = durable_app(args.db)
    else:
        app = hello_app() if args.kind == "hello" else sink_app()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
