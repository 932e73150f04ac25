"""Issue 13 item 9, as the attack: `rules add --from` fed a YAML alias bomb (a billion laughs).
The snippet is read with the loader's limits first, so it is refused at once, not expanded."""

from __future__ import annotations

from pathlib import Path

from tests.test_cli_ops_kit import run

BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
    )
    + "trigger: conversion_done\n"
)


def test_an_alias_bomb_in_from_is_refused_before_it_expands(tmp_path: Path) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    result = run(
        "rules", "add", "--rules", str(rules), "--offer", "1", "--affiliate", "7",
        "--author", "1:Ann", "--from", "-", input=BOMB,
    )  # fmt: skip
    assert result.code == 1
    assert "--from: line" in result.err
    assert "more than 100000 nodes (alias bomb?)" in result.err
    assert list(rules.iterdir()) == []


def test_a_tag_in_from_is_refused(tmp_path: Path) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    result = run(
        "rules", "add", "--rules", str(rules), "--offer", "1", "--affiliate", "7",
        "--author", "1:Ann", "--from", "-", input="trigger: !!python/object:os.system x\n",
    )  # fmt: skip
    assert result.code == 1
    assert "is not allowed" in result.err
