"""Mistakes caught before merge (issue 18): `when` as text, unknown vars, the catalogue,
warnings counted and --strict, created_at/author on new postbacks, retired ids, and the
postback's id in errors the YAML parser raises. Through the real `postbackd` command on a
temporary git repository of rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli_ops_kit import INSURANCE, SOLAR, commit, make_repo, run, write_files

CATALOGUE = """\
offers:
  1234: {name: Solar Leads, goals_enabled: true, goals: [lead, sale]}
  501: {name: Home Insurance}
affiliates:
  42: Partner 42
  77: Leadgen 77
"""


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("POSTBACKD_CONFIG", raising=False)
    monkeypatch.setenv("POSTBACKD_SECRET_PARTNER_TOKEN", "t0ken-value")
    return make_repo(tmp_path / "repo", {"offer-1234.yaml": SOLAR, "offer-501.yaml": INSURANCE})


def test_when_as_text_is_an_error_with_its_line_and_a_hint(repo: Path) -> None:
    text = (repo / "offer-1234.yaml").read_text()
    (repo / "offer-1234.yaml").write_text(
        text.replace('when: {">=": [{"var": "payout"}, 5]}', "when: payout > 5")
    )
    r = run("validate", str(repo))
    assert r.code == 1
    assert r.out.splitlines()[0] == (
        "offer-1234.yaml:22: postback 102: when: must be a JsonLogic rule, not the text "
        '\'payout > 5\': write it as an object, e.g. {">": [{"var": "payout"}, 5]} '
        "(see docs/conditions.md)"
    )
    # The same mistake through `rules edit --set` writes nothing.
    (repo / "offer-1234.yaml").write_text(text)
    r = run("rules", "edit", "102", "--set", "when=payout > 5", "--rules", str(repo))
    assert r.code == 1
    assert "when: must be a JsonLogic rule, not the text 'payout > 5'" in r.err
    assert (repo / "offer-1234.yaml").read_text() == text


def test_unknown_var_is_a_warning_with_a_suggestion_and_strict_makes_it_an_error(
    repo: Path,
) -> None:
    text = (repo / "offer-1234.yaml").read_text()
    (repo / "offer-1234.yaml").write_text(text.replace('"var": "payout"', '"var": "payuot"'))
    r = run("validate", str(repo))
    assert r.code == 0, r.out + r.err
    lines = r.out.splitlines()
    assert (
        "warning: offer-1234.yaml:18: postback 102: when reads 'payuot', which no source "
        "provides (did you mean 'payout'?)" in lines
    )
    assert lines[-1] == "ok: 4 postbacks, 1 warning"
    strict = run("validate", "--strict", str(repo))
    assert strict.code == 1
    assert "error: offer-1234.yaml:18: postback 102: when reads 'payuot'" in strict.out
    assert strict.err == "invalid: 1 error\n"


def test_unset_secrets_are_counted_as_warnings(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POSTBACKD_SECRET_PARTNER_TOKEN")
    r = run("validate", str(repo))
    assert r.code == 0
    assert r.out.splitlines()[-2:] == [
        "warning: secret partner_token: not set here",
        "ok: 4 postbacks, 1 warning",
    ]
    assert run("validate", "--strict", str(repo)).code == 1


def test_catalogue_makes_unknown_goals_affiliates_and_offers_errors_with_suggestions(
    repo: Path,
) -> None:
    write_files(repo, {"catalogue.yaml": CATALOGUE})
    ok = run("validate", str(repo))
    assert ok.code == 0, ok.out
    assert "ok: catalogue of 2 offers and 2 affiliates" in ok.out
    text = (repo / "offer-1234.yaml").read_text()
    (repo / "offer-1234.yaml").write_text(
        text.replace("goal: sale", "goal: sael").replace('affiliate: "*"', "affiliate: 24")
    )
    (repo / "offer-501.yaml").write_text(INSURANCE.replace("offer: 501", "offer: 510"))
    r = run("validate", str(repo))
    assert r.code == 1
    assert [line for line in r.out.splitlines() if line.startswith("offer-")] == [
        "offer-1234.yaml:6: postback 101: unknown affiliate '24' (did you mean '42'?)",
        "offer-1234.yaml:18: postback 102: unknown goal 'sael' for offer 1234 (did you mean "
        "'sale'?) (its goals: lead, sale)",
        "offer-501.yaml:3: postback 201: unknown offer '510' (did you mean '501'?)",
    ]
    # `rules add` refuses the same mistake and writes nothing.
    (repo / "offer-1234.yaml").write_text(text)
    before = (repo / "offer-1234.yaml").read_text()
    add = run(
        "rules", "add", "--rules", str(repo), "--offer", "1234", "--trigger", "conversion_done",
        "--affiliate", "42", "--goal", "sael", "--url", "https://t.example/pb?c={click_id}",
        "--author", "7:Jane Doe",
    )  # fmt: skip
    assert add.code == 1
    assert "unknown goal 'sael' for offer 1234 (did you mean 'sale'?)" in add.err
    assert (repo / "offer-1234.yaml").read_text() == before


def test_catalogue_goals_enabled_must_agree_and_an_invalid_catalogue_is_reported(
    repo: Path,
) -> None:
    write_files(
        repo, {"catalogue.yaml": CATALOGUE.replace("goals_enabled: true", "goals_enabled: false")}
    )
    r = run("validate", str(repo))
    assert r.code == 1
    assert "offer 1234: goals are off in catalogue.yaml but goals_enabled is true here" in r.out
    write_files(repo, {"catalogue.yaml": "offers:\n  1: {nmae: x}\n"})
    r = run("validate", str(repo))
    assert r.code == 1
    assert "catalogue.yaml:2: unknown key 'offers.1.nmae'" in r.out.splitlines()


def test_new_postbacks_must_carry_created_at_and_author_against_a_base(repo: Path) -> None:
    text = (repo / "offer-501.yaml").read_text()
    (repo / "offer-501.yaml").write_text(
        text
        + "  - id: 202\n    trigger: conversion_done\n    affiliate: 42\n"
        + "    action: {type: ping_url, url: 'https://t.example/'}\n"
    )
    assert run("validate", str(repo)).code == 0
    r = run("validate", str(repo), "--base", "HEAD")
    assert r.code == 1
    assert r.out.splitlines()[0] == (
        "offer-501.yaml:16: postback 202: new since HEAD without created_at and author: a new "
        "postback must carry both (postbackd rules add fills them)"
    )


def test_a_deleted_id_is_retired_and_can_never_come_back(repo: Path) -> None:
    root = repo.parent
    r = run("rules", "delete", "103", "--confirm", "103", "--rules", str(repo))
    assert r.code == 0, r.err
    retired = (repo / "retired-ids.yaml").read_text()
    assert "  - 103  # deleted " in retired
    assert "by owner@example.com" in retired
    commit(root, "delete 103")
    # Someone puts 103 back, even with a base where it did not exist: refused.
    (repo / "offer-1234.yaml").write_text(SOLAR)
    for args in ([], ["--base", "HEAD"], ["--base", "HEAD~1"]):
        r = run("validate", str(repo), *args)
        assert r.code == 1, args
        assert (
            "postback 103: id 103 was retired (deleted; retired-ids.yaml:4): ids are never reused"
            in r.out
        )
    # Taking it off the record as well is refused against any base that had it.
    (repo / "retired-ids.yaml").write_text("retired: []\n")
    r = run("validate", str(repo), "--base", "HEAD")
    assert r.code == 1
    assert "retired-ids.yaml:1: id 103 was retired and is no longer listed: keep it" in r.out


def test_yaml_parser_errors_name_the_postback(repo: Path) -> None:
    text = (repo / "offer-1234.yaml").read_text()
    (repo / "offer-1234.yaml").write_text(
        text.replace("    goal: sale\n", "    goal: sale\n    goal: lead\n")
    )
    r = run("validate", str(repo))
    assert r.code == 1
    line = r.out.splitlines()[0]
    assert line.startswith("offer-1234.yaml:22: postback 102: "), line
    assert "duplicate" in line
    deep = "[" * 150 + "]" * 150
    (repo / "offer-1234.yaml").write_text(text.replace("    goal: sale\n", f"    goal: {deep}\n"))
    r = run("validate", str(repo))
    assert r.out.splitlines() == [
        "offer-1234.yaml:21: postback 102: nesting deeper than 100 levels"
    ]


def test_hostile_catalogue_and_retired_files_are_errors_not_tracebacks(repo: Path) -> None:
    for name, text in (
        ("catalogue.yaml", "- a list\n"),
        ("catalogue.yaml", 'offers: {1: {goals: ["\\x01"]}}\n'),
        ("retired-ids.yaml", "retired: [0, true, abc]\n"),
        ("retired-ids.yaml", "retired: 5\nother: 1\n"),
        ("retired-ids.yaml", "retired: [" + ",".join(["[" * 200 + "]" * 200]) + "]\n"),
    ):
        write_files(repo, {name: text})
        r = run("validate", str(repo))
        assert r.code == 1, (name, text, r.out)
        assert "Traceback" not in r.out + r.err
        assert r.err.startswith("invalid: ")
        (repo / name).unlink()
    (repo / "catalogue.yaml").write_bytes(b"x" * (1024 * 1024 + 10))
    r = run("validate", str(repo))
    assert r.code == 1
    assert "catalogue.yaml:1: file is larger than 1024 KiB" in r.out


def test_delete_appends_to_an_empty_flow_list_of_retired_ids(repo: Path) -> None:
    write_files(repo, {"retired-ids.yaml": "# kept by hand\nretired: []\n"})
    r = run("rules", "delete", "103", "--confirm", "103", "--rules", str(repo))
    assert r.code == 0, r.err
    text = (repo / "retired-ids.yaml").read_text()
    assert text.startswith("# kept by hand\nretired:\n  - 103  # deleted ")
    assert run("validate", str(repo)).code == 0


@pytest.mark.parametrize(
    "value",
    ["[" * 5000 + "]" * 5000, "[" * 70 + "]" * 70, '{"a": NaN}', "[" * 100_000],
)
def test_deep_or_odd_json_from_the_command_line_is_one_error_line(
    repo: Path, tmp_path: Path, value: str
) -> None:
    before = (repo / "offer-1234.yaml").read_text()
    for args in (
        ["rules", "edit", "102", "--set", f"retry={value}"],
        ["rules", "add", "--offer", "1234", "--trigger", "conversion_done", "--affiliate", "42",
         "--when", value, "--url", "https://t.example/", "--author", "7:Jane Doe"],
    ):  # fmt: skip
        r = run(*args, "--rules", str(repo))
        assert r.code in (1, 2), (args[:2], r.out)
        assert "Traceback" not in r.out + r.err
        assert r.err.strip().splitlines()[-1].startswith("postbackd"), r.err  # one error line
    assert (repo / "offer-1234.yaml").read_text() == before
    sample = tmp_path / "conv.json"
    sample.write_text(value)
    r = run("explain", str(sample), "--rules", str(repo))
    assert r.code == 1
    assert r.err.startswith(f"postbackd: error: {sample}: cannot read JSON: ")


def test_unknown_var_hints_extra_and_the_sources_mapping(repo: Path, tmp_path: Path) -> None:
    text = (repo / "offer-1234.yaml").read_text()
    (repo / "offer-1234.yaml").write_text(
        text.replace('when: {">=": [{"var": "payout"}, 5]}',
                     'when: {"and": [{"==": [{"var": "reason"}, "x"]}, {"var": "aff_sub"}]}')
    )  # fmt: skip
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "tracker.yaml").write_text("fields: {sub1: aff_sub}\n")
    r = run("validate", str(repo), "--webhooks", str(hooks))
    assert r.code == 0, r.out + r.err
    assert (
        "warning: offer-1234.yaml:18: postback 102: when reads 'aff_sub', which no source "
        "provides (a source maps parameter 'aff_sub' to 'sub1': read that)"
    ) in r.out.splitlines()
    assert (
        "warning: offer-1234.yaml:18: postback 102: when reads 'reason', which no source "
        "provides (a parameter a source passes through unmapped is read as 'extra.reason')"
    ) in r.out.splitlines()
