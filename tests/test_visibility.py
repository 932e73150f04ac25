"""Who sees which postback: admins all; an affiliate's users only their affiliate's, never an
admin's or another affiliate's (the rule of daemon.visibility, and `rules list --as`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.loader import load_rules
from daemon.visibility import Viewer, visible_to
from tests.test_cli_ops_kit import run

POSTBACK = """\
  - id: {pid}
    trigger: conversion_done
    affiliate: "{affiliate}"
    status: active
{author}    action:
      type: ping_url
      url: https://t.example.com/{pid}
"""


def rules_text(authors: list[str | None]) -> str:
    """A rule file whose postback i+1 has authors[i]: None (no author), "admin", or the
    affiliate id (as written in YAML) of an affiliate user."""
    body = []
    for pid, who in enumerate(authors, 1):
        if who is None:
            author = ""
        elif who == "admin":
            author = f"    author: {{id: {pid}, name: Admin {pid}}}\n"
        else:
            author = f"    author: {{id: {pid}, name: User {pid}, affiliate: {who}}}\n"
        # An affiliate's postback may only match that affiliate's conversions (issue 13).
        affiliate = "*" if who in (None, "admin") else str(who).strip("'\"")
        body.append(POSTBACK.format(pid=pid, author=author, affiliate=affiliate))
    return "offer: 1\npostbacks:\n" + "".join(body)


def test_viewer_parse() -> None:
    assert Viewer.parse("admin") == Viewer("admin")
    assert Viewer.parse("affiliate:42") == Viewer("affiliate", "42")
    for bad in ("", "affiliate", "affiliate:", "Admin", "user:42", "affiliate: "):
        with pytest.raises(ValueError, match="is not admin or affiliate:ID"):
            Viewer.parse(bad)


def test_visible_to(tmp_path: Path) -> None:
    (tmp_path / "offer-1.yaml").write_text(rules_text([None, "admin", "42", "77", "042"]))
    postbacks = load_rules(tmp_path, git=False).postbacks
    seen = {
        who: [pid for pid, lp in postbacks.items() if visible_to(lp.postback, Viewer.parse(who))]
        for who in ("admin", "affiliate:42", "affiliate:77", "affiliate:5")
    }
    assert seen == {
        "admin": [1, 2, 3, 4, 5],
        "affiliate:42": [3],  # not 042: ids compare as the strings they are written as
        "affiliate:77": [4],
        "affiliate:5": [],
    }


AFFILIATES = ["42", "77", "042", '"42"', "abc"]


@settings(max_examples=30, deadline=None)
@given(
    authors=st.lists(st.sampled_from([None, "admin", *AFFILIATES]), min_size=1, max_size=8),
    viewer=st.sampled_from(["42", "77", "042", "abc", "9"]),
)
def test_rules_list_as_an_affiliate_shows_only_its_own(
    authors: list[str | None], viewer: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "offer-1.yaml").write_text(rules_text(authors))
        result = run(
            "rules", "list", "--rules", tmp, "--as", f"affiliate:{viewer}", "--format", "json"
        )
    assert result.code == 0, result.err
    rows = json.loads(result.out)
    for row in rows:
        assert row["author"] is not None, "a postback without author is for admins only"
        assert row["author"]["affiliate"] == viewer
    expected = [pid for pid, who in enumerate(authors, 1) if who and who.strip('"') == viewer]
    assert [row["id"] for row in rows] == expected


def test_rules_list_as_admin_shows_everything(tmp_path: Path) -> None:
    (tmp_path / "offer-1.yaml").write_text(rules_text([None, "admin", "42"]))
    result = run("rules", "list", "--rules", str(tmp_path), "--format", "json")
    assert [row["id"] for row in json.loads(result.out)] == [1, 2, 3]
