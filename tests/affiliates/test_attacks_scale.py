"""Red team (issue 15): many postbacks of other affiliates degrading one affiliate's calls.

A's `GET /api/v1/postbacks` looked at every store postback of every affiliate (and at every
postback of the composed set to find the file ones): with 100,000 of others' it took 660 ms of
the event loop per call, `limits` 66 ms (figures of a loaded 2-core machine; not asserted here).
Likewise the deliveries list: the ids A may see were recomputed over the whole composed set after
every store write (any affiliate's), 190 ms with 30,000. Each affiliate's live postbacks are
indexed by owner now, and the file ones are grouped by owner once per rule set: A's calls look
only at A's own. Counted here, not timed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from daemon.affiliates.core import ServiceCore
from daemon.store.affiliate_types import FIRST_STORE_ID, StoredPostback
from tests.affiliates.kit import ADMIN, AFF_A, SETTINGS, Api, ping, rules
from tests.harness import Sink, start_daemon

AT = datetime(2026, 12, 6, tzinfo=UTC)
OTHERS = 3000


def others_row(n: int) -> StoredPostback:
    affiliate = str(1000 + n % 300)
    body = {
        "trigger": "conversion_done",
        "author": {"id": "x", "name": "x", "affiliate": affiliate},
        "action": {"type": "ping_url", "url": f"https://t.test/{n}"},
    }
    pid = FIRST_STORE_ID + 10**6 + n
    return StoredPostback(pid, affiliate, "7", "active", None, body, AT, AT, 10**6 + n)


async def test_an_affiliates_calls_never_walk_the_others_postbacks(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = await start_daemon(tmp_path, rules(sink), settings=SETTINGS, dispatch=False)
    try:
        api = Api(daemon)
        service = daemon.services.affiliates
        assert service is not None
        mine = [(await api.create(AFF_A, ping(sink, path=f"m{i}")))["id"] for i in range(2)]
        service.index.apply([others_row(n) for n in range(OTHERS)])
        service.reloader.recompose()
        looked: list[int] = []
        real = ServiceCore._sees

        def counted(viewer: Any, stored: StoredPostback) -> bool:
            looked.append(stored.id)
            return real(viewer, stored)

        monkeypatch.setattr(ServiceCore, "_sees", staticmethod(counted))
        status, listed = await api("GET", "/api/v1/postbacks", AFF_A)
        assert status == 200
        assert [p["id"] for p in listed["postbacks"]] == [101, *mine]
        _, of_offer = await api("GET", "/api/v1/postbacks?offer=7&status=active", AFF_A)
        assert [p["id"] for p in of_offer["postbacks"]] == [101, *mine]
        assert (await api("GET", "/api/v1/affiliate/limits", AFF_A))[1]["used"] == 2
        assert (await api("GET", "/api/v1/affiliate/offers", AFF_A))[0] == 200
        assert len(looked) <= len(mine), len(looked)
        # Deliveries: the visible ids come from the service's owner index, not from a walk of
        # the whole rule set again after each store write (the API no longer has such a walk).
        asked: list[Any] = []
        owner_index = service.visible_ids

        def spied(viewer: Any) -> frozenset[int] | None:
            asked.append(viewer)
            return owner_index(viewer)

        monkeypatch.setattr(service, "visible_ids", spied)
        await daemon.post(conversion_id="c1", offer=7, affiliate=42, status="approved")
        patched = await api("PATCH", f"/api/v1/postbacks/{mine[1]}", AFF_A, {"goal": "lead"})
        assert patched[0] == 200
        status, seen = await api("GET", "/api/v1/deliveries", AFF_A)
        assert sorted(d["postback_id"] for d in seen["deliveries"]) == mine
        assert asked, "the deliveries list did not ask the owner index"
        # The owner index follows deletes and reloads; an admin still sees every one.
        assert (await api("DELETE", f"/api/v1/postbacks/{mine[0]}", AFF_A, {"confirm": mine[0]}))[0]
        assert (await api("POST", "/api/v1/reload", ADMIN))[0] == 200
        _, listed = await api("GET", "/api/v1/postbacks", AFF_A)
        assert [p["id"] for p in listed["postbacks"]] == [101, mine[1]]
        assert (await api("GET", "/api/v1/affiliate/limits", AFF_A))[1]["used"] == 1
        _, everything = await api("GET", "/api/v1/postbacks", ADMIN)
        assert len(everything["postbacks"]) == 3 + 1 + OTHERS
    finally:
        await daemon.client.close()
