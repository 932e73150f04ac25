"""`--as affiliate:N` on the `rules` editing commands (issue 15), tried as the attack: a user of
affiliate 42 creates postbacks for affiliate 42 only (its author's affiliate and the affiliate
it matches), and adds, duplicates, edits, enables, disables or deletes only the postbacks it may
see (authored for affiliate 42, as daemon/visibility.py says); any other id reads as one that
does not exist. Every refusal is one error line and writes nothing. Through the real `postbackd`
command on a temporary git repository of rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.listing import masked_settings
from daemon.loader import load_rules
from daemon.visibility import Viewer, visible_to
from tests.test_cli_ops_kit import INSURANCE, SOLAR, Result, make_repo, run

ADD = [
    "rules", "add", "--offer", "1234", "--trigger", "conversion_done", "--author", "5:Ann",
    "--url", "https://t.example/pb?c={click_id}",
]  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offer 1234: 101 of an admin (every affiliate), 102 and 103 authored for affiliate 42.
    Offer 501: 201 of an admin."""
    monkeypatch.delenv("POSTBACKD_CONFIG", raising=False)
    return make_repo(tmp_path / "repo", {"offer-1234.yaml": SOLAR, "offer-501.yaml": INSURANCE})


def texts(repo: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(repo.iterdir()) if p.is_file()}


def refused(r: Result, line: str) -> None:
    """Exit 1 with exactly this one error line."""
    assert (r.code, r.err.splitlines()) == (1, [f"postbackd: error: {line}"]), r


def as_42(*args: str) -> list[str]:
    return [*args, "--as", "affiliate:42"]


def test_add_as_an_affiliate_refuses_another_affiliate_or_every_one(repo: Path) -> None:
    before = texts(repo)
    rules = ["--rules", str(repo)]
    for args, shown in (
        (["--affiliate", "77"], "'77'"),
        (["--affiliate", "*"], "'*' (every affiliate)"),
        (["--affiliate", "42", "--set", "affiliate=77"], "'77'"),
        (["--affiliate", "42", "--set", 'affiliate=["42", "77"]'], "none"),
    ):
        r = run(*as_42(*ADD, *rules, *args))
        refused(
            r,
            f"--as affiliate:42 creates and changes postbacks of affiliate 42 only, not {shown}",
        )
    r = run(*as_42(*ADD, *rules, "--author-affiliate", "77"))
    refused(
        r,
        "--author-affiliate 77 but --as affiliate:42: an affiliate's user writes as a user of "
        "its own affiliate only",
    )
    snippet = "trigger: conversion_done\naffiliate: 77\naction: {type: ping_url, url: 'https://t.example/'}\n"
    r = run(
        *as_42("rules", "add", "--offer", "1234", "--author", "5:Ann", *rules, "--from", "-"),
        input=snippet,
    )
    refused(r, "--as affiliate:42 creates and changes postbacks of affiliate 42 only, not '77'")
    assert texts(repo) == before


def test_add_as_an_affiliate_writes_its_own_postback(repo: Path) -> None:
    r = run(*as_42(*ADD, "--rules", str(repo)))
    assert r.code == 0, r.err
    lp = load_rules(repo, git=False).postbacks[202]
    assert (lp.offer, lp.postback.affiliate) == ("1234", "42")
    assert lp.postback.author is not None
    assert (lp.postback.author.name, lp.postback.author.affiliate) == ("Ann", "42")
    assert visible_to(lp.postback, Viewer.of_affiliate(42))
    assert not visible_to(lp.postback, Viewer.of_affiliate(77))
    # --author-affiliate and --affiliate may say the same affiliate again.
    r = run(*as_42(*ADD, "--rules", str(repo), "--affiliate", "42", "--author-affiliate", "42"))
    assert r.code == 0, r.err
    assert load_rules(repo, git=False).postbacks[203].postback.affiliate == "42"


def test_edit_as_an_affiliate_touches_only_its_own_postbacks(repo: Path) -> None:
    before = texts(repo)
    rules = ["--rules", str(repo)]
    r = run(*as_42("rules", "edit", "101", "--set", "status=disabled", *rules))
    refused(r, f"no postback with id 101 in {repo}")  # an admin's: as if it did not exist
    # (the id alone replaced: the temporary path may hold "101" too, as pytest-101)
    assert run("rules", "edit", "999", "--set", "status=disabled", *rules).err == r.err.replace(
        "id 101 ", "id 999 "
    )
    r = run(*as_42("rules", "edit", "102", "--set", "affiliate=77", *rules))
    refused(r, "--as affiliate:42 creates and changes postbacks of affiliate 42 only, not '77'")
    r = run(*as_42("rules", "edit", "102", "--set", 'affiliate="*"', *rules))
    refused(
        r,
        "--as affiliate:42 creates and changes postbacks of affiliate 42 only, "
        "not '*' (every affiliate)",
    )
    r = run("rules", "edit", "102", "--set", "status=disabled", *rules, "--as", "affiliate:77")
    refused(r, f"no postback with id 102 in {repo}")
    assert texts(repo) == before
    r = run(*as_42("rules", "edit", "102", "--set", "action.url=https://p.example/x", *rules))
    assert r.code == 0, r.err
    lp = load_rules(repo, git=False).postbacks[102]
    assert masked_settings(lp.postback.action)["url"] == "https://p.example/x"


def test_enable_disable_delete_as_an_affiliate_see_only_its_own(repo: Path) -> None:
    before = texts(repo)
    rules = ["--rules", str(repo)]
    for command in (["disable", "101"], ["enable", "201"], ["delete", "101", "--confirm", "101"]):
        r = run(*as_42("rules", *command, *rules))
        refused(r, f"no postback with id {command[1]} in {repo}")
    r = run("rules", "disable", "102", *rules, "--as", "affiliate:77")
    refused(r, f"no postback with id 102 in {repo}")
    # A selector passes over what the affiliate may not see.
    r = run("rules", "disable", "--offer", "501", *rules, "--as", "affiliate:42")
    assert (r.code, r.out) == (0, "no postback matches; nothing to do\n"), r
    r = run("rules", "delete", "--offer", "501", *rules, "--as", "affiliate:42", "--confirm", "1")
    refused(r, "no postback matches; nothing deleted")
    assert texts(repo) == before
    r = run(*as_42("rules", "disable", "--offer", "1234", *rules))
    assert r.code == 0, r.err
    assert "disabled 2 postbacks (102, 103) in offer-1234.yaml" in r.out
    status = {pid: lp.postback.status for pid, lp in load_rules(repo, git=False).postbacks.items()}
    assert status == {101: "active", 102: "disabled", 103: "disabled", 201: "active"}
    r = run(*as_42("rules", "delete", "--affiliate", "42", *rules, "--confirm", "3"))
    refused(r, "confirmation does not match 2; nothing deleted")  # 2 of affiliate 42's, not 3
    r = run(*as_42("rules", "delete", "103", *rules, "--confirm", "103"))
    assert r.code == 0, r.err
    assert sorted(load_rules(repo, git=False).postbacks) == [101, 102, 201]


def test_show_as_an_affiliate_shows_only_its_own(repo: Path) -> None:
    rules = ["--rules", str(repo)]
    refused(run(*as_42("rules", "show", "101", *rules)), f"no postback with id 101 in {repo}")
    r = run("rules", "show", "102", *rules, "--as", "affiliate:77")
    refused(r, f"no postback with id 102 in {repo}")
    r = run(*as_42("rules", "show", "102", *rules))
    assert r.code == 0, r.err
    assert r.out.startswith("postback 102: offer 1234 (offer-1234.yaml:")


def test_duplicate_as_an_affiliate_copies_only_its_own_as_its_user(repo: Path) -> None:
    before = texts(repo)
    dup = ["rules", "duplicate", "--from-offer", "1234", "--to-offer", "501", "--rules", str(repo)]
    r = run(*as_42(*dup, "102", "101", "--author", "5:Ann"))
    refused(r, f"no postback with id 101 in {repo}")
    r = run(*as_42(*dup, "102", "--author", "5:Ann", "--author-affiliate", "77"))
    assert r.code == 1
    assert "--author-affiliate 77 but --as affiliate:42" in r.err
    assert texts(repo) == before
    r = run(*as_42(*dup, "102", "103", "--author", "5:Ann"))
    assert r.code == 0, r.err
    copies = load_rules(repo, git=False).offers["501"]
    made = {lp.id: lp.postback for lp in copies if lp.id != 201}
    assert sorted(made) == [202, 203]
    for postback in made.values():
        assert postback.affiliate == "42"
        assert postback.author is not None
        assert (postback.author.name, postback.author.affiliate) == ("Ann", "42")


def test_as_takes_admin_or_affiliate_id_only(repo: Path) -> None:
    before = texts(repo)
    hostile = ("root", "affiliate:", "affiliate", "", "ADMIN", "affiliate:4\x1b[2J2")
    hostile += ("affiliate:\x00", "affiliate:" + "9" * 10_000, "affiliate:42\nadmin")
    for bad in hostile:
        for command in (["disable", "102"], ["add", "--offer", "1234", "--url", "https://t/"]):
            r = run("rules", *command, "--rules", str(repo), "--as", bad)
            assert r.code == 2, (bad, r)
            [line] = r.err.splitlines()
            assert "--as" in line
            assert len(line) < 200
            assert not any(ord(c) < 32 or ord(c) == 127 for c in line), line
    # "*" is every affiliate: an affiliate's user is one affiliate's.
    r = run(*ADD, "--rules", str(repo), "--affiliate", "*", "--as", "affiliate:*")
    assert r.code == 2
    assert "affiliate:* is every affiliate, not one: name the affiliate" in r.err
    assert texts(repo) == before
    r = run("rules", "disable", "101", "--rules", str(repo), "--as", "admin")
    assert r.code == 0, r.err
