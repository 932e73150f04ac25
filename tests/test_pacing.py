"""Pacing new arrivals to delivery on a saturated loop (daemon.pacing): when arrivals wait, what
lets them go, and a real daemon whose webhook answer waits for a delivery attempt's end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from structlog.testing import capture_logs

from daemon.pacing import MAX_HOLD, Pacing, PacingCollector
from tests.harness import Sink, lifecycle_rules, start_daemon


class Signals:
    """What the dispatcher tells pacing, set by the test."""

    def __init__(self) -> None:
        self.behind = True
        self.attempts = 1

    def pacing(self, max_hold: float = MAX_HOLD) -> Pacing:
        return Pacing(lambda: self.behind, lambda: self.attempts, max_hold=max_hold)

    def on_busy_loop(self, max_hold: float = 30) -> Pacing:
        """A pacing whose last sample found the loop saturated (by default, an arrival waits
        until an attempt's end lets it go)."""
        pacing = self.pacing(max_hold)
        pacing.observe(0.95)
        return pacing


def active(pacing: Pacing) -> bool:
    return pacing.active  # (read through a call: mypy would keep an assert's narrowing)


def saturated(pacing: Pacing) -> bool:
    return pacing.saturated


async def _settled(tasks: list[asyncio.Task[bool]]) -> list[bool]:
    """Which of `tasks` are done once everything ready on the loop has run."""
    for _ in range(5):
        await asyncio.sleep(0)
    return [t.done() for t in tasks]


async def test_an_idle_loop_never_holds_an_arrival() -> None:
    signals = Signals()
    pacing = signals.pacing()
    pacing.observe(0.89)  # under BUSY_SHARE: behind or not, nothing waits
    assert await pacing.admit() is False
    assert not pacing.active


async def test_a_saturated_loop_does_not_hold_while_delivery_keeps_up() -> None:
    signals = Signals()
    signals.behind = False
    pacing = signals.pacing()
    pacing.observe(0.99)
    assert await pacing.admit() is False
    assert not pacing.active


async def test_arrivals_wait_their_turn_one_per_attempt_in_order() -> None:
    signals = Signals()
    pacing = signals.on_busy_loop()
    with capture_logs() as logs:
        tasks = [asyncio.create_task(pacing.admit()) for _ in range(3)]
        assert await _settled(tasks) == [False, False, False]
        assert [e["event"] for e in logs] == ["ingest_paced"]
        pacing.credit()
        assert await _settled(tasks) == [True, False, False]
        pacing.settle(1)  # it planned one delivery: its own turn, nothing more
        assert await _settled(tasks) == [True, False, False]
        pacing.credit()
        pacing.credit()
        assert await _settled(tasks) == [True, True, True]
    assert all(t.result() for t in tasks)  # each took a turn: settle it
    assert pacing.held == 3
    assert pacing.timed_out == 0


async def test_an_arrival_that_planned_nothing_passes_its_turn_on() -> None:
    signals = Signals()
    pacing = signals.on_busy_loop()
    tasks = [asyncio.create_task(pacing.admit()) for _ in range(2)]
    await _settled(tasks)
    pacing.credit()
    assert await _settled(tasks) == [True, False]
    pacing.settle(0)  # a pending conversion: nothing to deliver, the next one goes
    assert await _settled(tasks) == [True, True]


async def test_an_arrival_that_planned_several_deliveries_owes_their_turns() -> None:
    signals = Signals()
    pacing = signals.on_busy_loop()
    first = asyncio.create_task(pacing.admit())
    await _settled([first])
    pacing.credit()
    assert await first is True
    pacing.settle(3)  # two turns owed beyond its own
    second = asyncio.create_task(pacing.admit())
    for _ in range(2):
        pacing.credit()
        assert await _settled([second]) == [False]
    pacing.credit()
    assert await _settled([second]) == [True]


async def test_turns_left_by_attempts_let_later_arrivals_through_at_once() -> None:
    signals = Signals()
    pacing = signals.on_busy_loop()
    waiting = asyncio.create_task(pacing.admit())  # starts pacing
    await _settled([waiting])
    for _ in range(3):
        pacing.credit()
    assert await waiting is True
    # two turns left: the next two arrivals take them without waiting, the third waits
    assert await pacing.admit() is True
    assert await pacing.admit() is True
    third = asyncio.create_task(pacing.admit())
    assert await _settled([third]) == [False]
    third.cancel()


async def test_the_longest_wait_is_max_hold_and_its_turn_is_owed() -> None:
    signals = Signals()
    pacing = signals.on_busy_loop(max_hold=0.05)
    assert await pacing.admit() is True  # after 50 ms, no attempt having ended
    assert pacing.timed_out == 1
    pacing.settle(1)
    # it took a turn that no attempt gave: the next attempt's end pays it, releasing nobody
    nxt = asyncio.create_task(pacing.admit())
    await _settled([nxt])
    pacing.credit()
    assert await _settled([nxt]) == [False]
    pacing.credit()
    assert await _settled([nxt]) == [True]


async def test_pacing_ends_when_the_loop_is_no_longer_saturated() -> None:
    signals = Signals()
    pacing = signals.on_busy_loop()
    tasks = [asyncio.create_task(pacing.admit()) for _ in range(2)]
    await _settled(tasks)
    pacing.observe(0.5)
    assert await _settled(tasks) == [True, True]
    assert not active(pacing)
    assert await pacing.admit() is False  # (behind, but the loop has room)


async def test_one_pair_of_lines_per_episode_of_pacing_however_often_it_stops() -> None:
    signals = Signals()
    now = [0.0]
    pacing = Pacing(
        lambda: signals.behind, lambda: signals.attempts, max_hold=30, clock=lambda: now[0]
    )
    with capture_logs() as logs:
        for _ in range(3):  # three runs of pacing, a second apart: one episode
            pacing.observe(0.95)
            waiting = asyncio.create_task(pacing.admit())
            await _settled([waiting])
            now[0] += 0.5
            pacing.observe(0.5)
            assert await waiting is True
            now[0] += 0.5
        assert [e["event"] for e in logs] == ["ingest_paced"]
        now[0] += 9.4
        pacing.observe(0.5)
        assert [e["event"] for e in logs] == ["ingest_paced"]  # 9.9 s since pacing ended
        now[0] += 0.1
        pacing.observe(0.5)
        pacing.observe(0.5)
        pacing.observe(0.95)
        third = asyncio.create_task(pacing.admit())  # a new episode
        await _settled([third])
        third.cancel()
    assert [(e["event"], e.get("count")) for e in logs] == [
        ("ingest_paced", None),
        ("ingest_unpaced", 3),
        ("ingest_paced", None),
    ]


async def test_pacing_ends_after_a_sample_in_which_delivery_was_never_behind() -> None:
    signals = Signals()
    pacing = signals.on_busy_loop()
    first = asyncio.create_task(pacing.admit())
    await _settled([first])
    pacing.observe(0.95)  # an arrival found it behind in this sample: pacing goes on
    assert pacing.active
    assert not first.done()
    signals.behind = False
    pacing.observe(0.95)  # none did since: over
    assert not active(pacing)
    assert await first is True


async def test_while_pacing_an_arrival_waits_only_if_an_attempt_can_let_it_go() -> None:
    signals = Signals()
    pacing = signals.on_busy_loop()
    first = asyncio.create_task(pacing.admit())
    await _settled([first])
    signals.behind = False  # the last claim drained what was due; one attempt still running
    second = asyncio.create_task(pacing.admit())
    assert await _settled([first, second]) == [False, False]
    signals.attempts = 0  # and none any more: nothing would ever let them go
    assert await pacing.admit() is False
    assert await _settled([first, second]) == [True, True]


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    signals = Signals()
    pacing = signals.on_busy_loop()
    gone = asyncio.create_task(pacing.admit())
    kept = asyncio.create_task(pacing.admit())
    await _settled([gone, kept])
    gone.cancel()  # the tracker hung up
    with pytest.raises(asyncio.CancelledError):
        await gone
    pacing.credit()  # goes to the one still waiting
    assert await _settled([kept]) == [True]


async def test_the_sampler_reads_the_loop_threads_share_of_the_wall_time() -> None:
    signals = Signals()
    wall = [0.0]
    cpu = [0.0]
    busy = [0.95]

    def clock() -> float:
        wall[0] += 0.1
        cpu[0] += 0.1 * busy[0]
        return wall[0]

    pacing = Pacing(
        lambda: signals.behind,
        lambda: signals.attempts,
        sample=0.001,
        clock=clock,
        cpu=lambda: cpu[0],
    )
    task = asyncio.create_task(pacing.run())
    try:
        for _ in range(100):
            await asyncio.sleep(0.002)
            if saturated(pacing):
                break
        assert saturated(pacing)
        busy[0] = 0.5
        for _ in range(100):
            await asyncio.sleep(0.002)
            if not saturated(pacing):
                break
        assert not saturated(pacing)
    finally:
        task.cancel()


async def test_a_daemons_webhook_answer_waits_for_an_attempts_end(tmp_path: Path) -> None:
    """The real ingest path and dispatcher: with pacing on, a webhook is answered only once a
    delivery attempt in progress has ended, and the counter says it waited."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="OK")

    sink = await Sink(script=[slow]).start()
    daemon = await start_daemon(tmp_path, {"offer7.yaml": lifecycle_rules(sink)})
    try:
        services = daemon.services
        dispatcher = services.dispatcher
        assert services.pacing is not None
        assert dispatcher.on_attempt_done == services.pacing.credit  # the daemon's wiring
        # The dispatcher's claims are not driven to "behind" here: that signal is given, the
        # rest (the attempt's end, the ingest path, the counter) is the daemon's own.
        pacing = Pacing(lambda: True, lambda: dispatcher.in_flight, max_hold=30)
        services.pacing = pacing
        dispatcher.on_attempt_done = pacing.credit
        await daemon.post(
            conversion_id="p1", offer=7, affiliate=1, status="pending"
        )  # fires postback 11, whose send the sink holds
        for _ in range(200):
            if sink.received:
                break
            await asyncio.sleep(0.01)
        assert sink.received
        assert dispatcher.in_flight == 1
        shipped = generate_latest(services.metrics.registry).decode()
        assert 'postbackd_ingest_paced_total{released_by="turn"} 0.0' in shipped
        pacing.observe(0.99)
        answer = asyncio.create_task(
            daemon.post(conversion_id="p2", offer=7, affiliate=1, status="pending")
        )
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert not answer.done()
        assert pacing.held == 1
        release.set()  # the first attempt ends: the second arrival's turn
        assert (await asyncio.wait_for(answer, 10))["transition"] == "new"
        registry = CollectorRegistry()
        registry.register(PacingCollector(pacing))
        text = generate_latest(registry).decode()
        assert 'postbackd_ingest_paced_total{released_by="turn"} 1.0' in text
        assert 'postbackd_ingest_paced_total{released_by="max_hold"} 0.0' in text
    finally:
        await daemon.client.close()
        await sink.close()


async def test_an_arrival_never_waits_while_no_attempt_is_in_progress() -> None:
    signals = Signals()
    signals.attempts = 0  # behind, but nothing under way would ever give it a turn
    pacing = signals.on_busy_loop()
    assert await pacing.admit() is False
    assert pacing.held == 0


async def test_the_dispatcher_is_behind_only_after_a_full_claim(tmp_path: Path) -> None:
    """Dispatcher.behind on a real store: not before its first claim, after a claim that came
    back full, and no longer after one that did not."""
    from daemon.dispatcher import Dispatcher, DispatcherConfig

    sink = await Sink().start()
    daemon = await start_daemon(tmp_path, {"offer7.yaml": lifecycle_rules(sink)}, dispatch=False)
    services = daemon.services
    dispatcher = Dispatcher(
        services.store,
        lambda: services.reloader.runtime,
        services.clock.now,
        DispatcherConfig(node="t", batch=2),
        services.dispatcher.destinations,
    )
    try:
        for n in range(3):  # three pending conversions: three deliveries of postback 11
            await daemon.post(conversion_id=f"b{n}", offer=7, affiliate=1, status="pending")
        dispatcher._running = True  # as run() sets it, without its loop claiming on its own
        assert dispatcher.behind() is False  # no claim yet
        assert await dispatcher.dispatch_once() == 2
        assert dispatcher.behind() is True  # a full batch: more may be due
        assert await dispatcher.dispatch_once() == 1
        assert dispatcher.behind() is False
        await dispatcher.drain()
        assert len(sink.received) == 3
    finally:
        await dispatcher.stop(grace=5)
        await daemon.client.close()
        await sink.close()


async def test_an_arrival_given_up_while_it_waits_leaves_its_webhook_id_usable(
    tmp_path: Path,
) -> None:
    """A signed message whose sender hangs up while it waits for its turn (the test server
    cancels the handler then, as the daemon's does at shutdown): its webhook-id is not spent,
    and the sender's retry of the same message is accepted, not refused as a replay."""
    import aiohttp

    from tests.harness import FakeClock
    from tests.test_auth import NEW_KEY, NOW, signed_headers, start, whsec

    daemon = await start(
        tmp_path, {"s.yaml": "auth: {hmac: {secret: key}}\n"}, {"key": whsec(NEW_KEY)},
        clock=FakeClock(NOW),
    )  # fmt: skip
    body = b'{"conversion_id": "W1", "offer": 7, "affiliate": 42, "status": "pending"}'
    headers = signed_headers("msg_w", NOW, body, NEW_KEY)
    try:
        pacing = Pacing(lambda: True, lambda: 1, max_hold=30)  # behind, an attempt under way
        daemon.services.pacing = pacing
        pacing.observe(0.99)
        with pytest.raises(TimeoutError):
            await daemon.client.post(
                "/webhooks/s", data=body, headers=headers, timeout=aiohttp.ClientTimeout(0.3)
            )
        for _ in range(200):  # the hang-up reaches the server: its handler is cancelled
            if pacing.held == 1 and pacing.waiting == 0:
                break
            await asyncio.sleep(0.01)
        assert (pacing.held, pacing.waiting) == (1, 0)
        pacing.observe(0.5)  # no longer saturated: nothing waits
        resp = await daemon.client.post("/webhooks/s", data=body, headers=headers)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["transition"] == "new"
    finally:
        await daemon.client.close()


async def test_stopping_ends_an_episode_and_logs_its_count() -> None:
    signals = Signals()
    pacing = signals.pacing(max_hold=30)
    sampler = asyncio.create_task(pacing.run())
    pacing.observe(0.95)
    with capture_logs() as logs:
        waiting = asyncio.create_task(pacing.admit())
        await _settled([waiting])
        sampler.cancel()  # the daemon stops within QUIET of the episode
        with pytest.raises(asyncio.CancelledError):
            await sampler
        assert await waiting is True  # let go, not left waiting for a turn
    assert [(e["event"], e.get("count")) for e in logs] == [
        ("ingest_paced", None),
        ("ingest_unpaced", 1),
    ]
    assert await pacing.admit() is False
