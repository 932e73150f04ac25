"""One JSON shape per object (STYLE.md, issues 15 and 18): a postback is the same object in
`postbackd rules list --format json` and `rules show --format json` as in `GET /api/v1/postbacks`
and `GET /api/v1/postbacks/{id}`, file postbacks and store postbacks alike, for an admin and for
an affiliate's user. The daemon runs in-process on a loopback port; the command reads the same
rules directory and SQLite store through a settings file."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.affiliates.kit import ADMIN, AFF_A, AFF_B, SETTINGS, Api, ping, rules
from tests.harness import Daemon, Sink, start_daemon
from tests.test_cli_ops_kit import run


@pytest.fixture
async def daemon(tmp_path: Path, sink: Sink) -> AsyncIterator[Daemon]:
    d = await start_daemon(tmp_path, rules(sink), settings=SETTINGS, dispatch=False)
    yield d
    await d.client.close()


async def cli_json(*args: str) -> Any:
    """`postbackd ARGS` (in a thread: the command runs its own event loop), its JSON output."""
    r = await asyncio.to_thread(run, *args)
    assert r.code == 0, r.err
    return json.loads(r.out)


async def test_rules_list_json_is_the_api_object_for_file_and_store_postbacks(
    daemon: Daemon, sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POSTBACKD_CONFIG", raising=False)
    api = Api(daemon)
    await api("PUT", "/api/v1/affiliate/secrets/tk", AFF_A, {"value": "v4lue-never-shown"})
    secret_url = f"{sink.url}/a?k=${{affiliate_secret:tk}}&tx={{conversion_id}}"
    mine = await api.create(
        AFF_A, ping(sink, goal="lead", action={"type": "ping_url", "url": secret_url})
    )
    paused = await api.create(AFF_A, ping(sink, "paused"))
    status, _ = await api(
        "POST", f"/api/v1/postbacks/{paused['id']}/status", AFF_A, {"status": "disabled"}
    )
    assert status == 200
    theirs = await api.create(AFF_B, ping(sink, "b"))
    config = tmp_path / "cli.yaml"
    config.write_text(
        json.dumps({"store": daemon.settings.store, "rules_dir": str(daemon.rules_dir)})
    )
    seen: dict[int, Any] = {}
    for token, viewer, ids in (
        (ADMIN, "admin", {101, 102, 103, mine["id"], paused["id"], theirs["id"]}),
        (AFF_A, "affiliate:42", {101, mine["id"], paused["id"]}),
        (AFF_B, "affiliate:77", {103, theirs["id"]}),
    ):
        status, listed = await api("GET", "/api/v1/postbacks", token)
        assert status == 200
        from_api = {row["id"]: row for row in listed["postbacks"]}
        rows = await cli_json(
            "rules", "list", "-c", str(config), "--format", "json", "--as", viewer
        )
        from_cli = {row["id"]: row for row in rows}
        assert set(from_cli) == set(from_api) == ids
        for pid, row in from_cli.items():
            assert row == from_api[pid], pid  # every key and value, file and store rows
        seen.update(from_cli)
    assert "v4lue-never-shown" not in json.dumps(seen)
    assert seen[mine["id"]]["action_settings"]["url"] == secret_url  # the reference, as the API
    assert (seen[101]["source"], seen[mine["id"]]["source"]) == ("file", "store")
    assert seen[paused["id"]]["status"] == "disabled"
    # `rules show` shows the same object, with every setting besides.
    shown = await cli_json("rules", "show", "101", "-c", str(config), "--format", "json")
    status, one = await api("GET", "/api/v1/postbacks/101", ADMIN)
    assert status == 200
    assert {k: v for k, v in shown.items() if k not in ("retry", "action_settings_all")} == one
