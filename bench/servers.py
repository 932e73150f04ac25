"""The two helper servers of the benchmark, each run as its own process on loopback: a bare
aiohttp "hello" server (the yardstick for ingest) and the sink that receives postbacks and
notes when each arrived.

Run: python -m bench.servers hello|sink --port PORT

The sink stamps every request with time.monotonic(); on Linux that clock (CLOCK_MONOTONIC) is
the same for every process of the machine, so the load generator can compare it with its own.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import aiohttp
from aiohttp import web

HITS = web.AppKey("hits", list)


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


def hello_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _hello)
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
    parser.add_argument("kind", choices=["hello", "sink"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = hello_app() if args.kind == "hello" else sink_app()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
