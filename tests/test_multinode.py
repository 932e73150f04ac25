"""Proofs of SPEC 13's scale-out on one PostgreSQL database: three `postbackd run` processes,
conversions posted round-robin, nodes killed with SIGKILL and restarted, and the same
conversion posted to two nodes at once.

Each node generation sends its postbacks with an `X-Sender: n{node}g{generation}` header (its
own rules checkout), so the sink knows which process made every request. To make sure each kill
leaves a delivery that was sent but never recorded, the sink holds the victim's requests until
it is dead. Kills alternate between restarting the node on its own port (it may take back its
own claims at start) and on a new port (a replacement machine: the other nodes take the claims
over once `delivery.lease`, short here, has ended).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest
from aiohttp import web

from tests.harness import wait_for
from tests.process_support import free_port
from tests.store.conftest import pg_schema

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(120)]

OUTBOUND_TIMEOUT = 3.0
LEASE = 6.0  # delivery.lease: longer than OUTBOUND_TIMEOUT, as the settings require
NODES = 3
KILLS = 3


@dataclass
class Hit:
    index: int
    key: str  # from the URL (the idempotency_key macro)
    header_key: str | None  # the Idempotency-Key header
    sender: str


class HoldingSink:
    """A loopback receiver that records every postback in order, and can hold (not answer)
    the requests of chosen senders."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self._held: dict[str, asyncio.Event] = {}
        self.held_count: dict[str, int] = defaultdict(int)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/pb", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        for event in self._held.values():
            event.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def hold(self, sender: str) -> None:
        self._held[sender] = asyncio.Event()

    def release(self, sender: str) -> None:
        self._held.pop(sender).set()

    async def _handle(self, request: web.Request) -> web.Response:
        sender = request.headers.get("X-Sender", "?")
        hit = Hit(
            len(self.hits), request.query["k"], request.headers.get("Idempotency-Key"), sender
        )
        self.hits.append(hit)
        gate = self._held.get(sender)
        if gate is not None:
            self.held_count[sender] += 1
            await gate.wait()  # answered only after the sender is dead: the answer goes nowhere
        return web.Response(text="OK")

    def keys(self) -> set[str]:
        return {h.key for h in self.hits}


@dataclass
class Node:
    """One `postbackd run` process slot; each (re)start is a new generation with its own log."""

    index: int
    root: Path
    dsn: str
    sink_port: int
    port: int = field(default_factory=free_port)
    generation: int = -1
    proc: subprocess.Popen[bytes] | None = None
    versions: dict[str, str] = field(default_factory=dict)  # sender name -> rules version

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sender(self) -> str:
        return f"n{self.index}g{self.generation}"

    def _write_files(self) -> Path:
        rules = self.root / "rules.d"
        rules.mkdir(parents=True, exist_ok=True)
        (self.root / "webhooks").mkdir(exist_ok=True)
        url = f"http://127.0.0.1:{self.sink_port}/pb?k={{idempotency_key}}"
        action = {"type": "ping_url", "url": url, "headers": {"X-Sender": self.sender}}
        offer = {
            "offer": 1,
            "postbacks": [
                {
                    "id": 1,
                    "trigger": "conversion_done",
                    "affiliate": "*",
                    "action": action,
                }
            ],
        }
        (rules / "offer-1.yaml").write_text(json.dumps(offer))  # JSON is YAML
        settings = {
            "listen": f"127.0.0.1:{self.port}",
            "store": self.dsn,
            "rules_dir": "rules.d",
            "webhooks_dir": "webhooks",
            "outbound": {"allow_cidrs": ["127.0.0.1/32"], "timeout": OUTBOUND_TIMEOUT},
            "delivery": {"lease": LEASE},
            "log": {"format": "json", "level": "info"},
        }
        config = self.root / "postbackd.yaml"
        config.write_text(json.dumps(settings))
        return config

    def start(self, *, new_port: bool = False) -> None:
        """Start the next generation; on a new port it is another node to the others (a
        replacement machine), so only the end of the lease frees the old claims."""
        if new_port:
            self.port = free_port()
        self.generation += 1
        config = self._write_files()
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACKD_")}
        env.pop("NOTIFY_SOCKET", None)
        with (self.root / f"{self.sender}.log").open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run", "-c", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    async def ready(self, session: aiohttp.ClientSession) -> None:
        async def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = (self.root / f"{self.sender}.log").read_text()[-2000:]
                raise AssertionError(f"node {self.sender} exited: {log}")
            try:
                async with session.get(f"{self.url}/readyz") as resp:
                    if resp.status != 200:
                        return False
                    self.versions[self.sender] = (await resp.json())["rules_version"]
                    return True
            except aiohttp.ClientError:
                return False

        await wait_for(up, deadline=30.0, interval=0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Cluster:
    nodes: list[Node]
    sink: HoldingSink
    session: aiohttp.ClientSession
    dsn: str

    async def post(self, node: int, cid: str) -> dict[str, Any] | None:
        """One tracker post; None when the node did not answer 200 (down or 503)."""
        params = {"conversion_id": cid, "offer": "1", "affiliate": "7", "status": "approved"}
        try:
            async with self.session.get(
                f"{self.nodes[node].url}/webhooks/generic", params=params
            ) as resp:
                if resp.status != 200:
                    return None
                answer: dict[str, Any] = await resp.json()
                return answer
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def db(self, query: str) -> list[Any]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return list(await conn.fetch(query))
        finally:
            await conn.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with pg_schema() as dsn:
        sink = HoldingSink()
        await sink.start()
        timeout = aiohttp.ClientTimeout(total=10)
        session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0, force_close=False)
        )
        nodes = [Node(i, tmp_path / f"node{i}", dsn, sink.port) for i in range(NODES)]
        try:
            for node in nodes:  # all at once: the migrations must serialise themselves
                node.start()
            await asyncio.gather(*(node.ready(session) for node in nodes))
            yield Cluster(nodes, sink, session, dsn)
        finally:
            for node in nodes:
                node.stop()
            await session.close()
            await sink.close()


def key_of(cid: str) -> str:
    return f"generic:{cid}:1:1"  # {source}:{conversion_id}:{arrival_seq}:{postback_id}


async def post_until_acked(cluster: Cluster, cid: str, start: int) -> tuple[dict[str, Any], int]:
    """Like a tracker: retry on the next node until one acknowledges; (answer, failed posts)."""
    for failures in range(400):
        answer = await cluster.post((start + failures) % NODES, cid)
        if answer is not None:
            return answer, failures
        await asyncio.sleep(0.02)
    raise AssertionError(f"{cid} was never acknowledged")


async def test_every_acknowledged_conversion_is_delivered_across_kill_9(cluster: Cluster) -> None:
    sink, nodes = cluster.sink, cluster.nodes
    acked: dict[str, tuple[dict[str, Any], int]] = {}
    stop = asyncio.Event()

    async def tracker(worker: int) -> None:
        n = 0
        while not stop.is_set():
            cid = f"w{worker}-{n}"
            acked[cid] = await post_until_acked(cluster, cid, worker + n)
            n += 1

    def acked_at_least(count: int) -> Callable[[], bool]:
        return lambda: len(acked) >= count

    def holding(sender: str) -> Callable[[], bool]:
        return lambda: sink.held_count[sender] > 0

    workers = [asyncio.create_task(tracker(w)) for w in range(6)]
    killed_at: dict[str, int] = {}  # sender -> len(sink.hits) when it was dead
    try:
        for round_ in range(KILLS):
            await wait_for(acked_at_least(150 * (round_ + 1)), deadline=30)
            victim = nodes[round_ % NODES]
            dead = victim.sender
            sink.hold(dead)
            await wait_for(holding(dead), deadline=10, interval=0.002)
            victim.kill()
            killed_at[dead] = len(sink.hits)
            sink.release(dead)
            victim.start(new_port=round_ % 2 == 1)
            await victim.ready(cluster.session)
        await wait_for(acked_at_least(150 * (KILLS + 1)), deadline=30)
    finally:
        stop.set()
        await asyncio.gather(*workers)

    expected = {key_of(cid) for cid in acked}
    await wait_for(lambda: expected <= sink.keys(), deadline=LEASE * 3 + 15)
    final = "SELECT count(*) AS n FROM delivery WHERE state <> 'succeeded'"
    await wait_for(lambda: _zero(cluster, final), deadline=LEASE * 3)

    # Acknowledged means committed: a `duplicate` answer only follows a post that failed.
    for cid, (answer, failures) in acked.items():
        assert answer["status"] == "accepted"
        assert (answer["transition"], answer["deliveries"]) in (("new", 1), ("duplicate", 0))
        assert answer["transition"] == "new" or failures > 0, cid

    stored = {r["idempotency_key"] for r in await cluster.db("SELECT * FROM delivery")}
    assert sink.keys() <= stored  # nothing was sent that the store does not know

    by_key: dict[str, list[Hit]] = defaultdict(list)
    for hit in sink.hits:
        assert hit.header_key == hit.key  # every request, resend or not, carries its key
        by_key[hit.key].append(hit)
    resends = 0
    for key, hits in by_key.items():
        for earlier, later in itertools.pairwise(hits):
            # Sent again only because the earlier sender died, and only once it was dead.
            assert earlier.sender in killed_at, (key, [h.sender for h in hits])
            assert later.index >= killed_at[earlier.sender], (key, [h.sender for h in hits])
            resends += 1
    assert resends >= KILLS  # every kill left a held request that someone else had to resend

    versions = {s: v for node in nodes for s, v in node.versions.items()}
    attempts = await cluster.db(
        "SELECT d.idempotency_key, a.outcome, a.node, a.rules_version"
        " FROM attempt a JOIN delivery d ON d.id = a.delivery_id"
    )
    assert len(attempts) == len(stored)  # one recorded attempt each: the killed never record
    for row in attempts:
        # Each generation's rules differ (its X-Sender), so the version names the process.
        assert row["outcome"] == "succeeded"
        assert row["rules_version"] == versions[by_key[row["idempotency_key"]][-1].sender]


async def _zero(cluster: Cluster, query: str) -> bool:
    return bool((await cluster.db(query))[0]["n"] == 0)


async def test_the_same_conversion_posted_to_two_nodes_at_once_is_stored_and_fired_once(
    cluster: Cluster,
) -> None:
    rounds, per_round = 4, 50
    answers: dict[str, list[dict[str, Any] | None]] = {}
    for r in range(rounds):
        cids = [f"same-{r}-{i}" for i in range(per_round)]
        pairs = await asyncio.gather(
            *(
                asyncio.gather(cluster.post(i % NODES, cid), cluster.post((i + 1) % NODES, cid))
                for i, cid in enumerate(cids)
            )
        )
        answers.update(zip(cids, (list(p) for p in pairs), strict=True))

    for cid, pair in answers.items():
        assert None not in pair, cid
        got = sorted((a["transition"], a["deliveries"]) for a in pair if a is not None)
        assert got == [("duplicate", 0), ("new", 1)], cid

    expected = {key_of(cid) for cid in answers}
    await wait_for(lambda: expected <= cluster.sink.keys(), deadline=30)
    final = "SELECT count(*) AS n FROM delivery WHERE state <> 'succeeded'"
    await wait_for(lambda: _zero(cluster, final), deadline=30)

    conversions = await cluster.db("SELECT conversion_id FROM conversion")
    assert sorted(r["conversion_id"] for r in conversions) == sorted(answers)
    arrivals = await cluster.db("SELECT count(*) AS n FROM arrival")
    assert arrivals[0]["n"] == 2 * len(answers)
    keys = [r["idempotency_key"] for r in await cluster.db("SELECT * FROM delivery")]
    assert sorted(keys) == sorted(expected)
    assert sorted(h.key for h in cluster.sink.hits) == sorted(expected)  # each sent once
