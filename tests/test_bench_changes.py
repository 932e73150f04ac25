"""The bench's status-change figure (bench/http_figures.change_plan): each conversion arrives
pending, then is approved CHANGE_AFTER later by request count; only approvals fire."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest

from bench.http_figures import CHANGE_AFTER, change_plan, first_arrival_key
from bench.rulesgen import key_of, offer_of


@pytest.mark.parametrize("rate", [10.0, 480.0, 1000.0])
def test_every_approval_follows_its_pending_arrival_and_only_approvals_fire(rate: float) -> None:
    plan = change_plan("p", 7, rate)
    pending: dict[str, int] = {}
    approved: dict[str, int] = {}
    total = int(rate * 8)
    for n in range(total):
        k, query, key = plan(n)
        params = {name: value[0] for name, value in parse_qs(query).items()}
        cid, status = params["conversion_id"], params["status"]
        assert params["sub1"] == "fire-0"
        if status == "pending":
            assert key is None  # a first arrival, pending: nothing fires
            assert cid not in pending
            pending[cid] = n
            continue
        assert status == "approved"
        assert n % 2 == 1
        assert cid == f"p-{k}"
        assert key == key_of(cid, offer_of(k, 7), seq=2)  # its second arrival
        assert params["offer"] == str(offer_of(k, 7))
        assert cid in pending
        assert cid not in approved
        approved[cid] = n
        # sent about CHANGE_AFTER after the pending arrival (requests go at `rate`)
        assert abs((n - pending[cid]) / rate - CHANGE_AFTER) <= 1 / rate + 1e-9
    assert len(approved) >= total // 2 - round(rate * CHANGE_AFTER / 2) - 1
    assert approved  # there is something to measure


def test_early_requests_are_pending_arrivals_of_their_own() -> None:
    plan = change_plan("p", 1, 1000.0)
    k, query, key = plan(1)
    assert k < 0
    assert key is None
    assert "conversion_id=p-early1&" in query
    assert "status=pending" in query


def test_an_approval_that_overtakes_its_pending_arrival_is_known_by_its_first_key() -> None:
    """When the approval reaches the node first, the conversion is new and approved: it fires on
    its first arrival, and the bench counts it apart from approvals never delivered."""
    plan = change_plan("p", 7, 1000.0)
    n = next(n for n in range(1000) if plan(n)[2] is not None)
    k, _, key = plan(n)
    assert key == key_of(f"p-{k}", offer_of(k, 7), seq=2)
    assert first_arrival_key(plan, n, "p", 7) == key_of(f"p-{k}", offer_of(k, 7), seq=1)
