"""A destination's slots (daemon.hosts.Lane): at most `limit` sends at once, in order of arrival,
the next one started in the same turn of the event loop as the previous one ends; bounded time
in line; a cancelled waiter cancels its send."""

from __future__ import annotations

import asyncio

import pytest

from daemon.hosts import InLineTooLong, Lane
from tests.harness import wait_for

FAR = 3600.0


def far() -> float:
    return asyncio.get_running_loop().time() + FAR


async def test_at_most_limit_sends_at_once_in_order_of_arrival() -> None:
    lane = Lane(3)
    gate = asyncio.Event()
    started: list[int] = []
    running = 0
    most = 0

    async def send(n: int) -> int:
        nonlocal running, most
        started.append(n)
        running += 1
        most = max(most, running)
        await gate.wait()
        await asyncio.sleep(0)
        running -= 1
        return n * 10

    waiters = [asyncio.create_task(lane.run(lambda n=n: send(n), far())) for n in range(10)]
    await wait_for(lambda: lane.sending == 3)
    assert started == [0, 1, 2]
    gate.set()
    assert await asyncio.gather(*waiters) == [n * 10 for n in range(10)]
    assert started == list(range(10))
    assert most == 3
    assert lane.sending == 0


async def test_the_next_send_starts_in_the_same_turn_as_the_last_one_ends() -> None:
    """No turn of the event loop passes with the slot free and a send in line: a callback
    scheduled when the first send ends has not run yet when the second one starts."""
    lane = Lane(1)
    gate = asyncio.Event()
    events: list[str] = []

    async def first() -> None:
        await gate.wait()
        asyncio.get_running_loop().call_soon(events.append, "next turn")
        events.append("first ended")

    async def second() -> None:
        events.append("second started")

    one = asyncio.create_task(lane.run(first, far()))
    two = asyncio.create_task(lane.run(second, far()))
    await wait_for(lambda: lane.sending == 1)
    gate.set()
    await asyncio.gather(one, two)
    assert events[:2] == ["first ended", "second started"]


async def test_a_send_still_in_line_at_its_deadline_is_withdrawn_unsent() -> None:
    lane = Lane(1)
    gate = asyncio.Event()
    ran: list[str] = []

    async def late() -> None:
        ran.append("late")

    holder = asyncio.create_task(lane.run(gate.wait, far()))
    await wait_for(lambda: lane.sending == 1)
    with pytest.raises(InLineTooLong):
        await lane.run(late, asyncio.get_running_loop().time() + 0.05)
    gate.set()
    assert await holder is True
    await lane.run(gate.wait, far())  # the lane goes on
    assert ran == []


async def test_an_error_goes_to_its_waiter_and_the_lane_goes_on() -> None:
    lane = Lane(1)

    async def broken() -> None:
        raise ValueError("boom")

    async def fine() -> str:
        return "ok"

    bad = asyncio.create_task(lane.run(broken, far()))
    good = asyncio.create_task(lane.run(fine, far()))
    with pytest.raises(ValueError, match="boom"):
        await bad
    assert await good == "ok"


async def test_cancelling_a_waiter_cancels_its_send_and_waits_for_its_cleanup() -> None:
    lane = Lane(1)
    cleaned = asyncio.Event()
    never: list[str] = []

    async def hangs() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # its cleanup (the dispatcher releases the claim)
            cleaned.set()
            raise

    async def after() -> str:
        return "after"

    async def withdrawn() -> None:
        never.append("withdrawn")

    running = asyncio.create_task(lane.run(hangs, far()))
    await wait_for(lambda: lane.sending == 1)
    in_line = asyncio.create_task(lane.run(withdrawn, far()))
    nxt = asyncio.create_task(lane.run(after, far()))
    await asyncio.sleep(0)
    in_line.cancel()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert cleaned.is_set()  # the waiter ended after its send's cleanup
    with pytest.raises(asyncio.CancelledError):
        await in_line
    assert await nxt == "after"
    assert never == []
    assert lane.sending == 0


async def test_each_send_in_line_is_withdrawn_at_its_own_deadline_in_any_order() -> None:
    # One timer watches the lane's line: a later arrival with an earlier deadline is withdrawn
    # at that deadline too, and the sends whose deadlines are far still run when a slot frees.
    lane = Lane(1)
    gate = asyncio.Event()
    ran: list[str] = []
    now = asyncio.get_running_loop().time()

    async def send(name: str) -> str:
        ran.append(name)
        return name

    holder = asyncio.create_task(lane.run(gate.wait, far()))
    await wait_for(lambda: lane.sending == 1)
    late = asyncio.create_task(lane.run(lambda: send("late"), now + 0.2))
    kept = asyncio.create_task(lane.run(lambda: send("kept"), far()))
    early = asyncio.create_task(lane.run(lambda: send("early"), now + 0.05))
    with pytest.raises(InLineTooLong):
        await early
    assert not late.done()  # its own deadline has not come
    with pytest.raises(InLineTooLong):
        await late
    assert not kept.done()
    gate.set()
    assert await holder is True
    assert await kept == "kept"
    assert ran == ["kept"]


async def test_a_send_that_started_in_time_is_not_withdrawn_at_its_deadline() -> None:
    lane = Lane(1)
    gate = asyncio.Event()
    until = asyncio.get_running_loop().time() + 0.05
    running = asyncio.create_task(lane.run(gate.wait, until))
    await wait_for(lambda: lane.sending == 1)
    # a second send in line keeps the lane's watch armed past the first one's deadline
    waiting = asyncio.create_task(lane.run(gate.wait, until + 0.05))
    with pytest.raises(InLineTooLong):
        await waiting
    assert not running.done()  # past its deadline, but it was running: not withdrawn
    gate.set()
    assert await running is True


async def test_a_cancelled_waiter_in_line_does_not_break_the_watch() -> None:
    lane = Lane(1)
    gate = asyncio.Event()
    now = asyncio.get_running_loop().time()
    holder = asyncio.create_task(lane.run(gate.wait, far()))
    await wait_for(lambda: lane.sending == 1)
    cancelled = asyncio.create_task(lane.run(gate.wait, now + 0.05))
    other = asyncio.create_task(lane.run(gate.wait, now + 0.05))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(InLineTooLong):
        await other
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    gate.set()
    assert await holder is True
    assert await lane.run(gate.wait, far()) is True  # the lane goes on


async def test_runners_are_let_go_when_the_line_is_empty() -> None:
    # A runner drops its own reference at its end (no done callback): none is kept after.
    lane = Lane(4)

    async def send(n: int) -> int:
        await asyncio.sleep(0)
        return n

    assert await asyncio.gather(*(lane.run(lambda n=n: send(n), far()) for n in range(10))) == list(
        range(10)
    )
    await wait_for(lambda: lane._running == 0)
    assert lane._runners == set()
    assert await lane.run(lambda: send(99), far()) == 99  # and new ones start as before


def test_a_lane_used_on_a_new_loop_watches_its_deadlines_on_that_loop() -> None:
    lane = Lane(1)

    async def on_first_loop() -> None:
        # leaves the lane's watch armed on this loop, which then closes
        until = asyncio.get_running_loop().time() + 0.3
        assert await lane.run(lambda: asyncio.sleep(0), until) is None

    async def on_second_loop() -> None:
        gate = asyncio.Event()
        holder = asyncio.create_task(lane.run(gate.wait, far()))
        await wait_for(lambda: lane.sending == 1)
        later = asyncio.get_running_loop().time() + 0.35  # after the first loop's watch
        async with asyncio.timeout(10):  # a deadline never watched would hang here
            with pytest.raises(InLineTooLong):
                await lane.run(gate.wait, later)
        gate.set()
        assert await holder is True

    asyncio.run(on_first_loop())
    asyncio.run(on_second_loop())
