"""Goals on and off across an offer's files, bulk enable/disable/delete with selectors, and
commands run outside the rules repository (issue 18), through the real `postbackd` command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.loader import load_rules
from tests.test_cli_ops_kit import (
    INSURANCE,
    SOLAR,
    make_repo,
    on_a_terminal,
    run,
    write_files,
)

SOLAR_MORE = """\
offer: 1234
goals_enabled: true   # lead and sale report apart
postbacks:
  - id: 301
    trigger: conversion_pending
    affiliate: 42
    goal: lead
    created_at: 2026-11-05T10:00:00Z
    author: {id: 7, name: Jane Doe}
    action: {type: ping_url, url: "https://t.example/lead?c={click_id}"}
"""


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("POSTBACKD_CONFIG", raising=False)
    return make_repo(
        tmp_path / "repo",
        {"offer-1234.yaml": SOLAR, "more/offer-1234-b.yaml": SOLAR_MORE, "o501.yaml": INSURANCE},
    )


def _goals(repo: Path) -> dict[int, tuple[str | None, bool]]:
    rules = load_rules(repo, git=False)
    return {pid: (lp.postback.goal, lp.goals_enabled) for pid, lp in rules.postbacks.items()}


def test_goals_off_and_on_across_every_file_of_the_offer(repo: Path) -> None:
    write_files(
        repo,
        {"catalogue.yaml": "offers:\n  1234: {goals_enabled: true, goals: [lead, sale]}\n"
         "  501: {}\naffiliates: {42: P42, 77: P77}\n"},
    )  # fmt: skip
    before = _goals(repo)
    r = run("rules", "goals", "disable", "--offer", "1234", "--rules", str(repo))
    assert r.code == 0, r.err
    assert r.out.splitlines()[-1] == (
        "goals of offer 1234 off in 2 file(s); every postback keeps its goal, not evaluated "
        "until goals are on"
    )
    after = _goals(repo)
    assert after[102] == ("sale", False)
    assert after[301] == ("lead", False)
    assert after[201] == before[201]  # another offer: untouched
    assert (
        "goals_enabled: false  # lead and sale report apart"
        in (repo / "more/offer-1234-b.yaml").read_text()
    )
    assert "goals_enabled: false" in (repo / "catalogue.yaml").read_text()
    assert run("validate", str(repo)).code == 0
    again = run("rules", "goals", "disable", "--offer", "1234", "--rules", str(repo))
    assert again.out == "goals of offer 1234 are already off; nothing to do\n"
    on = run("rules", "goals", "enable", "--offer", "1234", "--rules", str(repo))
    assert on.code == 0, on.err
    assert _goals(repo) == before
    missing = run("rules", "goals", "enable", "--offer", "999", "--rules", str(repo))
    assert missing.code == 1
    assert "unknown offer 999" in missing.err


def test_bulk_disable_and_enable_by_ids_and_selectors(repo: Path) -> None:
    r = run("rules", "disable", "101", "201", "--rules", str(repo))
    assert r.code == 0, r.err
    assert r.out.splitlines()[-1] == "disabled 2 postbacks (101, 201) in o501.yaml, offer-1234.yaml"
    r = run("rules", "disable", "--offer", "1234", "--affiliate", "42", "--rules", str(repo))
    assert r.code == 0, r.err
    rules = load_rules(repo, git=False)
    off = sorted(pid for pid, lp in rules.postbacks.items() if not lp.postback.active)
    assert off == [101, 102, 103, 201, 301]
    r = run("rules", "enable", "--offer", "1234", "--rules", str(repo), "--dry-run")
    assert r.out.splitlines()[-1] == "dry run: nothing written"
    r = run("rules", "enable", "--offer", "1234", "--rules", str(repo))
    rules = load_rules(repo, git=False)
    assert sorted(pid for pid, lp in rules.postbacks.items() if not lp.postback.active) == [201]
    assert run("rules", "enable", "--rules", str(repo)).code == 2
    unknown = run("rules", "enable", "999", "--rules", str(repo))
    assert unknown.code == 1
    assert "no postback with id 999" in unknown.err


@pytest.mark.slow  # a real terminal (pty) for one part
def test_delete_with_a_selector_asks_for_the_count(repo: Path) -> None:
    r = run("rules", "delete", "--affiliate", "42", "--rules", str(repo))
    assert r.code == 1
    assert "pass --confirm 3 to delete 3 postbacks (102, 103, 301)" in r.err
    wrong = run("rules", "delete", "--affiliate", "42", "--confirm", "4", "--rules", str(repo))
    assert wrong.code == 1
    assert "confirmation does not match 3; nothing deleted" in wrong.err
    typed = on_a_terminal(
        ["rules", "delete", "--offer", "1234", "--affiliate", "42", "--rules", str(repo)], "3"
    )
    assert typed.returncode == 0, typed.stderr
    assert "Type 3 (the count)" in typed.stdout
    rules = load_rules(repo, git=False)
    assert sorted(rules.postbacks) == [101, 201]
    retired = (repo / "retired-ids.yaml").read_text()
    assert [line.split("#")[0].strip() for line in retired.splitlines() if "# deleted" in line] == [
        "- 102", "- 103", "- 301",
    ]  # fmt: skip
    assert run("validate", str(repo)).code == 0


def test_outside_the_repository_says_what_it_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POSTBACKD_CONFIG", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for args in (["validate"], ["rules", "list"], ["rules", "disable", "1"], ["test"]):
        r = run(*args)
        assert r.code == 1, args
        assert r.err == (
            f"postbackd: error: no rules directory here: looked for ./rules.d in {os.getcwd()} "
            "(no --rules, no -c, no $POSTBACKD_CONFIG); run this at the top of the rules "
            "repository, or point at it with --rules DIR or -c SETTINGS.yaml (its rules_dir)\n"
        ), args
    settings = tmp_path / "postbackd.yaml"
    settings.write_text("rules_dir: ./nowhere\n")
    r = run("rules", "list", "-c", str(settings))
    assert r.code == 1
    assert f"nowhere: no such rules directory (rules_dir of the settings {settings})" in r.err
