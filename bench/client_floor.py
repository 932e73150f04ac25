"""The floor of a postback's send on this stack: a bare aiohttp client, in a process of its own
on uvloop (as the daemon runs), sending GETs to the benchmark's sink with `concurrency` at once
through one session and reading each answer. No guard, template, timeout of ours, breaker, log
line, metric or store: what any aiohttp service that sends one request per event pays here.

Run: python -m bench.client_floor URL [--seconds S] [--concurrency C]
Prints one JSON line: {"requests": N, "errors": E, "seconds": T, "cpu_s": X}, the CPU time
being this process's (user + system) over the window alone.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time

import aiohttp


async def _measure(url: str, seconds: float, concurrency: int) -> dict[str, float]:
    counter = itertools.count()
    done = errors = 0
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            nonlocal done, errors
            try:
                async with session.get(url, params={"k": f"floor-{next(counter)}"}) as resp:
                    await resp.read()
                    if resp.status == 200:
                        done += 1
                    else:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1

        async def worker(until: float) -> None:
            while time.monotonic() < until:
                await one()

        # a warm-up (connections made, code paths run once), then the window
        await asyncio.gather(*(worker(time.monotonic() + 0.5) for _ in range(concurrency)))
        done = errors = 0
        cpu, started = time.process_time(), time.monotonic()
        await asyncio.gather(*(worker(started + seconds) for _ in range(concurrency)))
        elapsed, used = time.monotonic() - started, time.process_time() - cpu
    return {"requests": done, "errors": errors, "seconds": elapsed, "cpu_s": used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="where to send (the sink's /floor, on loopback)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    if args.seconds <= 0 or args.concurrency < 1:
        parser.error("--seconds must be positive and --concurrency at least 1")
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(_measure(args.url, args.seconds, args.concurrency))
    else:
        result = uvloop.run(_measure(args.url, args.seconds, args.concurrency))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
