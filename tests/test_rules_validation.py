"""One bad rule file per validation error, each with its exact `file:line: postback N:` line,
and the properties of the loader (all or nothing, ignored files, symlinks, limits, version)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.actions import BUILDERS
from daemon.errors import RulesError
from daemon.loader import load_rules

GOOD = """\
  - id: {id}
    trigger: conversion_done
    affiliate: "*"
    action: {{type: ping_url, url: "https://t.example.com/pb?tx={{conversion_id}}"}}
"""
KNOWN = ", ".join(sorted(BUILDERS))


def pb(pid: object = 5, extra: str = "") -> str:
    return GOOD.format(id=pid) + extra


CASES = {
    "yaml_syntax": (
        "offer: 1\npostbacks: [\n",
        "r.yaml:3: while parsing a flow node; did not find expected node content",
    ),
    "not_a_mapping": ("- just\n- a list\n", "r.yaml:1: a rule file must be a mapping"),
    "duplicate_key": ("offer: 1\noffer: 2\n", "r.yaml:2: duplicate key 'offer'"),
    "unknown_top_key": ("offer: 1\ncolour: blue\n", "r.yaml:2: unknown key 'colour'"),
    "missing_offer": ("postbacks: []\n", "r.yaml:1: missing required key 'offer'"),
    "unknown_postback_key": (
        "offer: 1\npostbacks:\n" + pb(5, "    colour: blue\n"),
        "r.yaml:7: postback 5: unknown key 'colour'",
    ),
    "unknown_trigger": (
        "offer: 1\npostbacks:\n" + pb().replace("conversion_done", "conversion_maybe"),
        "r.yaml:4: postback 5: trigger: must be conversion_pending, conversion_done or "
        "conversion_reject, not 'conversion_maybe'",
    ),
    "unknown_action_type": (
        "offer: 1\npostbacks:\n  - id: 5\n    trigger: conversion_done\n    affiliate: 1\n"
        "    action: {type: carrier_pigeon}\n",
        f"r.yaml:6: postback 5: unknown action type 'carrier_pigeon' (known: {KNOWN})",
    ),
    "missing_action_type": (
        "offer: 1\npostbacks:\n  - id: 5\n    trigger: conversion_done\n    affiliate: 1\n"
        "    action: {url: 'https://x.example'}\n",
        f"r.yaml:6: postback 5: action needs a type (known: {KNOWN})",
    ),
    "unknown_action_key": (
        "offer: 1\npostbacks:\n" + pb().replace("action: {", "action: {colour: blue, "),
        "r.yaml:6: postback 5: unknown key 'action.colour'",
    ),
    "id_not_positive": (
        "offer: 1\npostbacks:\n" + pb(0),
        "r.yaml:3: id: Input should be greater than 0",
    ),
    "id_as_string": (
        "offer: 1\npostbacks:\n" + pb('"7"'),
        "r.yaml:3: id: Input should be a valid integer",
    ),
    "missing_id": (
        "offer: 1\npostbacks:\n  - trigger: conversion_done\n    affiliate: 1\n"
        "    action: {type: ping_url, url: 'https://x.example/'}\n",
        "r.yaml:3: missing required key 'id'",
    ),
    "missing_affiliate": (
        "offer: 1\npostbacks:\n  - id: 5\n    trigger: conversion_done\n"
        "    action: {type: ping_url, url: 'https://x.example/'}\n",
        "r.yaml:3: postback 5: missing required key 'affiliate'",
    ),
    "unknown_jsonlogic_operator": (
        "offer: 1\npostbacks:\n" + pb(5, '    when: {"frobnicate": [1]}\n'),
        'r.yaml:7: postback 5: when: unknown operator "frobnicate"',
    ),
    "jsonlogic_wrong_arity": (
        "offer: 1\npostbacks:\n" + pb(5, '    when: {"==": [1]}\n'),
        'r.yaml:7: postback 5: when: "==" takes exactly 2 arguments, not 1',
    ),
    "unknown_macro": (
        "offer: 1\npostbacks:\n" + pb().replace("{conversion_id}", "{payot}"),
        "r.yaml:6: postback 5: action.url: unknown macro {payot}; did you mean {payout}?",
    ),
    "macro_in_url_host": (
        "offer: 1\npostbacks:\n" + pb().replace("t.example.com", "{sub1}.example.com"),
        "r.yaml:6: postback 5: action.url: a macro cannot set the URL's scheme, host or port",
    ),
    "get_with_a_body": (
        "offer: 1\npostbacks:\n  - id: 5\n    trigger: conversion_done\n    affiliate: 1\n"
        "    action:\n      type: ping_url\n      url: https://x.example/\n      form: {a: b}\n",
        "r.yaml:6: postback 5: action: a GET request has no body: "
        "put the values in the URL's query",
    ),
    "bad_header_name": (
        "offer: 1\npostbacks:\n  - id: 5\n    trigger: conversion_done\n    affiliate: 1\n"
        "    action:\n      type: ping_url\n      url: https://x.example/\n"
        '      headers: {"Bad Header": x}\n',
        "r.yaml:9: postback 5: action.headers: 'Bad Header' is not a valid header name",
    ),
    "bad_status": (
        "offer: 1\npostbacks:\n" + pb(5, "    status: paused\n"),
        "r.yaml:7: postback 5: status: must be active or disabled, not 'paused'",
    ),
    "goals_enabled_yes_is_a_string": (
        "offer: 1\ngoals_enabled: yes\n",
        "r.yaml:2: goals_enabled: Input should be a valid boolean",
    ),
    "bad_created_at": (
        "offer: 1\npostbacks:\n" + pb(5, "    created_at: yesterday\n"),
        "r.yaml:7: postback 5: created_at: Input should be a valid datetime or date, "
        "input is too short",
    ),
    "bad_retry_duration": (
        "offer: 1\npostbacks:\n" + pb(5, "    retry: {max_age: soon}\n"),
        "r.yaml:7: postback 5: retry.max_age: 'soon' is not a duration such as 10s, 5m, 24h or 30d",
    ),
    "python_tag": (
        "offer: !!python/name:os.system 1\n",
        "r.yaml:1: tag 'tag:yaml.org,2002:python/name:os.system' is not allowed",
    ),
    "merge_key": ("base: &b {offer: 1}\n<<: *b\n", "r.yaml:2: merge keys (<<) are not supported"),
    "alias_bomb": (
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n"
            for p, n in zip("abcdef", "bcdefg", strict=True)
        ),
        "r.yaml:1: document expands to more than 100000 nodes (alias bomb?)",
    ),
}


@pytest.mark.parametrize(("text", "message"), list(CASES.values()), ids=list(CASES))
def test_each_validation_error_names_file_line_and_postback(
    tmp_path: Path, text: str, message: str
) -> None:
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RulesError) as err:
        load_rules(tmp_path, git=False)
    assert [str(i) for i in err.value.issues] == [message]


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    write(
        tmp_path,
        {"a.yaml": "offer: 1\npostbacks:\n" + pb(9), "b/c.yaml": "offer: 2\npostbacks:\n" + pb(9)},
    )
    with pytest.raises(RulesError) as err:
        load_rules(tmp_path, git=False)
    assert [str(i) for i in err.value.issues] == [
        "b/c.yaml:3: postback 9: duplicate id (also at a.yaml:3)"
    ]


def test_goals_enabled_must_agree_across_files_of_one_offer(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": "offer: 1\ngoals_enabled: true\n", "b.yaml": "offer: '1'\n"})
    with pytest.raises(RulesError) as err:
        load_rules(tmp_path, git=False)
    assert [str(i) for i in err.value.issues] == [
        "b.yaml:1: offer 1: goals_enabled is false here but true in a.yaml"
    ]


def test_file_over_one_mebibyte(tmp_path: Path) -> None:
    (tmp_path / "big.yaml").write_text("offer: 1\n# " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(RulesError) as err:
        load_rules(tmp_path, git=False)
    assert [str(i) for i in err.value.issues] == ["big.yaml:1: file is larger than 1024 KiB"]


def test_symlink_out_of_the_tree_is_refused(tmp_path: Path) -> None:
    rules, outside = tmp_path / "rules.d", tmp_path / "elsewhere"
    write(outside, {"x.yaml": "offer: 1\n", "d/y.yaml": "offer: 2\n"})
    write(rules, {"ok.yaml": "offer: 3\n"})
    (rules / "link.yaml").symlink_to(outside / "x.yaml")
    (rules / "dirlink").symlink_to(outside / "d")
    with pytest.raises(RulesError) as err:
        load_rules(rules, git=False)
    assert [str(i) for i in err.value.issues] == [
        "dirlink:0: symlink leads out of the rules directory",
        "link.yaml:0: symlink leads out of the rules directory",
    ]


def test_a_symlinked_root_and_links_inside_the_tree_are_followed(tmp_path: Path) -> None:
    real = tmp_path / "releases" / "v1"
    write(real, {".library/a.yaml": "offer: 1\npostbacks:\n" + pb(1)})
    (real / "a.yaml").symlink_to(real / ".library" / "a.yaml")  # hidden target: reached once
    current = tmp_path / "current"
    current.symlink_to(real)  # a deployment swaps this link atomically
    rules = load_rules(current, git=False)
    assert list(rules.postbacks) == [1]
    assert rules.files == ("a.yaml",)


def test_a_dangling_symlink_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "nowhere.yaml")
    with pytest.raises(RulesError) as err:
        load_rules(tmp_path, git=False)
    assert [str(i) for i in err.value.issues] == [
        "gone.yaml:0: cannot read: No such file or directory"
    ]


def test_editor_swap_backup_hidden_and_tests_are_ignored(tmp_path: Path) -> None:
    junk = "this: is: not: yaml: ["
    write(
        tmp_path,
        {
            "good.yaml": "offer: 1\npostbacks:\n" + pb(1),
            ".hidden.yaml": junk,
            ".good.yaml.swp": junk,
            "good.yaml~": junk,
            "#good.yaml#": junk,
            "good.yaml.bak": junk,
            "good.yaml.orig": junk,
            ".#good.yaml": junk,
            "notes.txt": junk,
            "tests/case.yaml": junk,
            ".git/config.yaml": junk,
        },
    )
    rules = load_rules(tmp_path, git=False)
    assert list(rules.postbacks) == [1]
    assert rules.files == ("good.yaml",)


def test_all_or_nothing(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": "offer: 1\npostbacks:\n" + pb(1), "b.yaml": "offer: [\n"})
    with pytest.raises(RulesError):
        load_rules(tmp_path, git=False)


def test_missing_secrets_are_errors_for_the_daemon(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "a.yaml": "offer: 1\npostbacks:\n"
            + pb(4).replace('url: "', 'headers: {X-Key: "${secret:k1}"}, url: "')
        },
    )
    with pytest.raises(RulesError) as err:
        load_rules(tmp_path, git=False, missing_secrets=lambda names: list(names))
    assert [str(i) for i in err.value.issues] == [
        "a.yaml:3: postback 4: secret 'k1' does not resolve"
    ]
    assert load_rules(tmp_path, git=False).secrets == {"k1"}


def test_yaml_12_semantics_ids_compare_as_strings(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": "offer: 1.10\npostbacks:\n" + pb(1).replace('"*"', "no")})
    rules = load_rules(tmp_path, git=False)
    lp = rules.postbacks[1]
    assert lp.offer == "1.10"
    assert lp.postback.affiliate == "no"


def test_version_is_a_content_hash_plus_the_git_commit(tmp_path: Path) -> None:
    write(tmp_path, {"rules.d/a.yaml": "offer: 1\n"})
    root = tmp_path / "rules.d"
    plain = load_rules(root)
    assert plain.version.git_commit is None
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, env=env)
    head = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    versioned = load_rules(root)
    assert versioned.version.digest == plain.version.digest
    assert versioned.version.git_commit == head
    assert str(versioned.version) == f"{plain.version.digest[:12]}+git.{head[:12]}"
    (root / "a.yaml").write_text("offer: 2\n")
    dirty = load_rules(root)
    assert dirty.version.digest != plain.version.digest
    assert str(dirty.version).endswith("-dirty")


def test_the_shipped_example_rules_load() -> None:
    rules = load_rules(Path(__file__).parent.parent / "rules.d", git=False)
    assert len(rules.postbacks) >= 7
    assert {lp.offer for lp in rules.postbacks.values()} >= {"1234", "501", "demo"}


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.one_of(st.text(max_size=400), st.binary(max_size=400).map(lambda b: b.decode("latin-1"))))
def test_loader_fed_arbitrary_text_only_raises_its_own_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    with contextlib.suppress(RulesError):
        load_rules(tmp_path, git=False)


YAML_ATOMS = st.sampled_from(
    [
        "offer: 1\n",
        "postbacks:\n",
        "  - id: 3\n",
        "    trigger: conversion_done\n",
        "    affiliate: '*'\n",
        "    action: {type: ping_url, url: 'https://x.example/{click_id}'}\n",
        "    when: {'>': [{var: payout}, 1]}\n",
        "    goal: a\n",
        "goals_enabled: true\n",
        "  - &a {id: 4}\n",
        "  - *a\n",
        "    status: disabled\n",
        "x: [1, {a: b}]\n",
        "  -\n",
        ": :\n",
        "{",
        "]",
        "'",
        '"',
        "\t",
        "    when: {'var': [[[[]]]]}\n",
        "    retry: {max_attempts: 0}\n",
    ]
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(YAML_ATOMS, max_size=12))
def test_loader_fed_near_valid_yaml_only_raises_its_own_error(
    tmp_path: Path, atoms: list[str]
) -> None:
    (tmp_path / "fuzz.yaml").write_text("".join(atoms))
    with contextlib.suppress(RulesError):
        load_rules(tmp_path, git=False)
