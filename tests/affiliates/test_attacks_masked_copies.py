"""Red team (issue 15): reads mask an affiliate's credentials (`****`). A duplicate made from the
masked view, or a PATCH that sends back the action as read with one field edited, stored `****`
in place of the credentials and sent it to the destination. Both keep the real values now."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.affiliates.kit import AFF_A, SETTINGS, Api, ping, rules
from tests.harness import Daemon, Sink, start_daemon, wait_for

KEY = "k-0123456789abcdef"


@pytest.fixture
async def daemon(tmp_path: Path, sink: Sink) -> AsyncIterator[Daemon]:
    d = await start_daemon(tmp_path, rules(sink), settings=SETTINGS, dispatch=False)
    yield d
    await d.client.close()


def with_credentials(sink: Sink, path: str) -> dict[str, Any]:
    body = ping(sink, path=path)
    body["action"]["url"] = (
        sink.url.replace("//", "//user:pw-5678@") + f"/{path}?tx={{conversion_id}}"
    )
    body["action"]["headers"] = {"X-Api-Key": KEY}
    return body


async def sent(daemon: Daemon, sink: Sink, offer: int, conversion: str, path: str) -> Any:
    await daemon.post(conversion_id=conversion, offer=offer, affiliate=42, status="approved")
    await daemon.services.dispatcher.dispatch_once()
    await daemon.services.dispatcher.drain()
    await wait_for(lambda: any(r.path_qs.startswith(f"/{path}?") for r in sink.received))
    return next(r for r in sink.received if r.path_qs.startswith(f"/{path}?"))


def assert_real_credentials(request: Any) -> None:
    assert request.headers["X-Api-Key"] == KEY
    basic = base64.b64encode(b"user:pw-5678").decode()
    assert request.headers["Authorization"] == f"Basic {basic}"


async def test_a_duplicate_keeps_the_credentials_the_view_masks(daemon: Daemon, sink: Sink) -> None:
    api = Api(daemon)
    made = await api.create(AFF_A, with_credentials(sink, "orig"))
    assert made["action_settings"]["headers"] == {"X-Api-Key": "****"}  # reads mask it
    dup = {"from_offer": 7, "to_offer": 8, "ids": [made["id"]]}
    status, answer = await api("POST", "/api/v1/postbacks/duplicate", AFF_A, dup)
    assert status == 201, answer
    assert answer["postbacks"][0]["action_settings"] == made["action_settings"]
    assert_real_credentials(await sent(daemon, sink, 8, "c1", "orig"))


async def test_an_action_sent_back_as_read_keeps_its_credentials(
    daemon: Daemon, sink: Sink
) -> None:
    api = Api(daemon)
    made = await api.create(AFF_A, with_credentials(sink, "before"))
    action = {"type": made["action"], **made["action_settings"]}
    action["url"] = action["url"].replace("/before?", "/after?")
    status, answer = await api(
        "PATCH", f"/api/v1/postbacks/{made['id']}", AFF_A, {"action": action}
    )
    assert status == 200, answer
    assert_real_credentials(await sent(daemon, sink, 7, "c1", "after"))
    # A credential given anew is taken as given.
    action["headers"] = {"X-Api-Key": "new-key-000"}
    status, _ = await api("PATCH", f"/api/v1/postbacks/{made['id']}", AFF_A, {"action": action})
    assert status == 200
    stored = daemon.services.affiliates.index.entries[made["id"]].stored  # type: ignore[union-attr]
    assert stored.body["action"]["headers"] == {"X-Api-Key": "new-key-000"}
