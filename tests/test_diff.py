"""`postbackd diff`: the deliveries a rules change adds, removes or changes for a sample of
conversions, against a real git base commit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli_ops_kit import INSURANCE, SOLAR, commit, make_repo, run

SAMPLE = [
    {"conversion_id": "c1", "offer": 1234, "affiliate": 9, "status": "approved", "click_id": "k1"},
    {
        "conversion_id": "c2",
        "offer": 501,
        "affiliate": 42,
        "status": "approved",
        "payout": 10,
        "sub1": "facebook",
        "click_id": "k2",
    },
    {"conversion_id": "c3", "offer": 1234, "affiliate": 9, "status": "pending"},
    {"conversion_id": "c4", "offer": 1234, "affiliate": 42, "status": "rejected",
     "previous_status": "approved", "source": "everflow"},
]  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    make_repo(tmp_path, {"offer-1234.yaml": SOLAR, "offer-501.yaml": INSURANCE})
    (tmp_path / "sample.jsonl").write_text("".join(json.dumps(c) + "\n" for c in SAMPLE))
    return tmp_path


def ok(*args: str, input: str | None = None) -> str:
    result = run(*args, input=input)
    assert result.code == 0, result.err
    return result.out


def change_three_things(rules: Path) -> None:
    """Edit a URL, add a postback, disable one: through the commands ops would use."""
    r = str(rules)
    ok(
        "rules",
        "edit",
        "101",
        "--rules",
        r,
        "--set",
        "action.url=https://t2.example.com/pb?c={click_id}",
    )
    ok(
        "rules", "add", "--rules", r, "--offer", "501", "--trigger", "conversion_done",
        "--affiliate", "42", "--url", "https://p42.example.com/pb?c={click_id}",
        "--author", "12:Sam Lee",
    )  # fmt: skip
    ok("rules", "disable", "201", "--rules", r)


def test_diff_reports_exactly_the_three_effects(repo: Path) -> None:
    rules = repo / "rules.d"
    change_three_things(rules)
    out = ok(
        "diff", "--base", "HEAD", "--conversions", str(repo / "sample.jsonl"),
        "--rules", str(rules), "--format", "json",
    )  # fmt: skip
    report = json.loads(out)
    effects = [
        (e["kind"], e["postback"], e["conversion_id"], e["parts"]) for e in report["effects"]
    ]
    assert effects == [
        ("changed", 101, "c1", ["url"]),
        ("removed", 201, "c2", []),
        ("added", 202, "c2", []),
    ]
    assert report["summary"] == {"added": 1, "removed": 1, "changed": 1}
    changed = report["effects"][0]
    assert changed["before"]["request"]["url"] == (
        "https://tracker.example.com/pb?cid=k1&payout=&tx=c1"
    )
    assert changed["after"]["request"]["url"] == "https://t2.example.com/pb?c=k1"
    assert report["effects"][1]["why_not"] == "postback is disabled"
    assert report["effects"][2]["after"]["request"]["url"] == "https://p42.example.com/pb?c=k2"
    assert report["unexercised"] == []


def test_diff_text_is_a_compact_summary(repo: Path) -> None:
    rules = repo / "rules.d"
    change_three_things(rules)
    out = ok(
        "diff", "--base", "HEAD", "--conversions", str(repo / "sample.jsonl"), "--rules", str(rules)
    )
    assert out == (
        "3 delivery change(s) on 4 conversion(s) against HEAD: 1 added, 1 removed, 1 changed\n"
        "postback 101 changed for 1 conversion(s): c1\n"
        "    url: https://tracker.example.com/pb?cid=k1&payout=&tx=c1 -> "
        "https://t2.example.com/pb?c=k1\n"
        "postback 201 removed for 1 conversion(s): c2\n"
        "    - GET https://tracker.example.com/pb?cid=k2&src=facebook\n"
        "    now: postback is disabled\n"
        "postback 202 added for 1 conversion(s): c2\n"
        "    + GET https://p42.example.com/pb?c=k2\n"
    )


def test_changes_no_sample_reaches_are_listed(repo: Path) -> None:
    rules = repo / "rules.d"
    ok("rules", "edit", "103", "--rules", str(rules), "--set", "action.url=https://x.example.com/")
    commit(repo, "edit 103")
    ok("rules", "edit", "102", "--rules", str(rules), "--set", "goal=lead")
    sample = str(repo / "sample.jsonl")
    report = json.loads(ok("diff", "--base", "HEAD~1", "--conversions", sample, "--rules",
                           str(rules), "--format", "json"))  # fmt: skip
    # c4 (a rejection from affiliate 42) reaches 103; nothing in the sample reaches 102.
    assert [(e["kind"], e["postback"], e["parts"]) for e in report["effects"]] == [
        ("changed", 103, ["url"])
    ]
    assert report["unexercised"] == [{"postback": 102, "change": "changed"}]
    text = ok("diff", "--base", "HEAD", "--conversions", sample, "--rules", str(rules))
    assert text.splitlines() == [
        "0 delivery change(s) on 4 conversion(s) against HEAD: 0 added, 0 removed, 0 changed",
        "rule changes no sample conversion reached: 102 (changed)",
    ]


def test_no_change_reports_nothing(repo: Path) -> None:
    out = ok("diff", "--base", "HEAD", "--conversions", str(repo / "sample.jsonl"),
             "--rules", str(repo / "rules.d"))  # fmt: skip
    assert out.splitlines()[-1] == "no rule changes"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"conversion_id": "a"\n', "{path}:1: not JSON: Expecting ',' delimiter"),
        ("[1]\n", "{path}:1: expected a JSON object"),
        ('\n{"conversion_id": "a", "affiliate": 1, "status": "approved"}\n',
         "{path}:2: offer: required field missing"),
        ('{"conversion_id": "a", "offer": 1, "affiliate": 1, "status": "approved", '
         '"previous_status": "paid"}\n', "{path}:1: previous_status: unknown status 'paid'"),
        ("\n\n", "{path}: no conversions (one JSON object per line)"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_1(repo: Path, lines: str, message: str) -> None:
    path = repo / "bad.jsonl"
    path.write_text(lines)
    result = run(
        "diff", "--base", "HEAD", "--conversions", str(path), "--rules", str(repo / "rules.d")
    )
    assert result.code == 1
    assert result.err.startswith("postbackd: error: " + message.format(path=path))
    assert len(result.err.splitlines()) == 1


def test_an_unknown_base_is_one_line(repo: Path) -> None:
    result = run("diff", "--base", "no-such-ref", "--conversions", str(repo / "sample.jsonl"),
                 "--rules", str(repo / "rules.d"))  # fmt: skip
    assert result.code == 1
    assert result.err.startswith("postbackd: error: --base no-such-ref: git rev-parse")
    assert len(result.err.splitlines()) == 1
