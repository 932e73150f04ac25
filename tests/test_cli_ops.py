"""`postbackd rules add|edit|enable|disable|delete|duplicate` on a real git repository: the
resulting YAML byte for byte (comments kept), and nothing written when a change is refused."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.test_cli_ops_kit import (
    INSURANCE,
    SOLAR,
    commit,
    created_stamps,
    make_repo,
    on_a_terminal,
    run,
    write_files,
)


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    return make_repo(tmp_path, {"offer-1234.yaml": SOLAR, "partners/offer-501.yaml": INSURANCE})


def solar(rules: Path) -> str:
    return (rules / "offer-1234.yaml").read_text()


def test_add_appends_to_the_offer_file_with_the_next_id(rules: Path) -> None:
    since = datetime.now(UTC)
    result = run(
        "rules", "add", "--rules", str(rules), "--offer", "1234",
        "--trigger", "conversion_pending", "--affiliate", "77", "--goal", "lead",
        "--url", "https://track.example.org/pb?cid={click_id}",
        "--header", "X-Token=${secret:acme}", "--set", "retry.max_attempts=3",
        "--author", "7:Jane Doe", "--comment", "Pending leads of affiliate 77.",
    )  # fmt: skip
    assert result.code == 0, result.err
    text = solar(rules)
    [stamp] = created_stamps(text, since)
    added = f"""\

  # Pending leads of affiliate 77.
  - id: 202
    trigger: conversion_pending
    affiliate: 77
    goal: lead
    status: active
    created_at: {stamp}
    author: {{id: 7, name: Jane Doe}}
    retry:
      max_attempts: 3
    action:
      type: ping_url
      url: https://track.example.org/pb?cid={{click_id}}
      headers:
        X-Token: ${{secret:acme}}
"""
    before, _, _ = SOLAR.rpartition("# end of offer 1234\n")
    assert text == before + added + "# end of offer 1234\n"
    assert "added postback 202 to offer-1234.yaml (offer 1234)" in result.out
    assert "+  - id: 202" in result.out  # the change is shown as a diff


def test_add_from_a_yaml_snippet_creates_the_offer_file(rules: Path) -> None:
    snippet = """\
trigger: conversion_done
affiliate: 9
action:
  type: ping_url
  method: POST
  url: https://partner-9.example.com/pb
  form:
    clickid: "{click_id}"   # their name for it
"""
    since = datetime.now(UTC)
    result = run(
        "rules", "add", "--rules", str(rules), "--offer", "777", "--from", "-",
        "--author", "5:Kim Ray", "--author-affiliate", "9",
        input=snippet,
    )  # fmt: skip
    assert result.code == 0, result.err
    text = (rules / "offer-777.yaml").read_text()
    [stamp] = created_stamps(text, since)
    assert (
        text
        == f"""\
offer: 777
postbacks:
  - id: 202
    trigger: conversion_done
    affiliate: 9
    status: active
    created_at: {stamp}
    author: {{id: 5, name: Kim Ray, affiliate: 9}}
    action:
      type: ping_url
      method: POST
      url: https://partner-9.example.com/pb
      form:
        clickid: "{{click_id}}" # their name for it
"""
    )
    # (the snippet's comment is kept; its column moved with the indentation)
    assert "note: offer 777 had no rule file: created offer-777.yaml" in result.out


def test_add_takes_the_author_from_git_config(rules: Path) -> None:
    result = run(
        "rules", "add", "--rules", str(rules), "--offer", "501", "--trigger",
        "conversion_done", "--affiliate", "*", "--url", "https://t.example.com/x",
    )  # fmt: skip
    assert result.code == 0, result.err
    text = (rules / "partners/offer-501.yaml").read_text()
    assert "    author: {id: owner@example.com, name: Repo Owner}\n" in text


def test_an_invalid_add_writes_nothing(rules: Path) -> None:
    before = solar(rules)
    result = run(
        "rules", "add", "--rules", str(rules), "--offer", "1234", "--trigger",
        "conversion_done", "--affiliate", "1", "--url", "ftp://nope.example.com/",
        "--author", "7:Jane Doe",
    )  # fmt: skip
    assert result.code == 1
    assert solar(rules) == before
    lines = result.err.splitlines()
    assert lines[0].startswith("offer-1234.yaml:")
    assert "postback 202: action.url" in lines[0]
    assert lines[-1] == (
        "postbackd: error: the change does not validate (1 error(s)); nothing written"
    )
    assert sorted(p.name for p in rules.iterdir()) == ["offer-1234.yaml", "partners"]


def test_add_needs_trigger_and_affiliate(rules: Path) -> None:
    result = run("rules", "add", "--rules", str(rules), "--offer", "1234", "--author", "1:A")
    assert result.code == 2
    assert result.err.strip() == (
        "postbackd rules add: error: --trigger is required (or `trigger:` in --from) "
        "(see postbackd rules add --help)"
    )


def test_edit_changes_only_the_keys_it_sets(rules: Path) -> None:
    result = run(
        "rules", "edit", "102", "--rules", str(rules),
        "--set", "action.url=https://api.partner-42.example.net/v2/conversions",
        "--set", 'when={"and": [{">=": [{"var": "payout"}, 10]}, {"==": [{"var": "currency"}, "USD"]}]}',
        "--set", "action.json.currency={currency}",
    )  # fmt: skip
    assert result.code == 0, result.err
    expected = (
        SOLAR.replace(
            '    when: {">=": [{"var": "payout"}, 5]}   # only paying sales\n',
            # The comment stays; it moves right as the line grew.
            '    when: {and: [{">=": [{var: payout}, 10]}, {==: [{var: currency}, USD]}]}'
            " # only paying sales\n",
        )
        .replace(
            "      url: https://api.partner-42.example.net/conversions\n",
            "      url: https://api.partner-42.example.net/v2/conversions\n",
        )
        .replace(
            '        amount: "{payout}"\n',
            '        amount: "{payout}"\n        currency: "{currency}"\n',
        )
    )
    assert solar(rules) == expected


def test_edit_with_null_removes_a_key(rules: Path) -> None:
    result = run("rules", "edit", "102", "--rules", str(rules), "--set", "goal=null")
    assert result.code == 0, result.err
    assert solar(rules) == SOLAR.replace("    goal: sale\n", "")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("action.type=smtp", "the action type of an existing postback cannot change"),
        ("id=999", "id of an existing postback cannot change"),
        ("created_at=2020-01-01T00:00:00Z", "created_at of an existing postback cannot change"),
        ("author.name=Someone", "author of an existing postback cannot change"),
        ('action={"type": "slack_message"}', "the action type cannot change (ping_url to"),
        ("action.url=not a url", "action.url: not an absolute URL"),
        ("trigger=conversion_maybe", "trigger"),
        ("action.colour=red", "unknown key 'action.colour'"),
    ],
)
def test_a_refused_edit_writes_nothing(rules: Path, setting: str, message: str) -> None:
    before = solar(rules)
    result = run("rules", "edit", "102", "--rules", str(rules), "--set", setting)
    assert result.code == 1
    assert message in result.err
    assert result.err.splitlines()[-1].startswith("postbackd: error: ")
    assert solar(rules) == before


def test_disable_and_enable_flip_the_status_line(rules: Path) -> None:
    assert run("rules", "disable", "103", "--rules", str(rules)).code == 0
    disabled = SOLAR.replace(
        "    affiliate: 42\n    status: active\n    created_at: 2026-11-02T09:35:00Z",
        "    affiliate: 42\n    status: disabled\n    created_at: 2026-11-02T09:35:00Z",
    )
    assert solar(rules) == disabled
    again = run("rules", "disable", "103", "--rules", str(rules))
    assert (again.code, again.out) == (0, "postback 103 is already disabled; nothing to do\n")
    assert run("rules", "enable", "103", "--rules", str(rules)).code == 0
    assert solar(rules) == SOLAR


def test_disable_inserts_a_status_where_the_file_had_none(tmp_path: Path) -> None:
    text = SOLAR.replace(
        "    status: active\n    created_at: 2026-11-01", "    created_at: 2026-11-01"
    )
    rules = make_repo(tmp_path, {"offer-1234.yaml": text})
    assert run("rules", "disable", "101", "--rules", str(rules)).code == 0
    assert solar(rules) == text.replace(
        '    affiliate: "*"\n    created_at',
        '    affiliate: "*"\n    status: disabled\n    created_at',
    )


def test_delete_a_middle_postback_with_its_comment(rules: Path) -> None:
    result = run("rules", "delete", "102", "--confirm", "102", "--rules", str(rules))
    assert result.code == 0, result.err
    start = SOLAR.index("  # Affiliate 42 wants")
    end = SOLAR.index("  # Affiliate 42 also hears")
    assert solar(rules) == SOLAR[:start] + SOLAR[end:]


def test_delete_the_last_postback_keeps_the_file_trailer(rules: Path) -> None:
    assert run("rules", "delete", "103", "--confirm", "103", "--rules", str(rules)).code == 0
    start = SOLAR.index("\n  # Affiliate 42 also hears")
    end = SOLAR.index("# end of offer 1234")
    assert solar(rules) == SOLAR[:start] + SOLAR[end:]


def test_delete_the_only_postback_leaves_an_empty_list(rules: Path) -> None:
    assert run("rules", "delete", "201", "--confirm", "201", "--rules", str(rules)).code == 0
    assert (rules / "partners/offer-501.yaml").read_text() == "offer: 501\npostbacks: []\n"


def test_delete_without_a_terminal_needs_confirm(rules: Path) -> None:
    before = solar(rules)
    refused = run("rules", "delete", "102", "--rules", str(rules), input="102\n")
    assert refused.code == 1
    assert refused.err == (
        "postbackd: error: not a terminal: pass --confirm 102 to delete postback 102\n"
    )
    wrong = run("rules", "delete", "102", "--confirm", "103", "--rules", str(rules))
    assert wrong.code == 1
    assert wrong.err == "postbackd: error: confirmation does not match 102; nothing deleted\n"
    assert solar(rules) == before


def test_duplicate_copies_into_another_offer_with_new_ids(rules: Path) -> None:
    since = datetime.now(UTC)
    result = run(
        "rules", "duplicate", "--rules", str(rules), "--from-offer", "1234", "--to-offer",
        "501", "101", "103", "--author", "3:Ops Team",
    )  # fmt: skip
    assert result.code == 0, result.err
    text = (rules / "partners/offer-501.yaml").read_text()
    first, second = created_stamps(text, since)
    assert (
        text
        == INSURANCE
        + f"""\

  # Copied from postback 101 of offer 1234.
  - id: 202
    trigger: conversion_done
    affiliate: "*"
    status: active
    created_at: {first}
    author: {{id: 3, name: Ops Team}}
    action:
      type: ping_url
      method: GET
      url: https://tracker.example.com/pb?cid={{click_id}}&payout={{payout}}&tx={{conversion_id}}

  # Copied from postback 103 of offer 1234.
  - id: 203
    trigger: conversion_reject
    affiliate: 42
    status: active
    created_at: {second}
    author: {{id: 3, name: Ops Team}}
    action:
      type: ping_url
      url: https://api.partner-42.example.net/reject?click={{click_id}}
"""
    )
    assert solar(rules) == SOLAR
    assert "duplicated 101 as 202, 103 as 203 into partners/offer-501.yaml" in result.out


def test_duplicate_refuses_a_postback_of_another_offer(rules: Path) -> None:
    result = run(
        "rules", "duplicate", "--rules", str(rules), "--from-offer", "1234", "--to-offer",
        "501", "201", "--author", "3:Ops Team",
    )  # fmt: skip
    assert result.code == 1
    assert result.err == "postbackd: error: postback 201 belongs to offer 501, not 1234\n"


def test_ids_deleted_in_git_history_are_never_reused(tmp_path: Path) -> None:
    rules = make_repo(tmp_path, {"offer-1234.yaml": SOLAR})
    result = run(
        "rules", "add", "--rules", str(rules), "--offer", "1234", "--trigger",
        "conversion_done", "--affiliate", "5", "--url", "https://a.example.com/",
        "--author", "1:A",
    )  # fmt: skip
    assert "added postback 104" in result.out
    commit(tmp_path, "add 104")
    assert run("rules", "delete", "104", "--confirm", "104", "--rules", str(rules)).code == 0
    commit(tmp_path, "delete 104")
    again = run(
        "rules", "add", "--rules", str(rules), "--offer", "1234", "--trigger",
        "conversion_done", "--affiliate", "6", "--url", "https://b.example.com/",
        "--author", "1:A",
    )  # fmt: skip
    assert "added postback 105" in again.out, again.err


def test_hand_formatting_outside_the_edit_is_kept(tmp_path: Path) -> None:
    # Indentation ruamel.yaml would not reproduce, single quotes, a flow list with spaces:
    # only the edited line may change.
    odd = """\
offer: 9
postbacks:
- id: 1
  trigger:   conversion_done
  affiliate: '*'
  status: active
  when: { "in": [ { "var": "sub1" }, [ "a", "b" ] ] }
  action:
      type: ping_url
      url: https://x.example.com/a?c={click_id}
"""
    rules = make_repo(tmp_path, {"offer-9.yaml": odd})
    result = run(
        "rules", "edit", "1", "--rules", str(rules), "--set", "action.url=https://y.example.com/"
    )
    assert result.code == 0, result.err
    assert (rules / "offer-9.yaml").read_text() == odd.replace(
        "https://x.example.com/a?c={click_id}", "https://y.example.com/"
    )


def test_crlf_files_stay_crlf(tmp_path: Path) -> None:
    rules = make_repo(tmp_path, {})
    (rules / "offer-501.yaml").write_bytes(INSURANCE.replace("\n", "\r\n").encode())
    assert run("rules", "disable", "201", "--rules", str(rules)).code == 0
    data = (rules / "offer-501.yaml").read_bytes()
    assert (
        data
        == INSURANCE.replace("status: active", "status: disabled").replace("\n", "\r\n").encode()
    )


def test_dry_run_shows_the_change_and_writes_nothing(rules: Path) -> None:
    result = run("rules", "disable", "101", "--dry-run", "--rules", str(rules))
    assert result.code == 0
    assert "-    status: active\n+    status: disabled\n" in result.out
    assert result.out.endswith("dry run: nothing written\n")
    assert solar(rules) == SOLAR


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["rules", "edit", "999", "--set", "status=active"], 1,
         "postbackd: error: no postback with id 999 in {rules}"),
        (["rules", "edit", "abc", "--set", "status=active"], 2,
         "postbackd rules edit: error: Invalid value for 'ID': 'abc' is not a valid integer. "
         "(see postbackd rules edit --help)"),
        (["rules", "edit", "101", "--set", "status"], 2,
         "postbackd rules edit: error: Invalid value for --set: 'status': expected KEY=VALUE "
         "with a dotted KEY (e.g. action.url=https://...) (see postbackd rules edit --help)"),
        (["rules", "edit", "101", "--set", "action..url=x"], 2,
         "postbackd rules edit: error: Invalid value for --set: 'action..url=x': expected "
         "KEY=VALUE with a dotted KEY (e.g. action.url=https://...) "
         "(see postbackd rules edit --help)"),
        (["rules", "delete", "7"], 1, "postbackd: error: no postback with id 7 in {rules}"),
        (["rules", "list", "--offer", "4321"], 1,
         "postbackd: error: unknown offer 4321: no postback in the rules names it"),
        (["rules", "duplicate", "--from-offer", "4321", "--to-offer", "501", "101"], 1,
         "postbackd: error: unknown offer 4321: no rule file names it"),
        (["rules", "list", "--as", "guest"], 2,
         "postbackd rules list: error: Invalid value for --as: 'guest' is not admin or "
         "affiliate:ID (see postbackd rules list --help)"),
    ],
)  # fmt: skip
def test_errors_are_one_clear_line(rules: Path, args: list[str], code: int, message: str) -> None:
    before = solar(rules)
    result = run(*args, "--rules", str(rules))
    assert result.code == code
    assert result.err == message.format(rules=rules) + "\n"
    assert result.out == ""
    assert solar(rules) == before


def test_an_edit_of_a_file_that_changed_meanwhile_writes_nothing(rules: Path) -> None:
    from daemon.cli.editing import plan_edit, set_path
    from daemon.cli.ruletree import EditError, Tree, write

    tree = Tree.scan(rules)
    plan = plan_edit(tree, 101, lambda item: set_path(item, ["status"], "disabled"))
    write_files(rules, {"offer-1234.yaml": SOLAR + "# someone else's line\n"})
    with pytest.raises(EditError, match="changed while we edited it"):
        write(tree, plan)
    assert solar(rules) == SOLAR + "# someone else's line\n"


def test_an_edit_keeps_the_file_mode(rules: Path) -> None:
    path = rules / "offer-1234.yaml"
    path.chmod(0o640)
    assert run("rules", "disable", "101", "--rules", str(rules)).code == 0
    assert path.stat().st_mode & 0o777 == 0o640
    assert not [p for p in rules.iterdir() if p.name.startswith(".")]  # no temp file left


def _delete_on_a_terminal(rules: Path, pid: str, typed: str) -> subprocess.CompletedProcess[str]:
    """`postbackd rules delete PID` with a real terminal (a pty) as stdin, typing `typed`."""
    return on_a_terminal(["rules", "delete", pid, "--rules", str(rules)], typed)


def test_delete_on_a_terminal_asks_to_type_the_id(rules: Path) -> None:
    wrong = _delete_on_a_terminal(rules, "102", "101")
    assert wrong.returncode == 1
    assert "Type 102 to delete it" in wrong.stdout
    assert wrong.stderr == "postbackd: error: confirmation does not match 102; nothing deleted\n"
    assert solar(rules) == SOLAR
    done = _delete_on_a_terminal(rules, "102", "102")
    assert done.returncode == 0, done.stderr
    assert "deleted postback 102 from offer-1234.yaml" in done.stdout
    assert "  - id: 102\n" not in solar(rules)


def test_a_credential_written_out_is_flagged(rules: Path) -> None:
    result = run(
        "rules", "edit", "101", "--rules", str(rules), "--dry-run",
        "--set", "action.headers.Authorization=Bearer abc123",
        "--set", "action.headers.X-Trace={click_id}",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert result.out.count("note: ") == 1
    assert (
        "note: action.headers.Authorization is written out in the rule: put credentials in "
        "${secret:NAME} instead\n" in result.out
    )


def test_an_edit_can_repair_a_tree_that_does_not_load(rules: Path) -> None:
    broken = SOLAR.replace(
        "url: https://api.partner-42.example.net/reject?click={click_id}",
        "url: api.partner-42.example.net/reject?click={click_id}",
    )
    write_files(rules, {"offer-1234.yaml": broken})
    assert run("validate", str(rules)).code == 1
    other = run("rules", "disable", "101", "--rules", str(rules))
    assert other.code == 1  # the result would still not load: nothing written
    assert "postback 103: action.url: not an absolute URL" in other.err
    assert solar(rules) == broken
    fixed = run(
        "rules", "edit", "103", "--rules", str(rules),
        "--set", "action.url=https://api.partner-42.example.net/reject?click={click_id}",
    )  # fmt: skip
    assert fixed.code == 0, fixed.err
    assert solar(rules) == SOLAR
