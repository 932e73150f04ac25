"""The rule set lives outside the collector's sight after a load, and a replaced set is freed."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from tests.harness import start_daemon

RULE = """
offer: 1
postbacks:
  - {id: %d, trigger: conversion_done, affiliate: "*", action: {type: ping_url, url: "https://x.example/"}}
"""


async def test_loaded_rules_are_frozen_and_a_replaced_set_is_freed(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, {"o.yaml": RULE % 1}, dispatch=False)
    try:
        assert gc.get_freeze_count() > 0
        old = weakref.ref(daemon.services.reloader.runtime.rules)
        (daemon.rules_dir / "o.yaml").write_text(RULE % 2)
        assert await daemon.services.reloader.reload("test")
        assert list(daemon.services.reloader.runtime.rules.postbacks) == [2]
        assert old() is None  # unfrozen, collected: a reload does not pile up old sets
        assert gc.get_freeze_count() > 0
    finally:
        await daemon.client.close()
        gc.unfreeze()


async def test_a_reload_parses_only_changed_files_and_keeps_unchanged_actions(
    tmp_path: Path,
) -> None:
    daemon = await start_daemon(
        tmp_path,
        {"a.yaml": RULE % 1, "b.yaml": (RULE % 2).replace("offer: 1", "offer: 2")},
        dispatch=False,
    )
    try:
        before = daemon.services.reloader.runtime
        (daemon.rules_dir / "b.yaml").write_text((RULE % 3).replace("offer: 1", "offer: 2"))
        assert await daemon.services.reloader.reload("test")
        after = daemon.services.reloader.runtime
        assert sorted(after.rules.postbacks) == [1, 3]
        # a.yaml did not change: the very same model and action object carry on
        assert after.rules.postbacks[1].postback is before.rules.postbacks[1].postback
        assert after.actions[1] is before.actions[1]
        # a changed file is parsed again (and an edit in place that breaks it still fails)
        (daemon.rules_dir / "a.yaml").write_text("offer: [\n")
        assert not await daemon.services.reloader.reload("test")
        assert daemon.services.reloader.runtime is after
    finally:
        await daemon.client.close()
        gc.unfreeze()


async def test_a_reload_of_an_unchanged_tree_keeps_the_running_set(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, {"a.yaml": RULE % 1}, dispatch=False)
    try:
        before = daemon.services.reloader.runtime
        assert await daemon.services.reloader.reload("test")
        after = daemon.services.reloader.runtime
        assert after is not before  # swapped, with the version and load time of now
        assert after.rules.postbacks[1] is before.rules.postbacks[1]
        assert after.actions[1] is before.actions[1]
        assert after.rules.version.digest == before.rules.version.digest
        assert daemon.services.reloader.status.reloads_ok == 1
    finally:
        await daemon.client.close()
        gc.unfreeze()
