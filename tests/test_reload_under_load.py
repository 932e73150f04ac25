"""Hot reload while conversions flow (real process, watchfiles): rule files rewritten many
times — valid, invalid, and the way editors and git write them — and no request fails, and no
invalid set is ever active."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.harness import Sink, wait_for
from tests.process_support import DaemonProcess, free_port, write_config

pytestmark = pytest.mark.slow


def valid(sink: Sink, version: int) -> str:
    return f"""
offer: 1
postbacks:
  - id: 1
    trigger: conversion_done
    affiliate: "*"
    action: {{type: ping_url, url: "{sink.url}/v{version}?tx={{conversion_id}}"}}
"""


def poisoned_pair(sink: Sink) -> tuple[str, str]:
    """A valid file that would fire /bad-marker, beside a broken one: loading only the valid
    half of this set would show at the sink."""
    good = f"""
offer: 1
postbacks:
  - id: 2
    trigger: conversion_done
    affiliate: "*"
    action: {{type: ping_url, url: "{sink.url}/bad-marker?tx={{conversion_id}}"}}
"""
    return good, "offer: 2\npostbacks:\n  - id: 3\n    trigger: [\n"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def vim_write(path: Path, text: str) -> None:
    probe = path.with_name("4913")
    probe.write_text("")
    probe.unlink()
    backup = path.with_name(path.name + "~")
    if path.exists():
        os.replace(path, backup)
    swap = path.with_name(f".{path.name}.swp")
    swap.write_text("swap junk: [")
    path.write_text(text)
    backup.unlink(missing_ok=True)
    swap.unlink()


def emacs_write(path: Path, text: str) -> None:
    lock = path.with_name(f".#{path.name}")
    autosave = path.with_name(f"#{path.name}#")
    if not lock.is_symlink():
        lock.symlink_to("user@host.1234")
    autosave.write_text("half: [written")
    path.write_text(text)
    autosave.unlink()
    lock.unlink()


def slow_write(path: Path, text: str) -> None:
    """Truncate and write in two pieces: a watcher may see the half-written file."""
    with path.open("w") as fh:
        fh.write(text[: len(text) // 2])
        fh.flush()
        os.fsync(fh.fileno())
        fh.write(text[len(text) // 2 :])


async def git_style_write(root: Path, path: Path, text: str) -> None:
    lock = root / ".git" / "index.lock"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text("")
    path.write_text("offer: 1\npostbacks: [\n")  # mid-checkout state, never to be loaded
    await asyncio.sleep(0.4)  # longer than the watcher's quiet period
    path.write_text(text)
    lock.unlink()


async def test_reloads_under_load_fail_no_request_and_never_activate_a_bad_set(
    tmp_path: Path, sink: Sink
) -> None:
    rng = random.Random(7)
    port = free_port()
    config = write_config(tmp_path, port=port)
    rules = tmp_path / "rules.d"
    main = rules / "o.yaml"
    extra = rules / "p.yaml"
    main.write_text(valid(sink, 0))
    daemon = DaemonProcess(config, port)
    daemon.start()
    failures: list[str] = []
    answered = 0
    running = True

    async def tracker(http: aiohttp.ClientSession, n: int) -> None:
        nonlocal answered
        i = 0
        while running:
            i += 1
            params = {
                "conversion_id": f"w{n}-{i}",
                "offer": "1",
                "affiliate": "1",
                "status": "approved",
            }
            try:
                async with http.get(f"{daemon.url}/webhooks/generic", params=params) as resp:
                    if resp.status != 200:
                        failures.append(f"{resp.status} {await resp.text()}")
                    answered += 1
            except aiohttp.ClientError as err:
                failures.append(repr(err))

    try:
        await daemon.ready()
        version = 0
        async with aiohttp.ClientSession() as http:
            workers = [asyncio.create_task(tracker(http, n)) for _ in range(4) for n in [_]]
            for step in range(30):
                kind = rng.choice(["atomic", "vim", "emacs", "slow", "git", "poison", "sighup"])
                if kind == "poison":
                    good, bad = poisoned_pair(sink)
                    # broken file first and last: every intermediate set is invalid too
                    atomic_write(rules / "q.yaml", bad)
                    atomic_write(extra, good)
                    await asyncio.sleep(0.5)
                    extra.unlink()
                    (rules / "q.yaml").unlink()
                elif kind == "sighup":
                    daemon.signal(signal.SIGHUP)
                else:
                    version += 1
                    text = valid(sink, version)
                    if kind == "atomic":
                        atomic_write(main, text)
                    elif kind == "vim":
                        vim_write(main, text)
                    elif kind == "emacs":
                        emacs_write(main, text)
                    elif kind == "slow":
                        slow_write(main, text)
                    else:
                        await git_style_write(tmp_path, main, text)
                await asyncio.sleep(rng.uniform(0.05, 0.4))
                del step
            # the last valid version becomes active once the tree is quiet
            last = f"/v{version}?"
            await wait_for(lambda: any(last in r.path_qs for r in sink.received[-20:]), deadline=20)
            running = False
            await asyncio.gather(*workers)
    finally:
        daemon.stop()
    assert failures == []
    assert answered > 200
    assert not [r for r in sink.received if r.path_qs.startswith("/bad-marker")]
    assert daemon.events("rules_reloaded")
    assert daemon.events("rules_reload_failed")
    for event in daemon.events("rules_reload_failed"):
        assert event["errors"]
