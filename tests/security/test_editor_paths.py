"""Issue 13 item 5, as the attack: `rules add --file` aimed out of the rules directory through a
symlinked folder, or at a file the daemon never loads (hidden, tests/, backups, not YAML), and a
tree holding odd entries (an editor's dangling lock link, a FIFO). The editor writes exactly
where the loader reads, and an odd entry is an error line, never a traceback or a hang."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_cli_ops_kit import run

RULE = """\
offer: 1
postbacks:
  - id: 1
    trigger: conversion_done
    affiliate: 7
    created_at: 2026-11-01T10:00:00Z
    author: {id: 1, name: Ann}
    action: {type: ping_url, url: "https://t.example.com/pb?tx={conversion_id}"}
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "offer-1.yaml").write_text(RULE)
    return rules


def add(rules: Path, *extra: str) -> tuple[int, str]:
    result = run(
        "rules", "add", "--rules", str(rules), "--offer", "2", "--trigger", "conversion_done",
        "--affiliate", "7", "--author", "1:Ann", "--url", "https://t.example.com/x", *extra,
    )  # fmt: skip
    return result.code, result.err


def test_a_file_through_a_symlink_out_of_the_tree_is_refused(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tree / "linkdir").symlink_to(outside, target_is_directory=True)
    code, err = add(tree, "--file", "linkdir/x.yaml")
    assert code == 1
    assert "leads out of the rules directory" in err
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    "name", [".hidden.yaml", "tests/x.yaml", "x.txt", "x.yaml~", "x.yaml.bak", ".git/x.yaml",
             "sub/.dir/x.yaml", "../x.yaml", "/tmp/x.yaml"],
)  # fmt: skip
def test_a_file_the_loader_never_loads_is_refused(tree: Path, name: str) -> None:
    before = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*"))
    code, err = add(tree, "--file", name)
    assert code == 1, err
    assert "would not load this file" in err or "a .yaml path inside the rules directory" in err
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*")) == before


def test_an_editor_lock_link_does_not_break_editing(tree: Path) -> None:
    os.symlink("user@host.1234:1700000000", tree / ".#offer-1.yaml")  # what emacs leaves
    code, err = add(tree)
    assert code == 0, err
    assert run("rules", "disable", "1", "--rules", str(tree)).code == 0
    assert "status: disabled" in (tree / "offer-1.yaml").read_text()


def test_a_dangling_rule_link_is_an_error_line_not_a_traceback(tree: Path) -> None:
    os.symlink("gone.yaml", tree / "dangling.yaml")
    code, err = add(tree)
    assert code == 1
    assert "dangling.yaml:0: cannot read: No such file or directory" in err
    assert "Traceback" not in err


def test_a_fifo_in_the_tree_is_an_error_line_not_a_hang(tree: Path) -> None:
    os.mkfifo(tree / "trap.yaml")
    code, err = add(tree)  # a blocked open would hang here (the suite's timeout ends it)
    assert code == 1
    assert "trap.yaml:0: not a regular file (a FIFO)" in err


def test_a_relative_rules_directory_with_odd_entries_edits_fine(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.symlink("user@host.1234:1700000000", tree / ".#offer-1.yaml")
    os.mkfifo(tree / ".hidden-fifo")
    monkeypatch.chdir(tree.parent)
    for args in (
        ("rules", "edit", "1", "--rules", "rules.d", "--set", "status=disabled"),
        ("rules", "enable", "1", "--rules", "rules.d"),
        ("rules", "goals", "enable", "--offer", "1", "--rules", "rules.d"),
        ("rules", "delete", "1", "--rules", "rules.d", "--confirm", "1"),
    ):
        result = run(*args)
        assert result.code == 0, (args, result.err)
    assert "id: 1" not in (tree / "offer-1.yaml").read_text()
