"""Contract: claim_due leaves out the deliveries of the affiliates it is told to skip (fair use),
never those of admin postbacks (no affiliate), and those of the destinations it is told to skip
(a destination's backlog leaves room to the others), the rest still oldest due first."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace

from daemon.models import Conversion, Status, Transition
from daemon.store.base import ArrivalPlan, Claim, DeliveryState, PlannedDelivery, Store

from .conftest import Backend
from .support import LEASE, Planner, arrive, at, conversion


@dataclass
class ShapedPlanner(Planner):
    """The support planner's deliveries, each passed through `shape` (its author or its
    destination set per postback id)."""

    shape: Callable[[PlannedDelivery], PlannedDelivery] = lambda d: d

    def __call__(
        self, transition: Transition, previous: Status | None, effective: Conversion
    ) -> ArrivalPlan:
        plan = super().__call__(transition, previous, effective)
        return ArrivalPlan(plan.data, plan.values, [self.shape(d) for d in plan.deliveries])


async def arrive_owned(store: Store, cid: str, when: float, owners: dict[int, str | None]) -> None:
    conv = conversion(cid)

    def shape(d: PlannedDelivery) -> PlannedDelivery:
        return replace(d, affiliate_owner=owners[d.postback_id])

    planner = ShapedPlanner(conv, postbacks=tuple(owners), shape=shape)
    await store.record_arrival("generic", conv, at(when), planner)


async def test_claims_skip_the_affiliates_named(store: Store) -> None:
    owners = {1: "7", 2: "8", 3: None}
    for i in range(3):
        await arrive_owned(store, f"c{i}", i, owners)

    first = await store.claim_due("n1", at(10), 100, LEASE, skip_affiliates=["7"])
    assert sorted(c.postback_id for c in first) == [2, 2, 2, 3, 3, 3]
    assert await store.claim_due("n1", at(10), 100, LEASE, skip_affiliates=["7", "8"]) == []
    rest = await store.claim_due("n1", at(10), 100, LEASE)
    assert [c.postback_id for c in rest] == [1, 1, 1]


async def test_skipping_an_affiliate_with_nothing_due_changes_nothing(store: Store) -> None:
    await arrive_owned(store, "c1", 0, {1: "7"})
    [claim] = await store.claim_due("n1", at(1), 10, LEASE, skip_affiliates=["x'); --", "8"])
    assert claim.postback_id == 1


async def arrive_routed(store: Store, cid: str, when: float, routes: dict[int, str]) -> None:
    conv = conversion(cid)

    def shape(d: PlannedDelivery) -> PlannedDelivery:
        return PlannedDelivery(d.postback_id, d.action, routes[d.postback_id])

    planner = ShapedPlanner(conv, postbacks=tuple(routes), shape=shape)
    await store.record_arrival("generic", conv, at(when), planner)


async def test_claims_skip_the_destinations_named_and_keep_the_rest_oldest_first(
    store: Store,
) -> None:
    # destination A's backlog (released after an outage) is older than anything of B's
    for i in range(30):
        await arrive_routed(store, f"a{i}", i, {1: "http://a.example"})
    for i in range(3):
        await arrive_routed(store, f"b{i}", 100 + i, {2: "http://b.example"})

    first = await store.claim_due("n1", at(200), 10, LEASE)
    assert [c.conversion_id for c in first] == [f"a{i}" for i in range(10)]
    assert {c.destination for c in first} == {"http://a.example"}
    # A has its share claimed: the next claim leaves A's backlog and takes B's newer deliveries
    skip = ["http://a.example"]
    second = await store.claim_due("n1", at(200), 10, LEASE, skip_destinations=skip)
    assert [(c.conversion_id, c.destination) for c in second] == [
        (f"b{i}", "http://b.example") for i in range(3)
    ]
    assert await store.claim_due("n1", at(200), 10, LEASE, skip_destinations=skip) == []
    # A no longer skipped: its backlog goes on draining where it stopped, oldest first
    rest = await store.claim_due("n1", at(200), 100, LEASE)
    assert [c.conversion_id for c in rest] == [f"a{i}" for i in range(10, 30)]


async def test_destination_and_affiliate_skips_combine(store: Store) -> None:
    await arrive_owned(store, "c1", 0, {1: "7", 2: None})  # host1.example, host2.example
    claims = await store.claim_due(
        "n1", at(1), 10, LEASE, skip_affiliates=["7"], skip_destinations=["host2.example"]
    )
    assert claims == []
    [claim] = await store.claim_due("n1", at(1), 10, LEASE, skip_destinations=["host2.example"])
    assert (claim.postback_id, claim.destination) == (1, "host1.example")


async def test_hostile_destination_names_are_only_data(store: Store) -> None:
    await arrive_routed(store, "c1", 0, {1: "http://a.example"})
    # (no NUL: the names skipped are ones the store gave back, and PostgreSQL text has none)
    hostile = ["x'); DELETE FROM delivery; --", "\x1b[2J\r\n", "é" * 5000, "", '"]']
    [claim] = await store.claim_due("n1", at(1), 10, LEASE, skip_destinations=hostile)
    assert claim.destination == "http://a.example"


async def test_claims_skipping_a_destination_merge_the_others_oldest_first(store: Store) -> None:
    routes = {"a": "http://a.example", "b": "http://b.example", "c": "http://c.example"}
    for i in range(12):  # interleaved in time: a0 b1 c2 a3 b4 c5 ...
        prefix = "abc"[i % 3]
        await arrive_routed(store, f"{prefix}{i}", i, {1: routes[prefix]})
    await arrive_routed(store, "b-later", 110, {1: routes["b"]})  # not due yet at 100

    skip = [routes["a"]]
    first = await store.claim_due("n1", at(100), 5, LEASE, skip_destinations=skip)
    assert [c.conversion_id for c in first] == ["b1", "c2", "b4", "c5", "b7"]
    rest = await store.claim_due("n1", at(100), 5, LEASE, skip_destinations=skip)
    assert [c.conversion_id for c in rest] == ["c8", "b10", "c11"]
    assert await store.claim_due("n1", at(100), 5, LEASE, skip_destinations=skip) == []
    both = [routes["a"], routes["c"]]
    [later] = await store.claim_due("n1", at(120), 5, LEASE, skip_destinations=both)
    assert later.conversion_id == "b-later"
    a_only = await store.claim_due("n1", at(120), 10, LEASE)  # the rest in flight
    assert [c.conversion_id for c in a_only] == ["a0", "a3", "a6", "a9"]


async def test_nodes_skipping_destinations_and_not_never_share_a_delivery(
    backend: Backend,
) -> None:
    nodes = [await backend.open() for _ in range(3)]
    for i in range(60):  # to host1.example, host2.example, host3.example
        await arrive(nodes[0], conversion(f"c{i}"), at(i % 7), postbacks=(1, 2, 3))

    async def claimer(store: Store, name: str, skip: list[str]) -> list[Claim]:
        mine: list[Claim] = []
        while batch := await store.claim_due(name, at(10), 7, LEASE, skip_destinations=skip):
            assert not {c.destination for c in batch} & set(skip)
            mine.extend(batch)
        return mine

    skips = [["host1.example"], [], ["host1.example", "host3.example"]]
    results = await asyncio.gather(
        *(claimer(nodes[i % 3], f"node{i}", skips[i % 3]) for i in range(9)),
    )

    claimed = [c.delivery_id for claims in results for c in claims]
    assert len(claimed) == 180
    assert len(set(claimed)) == 180
    depth = await nodes[0].queue_depth()
    assert (depth[DeliveryState.IN_FLIGHT], depth[DeliveryState.QUEUED]) == (180, 0)
