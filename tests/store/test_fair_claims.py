"""Contract: claim_due leaves out the deliveries of the affiliates it is told to skip (fair use),
never those of admin postbacks (no affiliate)."""

from __future__ import annotations

from daemon.models import Conversion, Status, Transition
from daemon.store.base import ArrivalPlan, PlannedDelivery, Store

from .support import LEASE, Planner, at, conversion


class OwnedPlanner(Planner):
    """One delivery per postback id, postback N authored for affiliate `owners[N]`."""

    owners: dict[int, str | None] = {}  # noqa: RUF012 - set per instance below

    def __call__(
        self, transition: Transition, previous: Status | None, effective: Conversion
    ) -> ArrivalPlan:
        plan = super().__call__(transition, previous, effective)
        return ArrivalPlan(
            plan.data,
            plan.values,
            [
                PlannedDelivery(d.postback_id, d.action, d.destination, self.owners[d.postback_id])
                for d in plan.deliveries
            ],
        )


async def arrive_owned(store: Store, cid: str, when: float, owners: dict[int, str | None]) -> None:
    conv = conversion(cid)
    planner = OwnedPlanner(conv, postbacks=tuple(owners))
    planner.owners = owners
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
