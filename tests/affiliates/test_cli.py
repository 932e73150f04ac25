"""The command line and store postbacks (issue 15): `rules list` shows them beside the file
postbacks with where each lives, `rules history ID` prints the audit trail, `rules export
--affiliate ID` writes rule-file YAML that loads; `rules add --author-affiliate N` creates
postbacks for affiliate N only."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.loader import load_rules
from daemon.store.affiliate_types import PostbackChange, Who
from daemon.store.sqlite import SQLiteStore
from tests.affiliates.kit import rules
from tests.cli_support import run_cli
from tests.harness import Sink, write_rules
from tests.process_support import write_config

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
WHO = Who("alice", "alice", "42")


@pytest.fixture
async def setup(tmp_path: Path, sink: Sink) -> tuple[Path, int, int]:
    config = write_config(tmp_path, port=8080)
    write_rules(tmp_path / "rules.d", rules(sink))
    store = SQLiteStore(tmp_path / "var" / "postbackd.db")
    await store.open()
    try:
        await store.set_affiliate_secret("42", "tk", "v4lue-never-shown", NOW)
        body = {
            "trigger": "conversion_done",
            "goal": "lead",
            "author": WHO.as_dict(),
            "action": {
                "type": "ping_url",
                "url": "https://t.example/pb?k=${affiliate_secret:tk}&tx={conversion_id}",
            },
        }
        one = await store.create_affiliate_postback(
            "42", PostbackChange("7", "active", body), WHO, NOW, None
        )
        other = await store.create_affiliate_postback(
            "77", PostbackChange("8", "active", {**body, "goal": None}), WHO, NOW, None
        )
        changed = await store.update_affiliate_postback(
            one.id, one.change_seq, PostbackChange("7", "disabled", body), WHO, "status", NOW
        )
        assert changed is not None
    finally:
        await store.close()
    return config, one.id, other.id


def test_rules_list_shows_store_postbacks_beside_file_ones(
    capsys: pytest.CaptureFixture[str], setup: tuple[Path, int, int]
) -> None:
    config, one, other = setup
    result = run_cli(capsys, ["rules", "list", "-c", str(config), "--format", "json"])
    assert result.code == 0, result.err
    rows = json.loads(result.out)
    where = {r["id"]: (r.get("source", "file"), r["file"]) for r in rows}
    assert where == {
        101: ("file", "offer-7.yaml"),
        102: ("file", "offer-7.yaml"),
        103: ("file", "offer-8.yaml"),
        one: ("store", None),
        other: ("store", None),
    }
    result = run_cli(capsys, ["rules", "list", "-c", str(config), "--as", "affiliate:42"])
    assert result.code == 0, result.err
    assert "Offer 7: affiliate postbacks in the store (not in git)" in result.out
    assert str(one) in result.out
    assert str(other) not in result.out


def test_rules_history_prints_the_audit_trail(
    capsys: pytest.CaptureFixture[str], setup: tuple[Path, int, int]
) -> None:
    config, one, _ = setup
    result = run_cli(capsys, ["rules", "history", str(one), "-c", str(config)])
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].endswith("create  by alice (affiliate 42)")
    assert 'status: "active" -> "disabled"' in result.out
    assert "v4lue-never-shown" not in result.out
    result = run_cli(capsys, ["rules", "history", "101", "-c", str(config)])
    assert result.code == 1
    assert "file postback: its history is in git" in result.err


def test_rules_export_writes_rule_file_yaml_that_loads(
    capsys: pytest.CaptureFixture[str], setup: tuple[Path, int, int], tmp_path: Path
) -> None:
    config, _, _ = setup
    args = ["rules", "export", "--affiliate", "42", "-c", str(config), "--first-id", "500"]
    result = run_cli(capsys, args)
    assert result.code == 0, result.err
    assert "${secret:affiliate_42_tk}" in result.out
    target = tmp_path / "moved"
    write_rules(target, {"exported.yaml": result.out})
    loaded = load_rules(target)
    [lp] = loaded.postbacks.values()
    assert (lp.id, lp.offer, lp.postback.goal, lp.postback.status) == (500, "7", "lead", "disabled")
    assert lp.postback.author is not None
    assert lp.postback.author.affiliate == "42"
    result = run_cli(capsys, ["rules", "export", "--affiliate", "99", "-c", str(config)])
    assert result.code == 1
    assert "affiliate 99 has no postbacks in the store" in result.err


def test_rules_add_for_an_affiliate_author_creates_only_for_that_affiliate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = tmp_path / "rules.d"
    write_rules(root, {"o7.yaml": "offer: 7\npostbacks: []\n"})
    base = ["rules", "add", "--rules", str(root), "--offer", "7", "--trigger", "conversion_done"]
    base += ["--url", "https://x.test/", "--author", "1:Ann", "--author-affiliate", "42"]
    for other in ("77", "*"):
        result = run_cli(capsys, [*base, "--affiliate", other])
        assert result.code != 0
        assert "authored for affiliate 42 may only match affiliate 42" in result.out + result.err
    assert (root / "o7.yaml").read_text() == "offer: 7\npostbacks: []\n"


def test_validate_checks_the_policy_file_and_the_id_space(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = tmp_path / "rules.d"
    write_rules(
        root,
        {
            "affiliates.yaml": "actions: [ping_url, no_such]\nmax_postbacks: -1\n",
            "o7.yaml": """
                offer: 7
                postbacks:
                  - id: 1000000001
                    trigger: conversion_done
                    affiliate: "*"
                    action: {type: ping_url, url: "https://x.test/"}
                """,
        },
    )
    result = run_cli(capsys, ["validate", str(root)])
    assert result.code == 1
    lines = result.out.splitlines() + result.err.splitlines()
    assert any(
        line.startswith("affiliates.yaml:1: actions: unknown action type 'no_such'")
        for line in lines
    )
    assert "affiliates.yaml:2: max_postbacks: Input should be greater than or equal to 0" in lines
    assert (
        "o7.yaml:4: postback 1000000001: ids from 1,000,000,000 up belong to affiliate "
        "postbacks kept in the store"
    ) in lines
