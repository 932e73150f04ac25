"""The store layer over the file index (issue 15): a change touches only its own entries, a
snapshot taken before a change stays as it was, and a read older than a delete this node already
took in does not bring the postback back."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.actions.base import Resources
from daemon.affiliates.index import AffiliateSecrets, StoreIndex
from daemon.affiliates.layers import CowMap, Layered
from daemon.loader import load_rules
from daemon.models import Trigger
from daemon.reload import build_runtime
from daemon.store.affiliate_types import FIRST_STORE_ID, StoredPostback
from tests.affiliates.kit import rules
from tests.harness import FakeClock, Sink, write_rules

AT = datetime(2026, 12, 6, tzinfo=UTC)
DONE = Trigger.DONE


def row(n: int, seq: int, *, offer: str = "7", status: str = "active") -> StoredPostback:
    body = {
        "trigger": "conversion_done",
        "author": {"id": "a", "name": "a", "affiliate": "42"},
        "action": {"type": "ping_url", "url": f"https://t.test/{n}"},
    }
    return StoredPostback(FIRST_STORE_ID + n, "42", offer, status, None, body, AT, AT, seq)


def test_cowmap_changes_leave_snapshots_alone() -> None:
    first = CowMap[int, str]().evolve({i: str(i) for i in range(1000)})
    second = first.evolve({5: "five", 2000: "new"}, drop=[7, 99999])
    assert (first[5], len(first), 7 in first, 2000 in first) == ("5", 1000, True, False)
    assert (second[5], len(second), 7 in second, second[2000]) == ("five", 1000, False, "new")
    assert sorted(second) == sorted([*(i for i in range(1000) if i != 7), 2000])
    layered = Layered({1: "a", 2: "b"}, {2: "B", 3: "C"})
    assert (dict(layered), len(layered), layered.get(9, "x")) == ({1: "a", 2: "B", 3: "C"}, 3, "x")


class _GetOnly(dict[int, str | None]):
    """A top layer that fails the test if looked up with [] (a KeyError per miss)."""

    def __getitem__(self, key: int) -> str | None:
        raise AssertionError(f"[{key}] asked of the top layer")


def test_lookups_in_the_layers_ask_get_not_a_keyerror() -> None:
    """The store layer over the rule files is asked with get: most keys are the base's, and
    [] with KeyError made an exception per lookup (two per delivered conversion)."""
    cow = CowMap[int, str]().evolve({1: "one"})
    assert (cow.get(1), cow.get(2), cow.get(2, "d")) == ("one", None, "d")
    layered = Layered({1: "a", 2: "b"}, _GetOnly({2: "B", 3: None}))
    assert (layered[1], layered[2], layered[3]) == ("a", "B", None)  # a None on top is the top's
    with pytest.raises(KeyError):
        layered[4]
    over_cow = Layered({1: "a"}, cow.evolve({5: "five"}))
    assert (over_cow[1], over_cow[5], over_cow.get(6, "x")) == ("one", "five", "x")


def test_a_change_touches_only_its_entries(tmp_path: Path, sink: Sink) -> None:
    write_rules(tmp_path, rules(sink))
    resources = Resources(http=None, secret=lambda name: "", clock=FakeClock())
    files = build_runtime(load_rules(tmp_path), {}, resources)
    index = StoreIndex(resources, AffiliateSecrets())
    index.compose(files)
    index.apply([row(1, 1), row(2, 2, offer="8")], 2)
    before = index.compose(files)
    assert before.rules.active is files.rules.active  # the file index is not copied
    own7, own8 = ("7", DONE, "42"), ("8", DONE, "42")
    assert [lp.id for lp in before.rules.by_affiliate[own7]] == [FIRST_STORE_ID + 1]
    assert [lp.id for lp in before.rules.by_affiliate[own8]] == [FIRST_STORE_ID + 2]
    assert [lp.id for lp in before.rules.offers["7"]] == [101, 102, FIRST_STORE_ID + 1]
    offer8 = before.rules.by_affiliate[own8]
    index.apply([row(1, 3, status="disabled")])
    after = index.compose(files)
    assert own7 not in after.rules.by_affiliate
    assert after.rules.by_affiliate[own8] is offer8  # untouched entry, same object
    assert [lp.id for lp in before.rules.by_affiliate[own7]] == [FIRST_STORE_ID + 1]
    assert after.rules.postbacks[FIRST_STORE_ID + 1].postback.status == "disabled"
    assert len(after.rules.postbacks) == 5
    assert after.actions[FIRST_STORE_ID + 2] is before.actions[FIRST_STORE_ID + 2]


def test_an_older_read_does_not_bring_back_a_deleted_postback(tmp_path: Path, sink: Sink) -> None:
    write_rules(tmp_path, rules(sink))
    resources = Resources(http=None, secret=lambda name: "", clock=FakeClock())
    files = build_runtime(load_rules(tmp_path), {}, resources)
    index = StoreIndex(resources, AffiliateSecrets())
    index.compose(files)
    live = row(1, 4)
    index.apply([live])
    index.apply([replace(live, status="deleted")])  # as the service takes its own delete in
    index.apply([live], 4)  # a sync read that started before the delete
    assert FIRST_STORE_ID + 1 not in index.compose(files).rules.postbacks
    index.apply([replace(live, change_seq=9)])  # only a later version passes the guard
    assert FIRST_STORE_ID + 1 in index.compose(files).rules.postbacks


def test_a_reload_redoes_only_the_offers_whose_goals_changed(tmp_path: Path, sink: Sink) -> None:
    files_before = rules(sink)
    write_rules(tmp_path, files_before)
    resources = Resources(http=None, secret=lambda name: "", clock=FakeClock())
    first = build_runtime(load_rules(tmp_path), {}, resources)
    index = StoreIndex(resources, AffiliateSecrets())
    index.compose(first)
    index.apply([row(1, 1), row(2, 2, offer="8")], 2)
    before = index.compose(first)
    on7 = before.rules.postbacks[FIRST_STORE_ID + 1]
    on8 = before.rules.postbacks[FIRST_STORE_ID + 2]
    assert (on7.goals_enabled, on8.goals_enabled) == (True, False)
    write_rules(tmp_path, {"offer-8.yaml": files_before["offer-8.yaml"].replace(
        "offer: 8", "offer: 8\n            goals_enabled: true"
    )})  # fmt: skip
    second = build_runtime(load_rules(tmp_path), {}, resources, previous=first)
    after = index.compose(second)
    assert after.rules.postbacks[FIRST_STORE_ID + 1] is on7  # offer 7 untouched
    assert after.rules.postbacks[FIRST_STORE_ID + 2].goals_enabled is True
    assert [lp.id for lp in after.rules.offers["8"]] == [103, FIRST_STORE_ID + 2]
    assert after.rules.offers["8"][0] is second.rules.offers["8"][0]  # over the new files
