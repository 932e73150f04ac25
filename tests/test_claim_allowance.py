"""The claim allowance (daemon.hosts.Destinations.claim_allowance, Shares.saturated with an
allowance, daemon.dispatcher): a destination that sends faster than the store answers a claim
is not skipped by the next claim while its slots would run dry, and a slow destination keeps
its share exactly (a released backlog still leaves the node's claims to the others:
tests/test_destination_shares.py)."""

from __future__ import annotations

from daemon.hosts import CLAIM_QUEUE_FACTOR, SEND_TIME_WEIGHT, Destinations, Shares

PER_HOST = 8
SHARE = CLAIM_QUEUE_FACTOR * PER_HOST


def destinations() -> Destinations:
    return Destinations(PER_HOST, now=lambda: 0.0)


def test_no_allowance_before_a_destinations_first_send_or_without_a_claim_time() -> None:
    dests = destinations()
    assert dests.claim_allowance("http://a:80", 0.05, 64) == 0  # never seen
    dests.lane("http://a:80")
    assert dests.claim_allowance("http://a:80", 0.05, 64) == 0  # seen, never sent
    dests.sent("http://a:80", 0.001)
    assert dests.claim_allowance("http://a:80", 0.0, 64) == 0  # no claim time yet


def test_a_fast_destination_is_allowed_what_its_slots_send_during_a_claim_at_most_a_batch() -> None:
    dests = destinations()
    dests.sent("http://fast:80", 0.01)  # 8 slots x (50 ms / 10 ms) = 40 sends per claim
    assert dests.claim_allowance("http://fast:80", 0.05, 64) == 40
    dests.sent("http://fast:80", 0.01)
    assert dests.claim_allowance("http://fast:80", 0.05, 32) == 32  # never more than a batch
    dests.sent("http://faster:80", 0.0)  # a send measured as instant does not divide by zero
    assert dests.claim_allowance("http://faster:80", 0.05, 64) == 64


def test_a_slow_destination_is_allowed_nothing() -> None:
    dests = destinations()
    dests.sent("http://slow:80", 5.0)  # 8 x 50 ms / 5 s: 0.08 of a send
    assert dests.claim_allowance("http://slow:80", 0.05, 64) == 0


def test_the_send_time_is_a_moving_average_that_follows_a_destination_that_slows_down() -> None:
    dests = destinations()
    dests.sent("http://a:80", 0.001)
    fast = dests.claim_allowance("http://a:80", 0.05, 1000)
    for _ in range(200):  # the destination now answers in 2 s
        dests.sent("http://a:80", 2.0)
    assert fast == 400
    assert dests.claim_allowance("http://a:80", 0.05, 1000) == 0
    assert 0 < SEND_TIME_WEIGHT < 1


def test_saturated_counts_only_what_the_allowance_leaves() -> None:
    woken: list[int] = []
    shares = Shares(SHARE, lambda: woken.append(1))
    ends = [shares.take("fast") for _ in range(SHARE + 10)]
    ends += [shares.take("slow") for _ in range(SHARE)]
    allowance = {"fast": 10, "slow": 0}
    # Without an allowance both are at their share; with it, the fast one has room once its
    # claims in progress less what its slots send during a claim are below the share.
    assert shares.saturated() == ["fast", "slow"]
    assert shares.saturated(allowance.__getitem__) == ["fast", "slow"]  # 26 - 10 = 16: at it
    ends[0]()
    assert shares.saturated(allowance.__getitem__) == ["slow"]  # 25 - 10 < 16
    assert shares.saturated() == ["fast", "slow"]  # the share itself is unchanged
    assert woken == []  # room is still called only when a count drops below the share


async def test_the_dispatcher_keeps_claiming_a_fast_destination_whose_share_is_full() -> None:
    """Through the dispatcher's own helper: with the claims' round trip known, a destination
    whose sends are fast is left out of the skips even with more than its share in progress."""
    import asyncio

    from daemon.dispatcher import Dispatcher, DispatcherConfig

    dests = destinations()
    dispatcher = Dispatcher(
        store=None,  # type: ignore[arg-type]  # not used: no claim is made here
        runtime=lambda: None,  # type: ignore[arg-type,return-value]
        now=lambda: 0.0,
        config=DispatcherConfig(node="n"),
        destinations=dests,
    )
    assert dispatcher._claim_allowance(64, "http://fast:80") == 0  # no claim timed yet
    dispatcher._claim_s = 0.05
    dests.sent("http://fast:80", 0.002)
    dests.sent("http://slow:80", 3.0)
    assert dispatcher._claim_allowance(64, "http://fast:80") == 64
    assert dispatcher._claim_allowance(64, "http://slow:80") == 0
    shares = Shares(SHARE, lambda: None)
    for _ in range(SHARE + 30):
        shares.take("http://fast:80")
        shares.take("http://slow:80")
    assert shares.saturated(lambda d: dispatcher._claim_allowance(64, d)) == ["http://slow:80"]
    await asyncio.sleep(0)
