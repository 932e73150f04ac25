"""The parsed-rules cache on disk (daemon.rulecache): a second load with unchanged files parses
nothing and gives the same rules; a changed file is parsed again; a damaged, truncated, foreign
or stale cache file is ignored, never unpickled; sharing of equal parts between postbacks."""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon import loader, rulecache
from daemon.errors import RulesError
from daemon.loader import load_rules
from daemon.rulecache import (
    MAGIC,
    PersistentParseCache,
    Snapshot,
    cache_dir,
    code_hash,
    decode,
    encode,
)
from tests.harness import write_rules


def _offer(offer: int, first_id: int, url: str = "http://127.0.0.1:9/pb?c={conversion_id}") -> str:
    return "\n".join(
        [f"offer: {offer}", "postbacks:"]
        + [
            line
            for j in range(3)
            for line in (
                f"  - id: {first_id + j}",
                "    trigger: conversion_done",
                '    affiliate: "*"',
                f'    when: {{"==": [{{"var": "sub1"}}, "fire-{j}"]}}',
                "    created_at: 2026-11-01T10:00:00Z",
                "    author: {id: 1, name: Ops}",
                f'    action: {{type: ping_url, url: "{url}"}}',
            )
        ]
    )


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files actually parsed from YAML (the loader's _parse_file calls)."""
    parsed: list[str] = []
    real = loader._parse_file

    def spy(rel: str, data: bytes) -> Any:
        parsed.append(rel)
        return real(rel, data)

    monkeypatch.setattr(loader, "_parse_file", spy)
    return parsed


def _tree(root: Path) -> Path:
    rules = root / "rules.d"
    write_rules(rules, {"a.yaml": _offer(1, 1), "b.yaml": _offer(2, 10)})
    return rules


def _load(rules: Path, state: Path) -> tuple[Any, PersistentParseCache]:
    cache = PersistentParseCache(state)
    result = load_rules(rules, cache=cache, git=False)
    cache.wait()
    return result, cache


def test_an_unchanged_tree_loads_from_the_cache(tmp_path: Path, counted: list[str]) -> None:
    rules, state = _tree(tmp_path), tmp_path / "state"
    first, _ = _load(rules, state)
    assert sorted(counted) == ["a.yaml", "b.yaml"]
    assert (state / rulecache.FILE_NAME).stat().st_mode & 0o777 == 0o600
    counted.clear()
    second, cache = _load(rules, state)  # a new process would start like this
    assert counted == []
    assert cache.loaded == 2
    assert second.version == first.version
    assert second.loaded_at > first.loaded_at
    assert sorted(second.postbacks) == sorted(first.postbacks) == [1, 2, 3, 10, 11, 12]
    for pid, lp in first.postbacks.items():
        again = second.postbacks[pid]
        assert again.postback == lp.postback
        assert (again.offer, again.file, again.line) == (lp.offer, lp.file, lp.line)
    # Compiled conditions work after the round trip.
    condition = second.postbacks[2].postback.condition
    assert condition is not None
    assert condition.truthy({"sub1": "fire-1"})
    assert not condition.truthy({"sub1": "fire-0"})


def test_a_changed_file_is_parsed_again(tmp_path: Path, counted: list[str]) -> None:
    rules, state = _tree(tmp_path), tmp_path / "state"
    _load(rules, state)
    counted.clear()
    new_url = "http://127.0.0.1:9/changed?c={conversion_id}"
    write_rules(rules, {"b.yaml": _offer(2, 10, new_url)})
    second, _ = _load(rules, state)
    assert counted == ["b.yaml"]
    action = second.postbacks[10].postback.action
    assert "changed" in action.url.source
    counted.clear()
    _load(rules, state)  # and the cache now holds the new content
    assert counted == []


def test_a_broken_file_is_still_an_error_from_the_cache(tmp_path: Path) -> None:
    rules, state = _tree(tmp_path), tmp_path / "state"
    write_rules(rules, {"c.yaml": "offer: 3\npostbacks: [{id: 1, trigger: nope}]\n"})
    for _ in range(2):
        with pytest.raises(RulesError) as err:
            _load(rules, state)
        assert any(issue.file == "c.yaml" for issue in err.value.issues)


@pytest.mark.parametrize(
    "damage",
    [
        lambda blob: blob[:-10],  # truncated
        lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]),  # one bit of the payload
        lambda blob: b"junk" + blob,  # not ours
        lambda blob: MAGIC + b"{not json\n" + blob.split(b"\n", 2)[2],  # damaged header
        lambda blob: MAGIC + b"\x00" * 5000,  # no header end
        lambda blob: b"",  # empty
    ],
)
def test_a_damaged_cache_is_ignored_and_rewritten(
    tmp_path: Path, counted: list[str], damage: Any
) -> None:
    rules, state = _tree(tmp_path), tmp_path / "state"
    first, _ = _load(rules, state)
    path = state / rulecache.FILE_NAME
    path.write_bytes(damage(path.read_bytes()))
    counted.clear()
    with capture_logs() as logs:
        second, cache = _load(rules, state)
    assert sorted(counted) == ["a.yaml", "b.yaml"]  # parsed from YAML again
    assert cache.loaded == 0
    assert second.version == first.version
    assert [e["event"] for e in logs if e["event"].startswith("rules_cache")] == [
        "rules_cache_ignored"
    ]
    counted.clear()
    _load(rules, state)  # the damaged file was replaced by a good one
    assert counted == []


def test_a_payload_that_would_run_code_is_never_unpickled(tmp_path: Path) -> None:
    """A file whose header does not match (here: another code hash) is refused before pickle
    sees its payload, whatever the payload holds."""

    class Boom:
        def __reduce__(self) -> Any:
            return (pytest.fail, ("unpickled a refused payload",))

    payload = pickle.dumps({"files": {"a.yaml": (b"x", Boom())}, "last": None})
    header = {
        "format": rulecache.FORMAT,
        "python": "0.0",
        "code": "other",
        "length": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    blob = MAGIC + json.dumps(header).encode() + b"\n" + payload
    assert decode(blob, code_hash()) == (None, "written by another version")


def test_stale_code_or_format_is_ignored(tmp_path: Path) -> None:
    blob = encode(Snapshot({"a.yaml": (b"d", None)}), "code-1")
    assert decode(blob, "code-2")[0] is None
    snapshot, reason = decode(blob, "code-1")
    assert snapshot == Snapshot({"a.yaml": (b"d", None)}, None)
    assert reason == ""
    wrong_shape = encode(Snapshot({"a.yaml": "not a pair"}), "code-1")
    assert decode(wrong_shape, "code-1") == (None, "unexpected contents")
    payload = pickle.dumps({"files": {}, "last": ((), "not a set's version")})
    header = {
        "format": rulecache.FORMAT,
        "python": sys.version.split()[0],
        "code": "code-1",
        "length": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    not_a_set = MAGIC + json.dumps(header).encode() + b"\n" + payload
    assert decode(not_a_set, "code-1") == (None, "unexpected contents")


def test_an_unwritable_state_dir_only_loses_the_cache(tmp_path: Path) -> None:
    rules = _tree(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with capture_logs() as logs:
        result, _ = _load(rules, blocker / "state")
    assert sorted(result.postbacks) == [1, 2, 3, 10, 11, 12]
    assert "rules_cache_not_written" in [e["event"] for e in logs]


def test_cache_dir_defaults_next_to_the_sqlite_file(tmp_path: Path) -> None:
    assert cache_dir(None, "sqlite:///../var/p.db", tmp_path / "conf") == (
        tmp_path / "conf" / ".." / "var" / "rules-cache"
    )
    assert cache_dir(None, "postgresql://u@127.0.0.1/db", tmp_path) is None
    assert cache_dir(Path("state"), "postgresql://u@127.0.0.1/db", tmp_path) == (
        tmp_path / "state" / "rules-cache"
    )
    assert cache_dir(tmp_path / "abs", "sqlite:////x.db", Path("/elsewhere")) == (
        tmp_path / "abs" / "rules-cache"
    )


def test_equal_parts_are_one_object(tmp_path: Path) -> None:
    rules = _tree(tmp_path)
    write_rules(rules, {"c.yaml": _offer(3, 20, "http://127.0.0.1:9/other")})
    result = load_rules(rules, git=False)
    pbs = [lp.postback for lp in result.postbacks.values()]
    same_url = [pb for pb in pbs if pb.id < 20]
    assert len({id(pb.action) for pb in same_url}) == 1
    assert len({id(pb.author) for pb in pbs}) == 1
    assert len({id(pb.created_at) for pb in pbs}) == 1
    assert len({id(pb.condition) for pb in pbs}) == 3  # fire-0, fire-1, fire-2
    assert len({id(pb.__pydantic_fields_set__) for pb in pbs}) == 1
    other = [pb for pb in pbs if pb.id >= 20]
    assert {id(pb.action) for pb in other}.isdisjoint({id(pb.action) for pb in same_url})


def test_an_unchanged_tree_gives_the_same_set_without_building_it(tmp_path: Path) -> None:
    rules = _tree(tmp_path)
    cache = loader.ParseCache()
    first = load_rules(rules, cache=cache, git=False)
    again = load_rules(rules, cache=cache, git=False)
    assert again.postbacks is first.postbacks  # nothing rebuilt
    assert again.version == first.version
    assert again.loaded_at >= first.loaded_at
    write_rules(rules, {"b.yaml": _offer(2, 10, "http://127.0.0.1:9/x")})
    changed = load_rules(rules, cache=cache, git=False)
    assert changed.postbacks is not first.postbacks
    assert changed.version != first.version


def test_the_unchanged_shortcut_still_checks_secrets(tmp_path: Path) -> None:
    rules = tmp_path / "rules.d"
    write_rules(rules, {"a.yaml": _offer(1, 1, "http://127.0.0.1:9/?k=${secret:TOKEN}")})
    cache = loader.ParseCache()
    first = load_rules(rules, cache=cache, git=False, missing_secrets=lambda names: [])
    assert first.secrets == frozenset({"TOKEN"})
    with pytest.raises(RulesError) as err:
        load_rules(rules, cache=cache, git=False, missing_secrets=lambda names: list(names))
    assert "secret 'TOKEN' does not resolve" in str(err.value.issues[0])


def test_a_start_with_unchanged_files_takes_the_cached_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules, state = _tree(tmp_path), tmp_path / "state"
    first, _ = _load(rules, state)
    builds: list[int] = []
    real = loader._build

    def spy(*args: Any, **kwargs: Any) -> Any:
        builds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "_build", spy)
    second, _ = _load(rules, state)  # a new cache object: as after a restart
    assert builds == []
    assert sorted(second.active) == sorted(first.active)
    assert second.files == first.files
    write_rules(rules, {"a.yaml": _offer(1, 1, "http://127.0.0.1:9/changed")})
    third, _ = _load(rules, state)
    assert builds == [1]
    assert "changed" in third.postbacks[1].postback.action.url.source


def _shape(rules: Any) -> Any:
    """Everything a reader of a rule set sees: each postback as the API and explain read it
    (its model dumped, offer, goals, file, line), the offers and the matching index by id, the
    files, the version and the secrets."""
    return (
        [
            (pid, lp.postback.model_dump(mode="json"), lp.offer, lp.goals_enabled, lp.file, lp.line)
            for pid, lp in rules.postbacks.items()
        ],
        {offer: [lp.id for lp in lps] for offer, lps in rules.offers.items()},
        {key: [lp.id for lp in lps] for key, lps in rules.active.items()},
        rules.files,
        rules.version.digest,
        rules.secrets,
    )


def test_a_set_from_the_cache_is_the_set_from_yaml(tmp_path: Path, counted: list[str]) -> None:
    """The cache keeps each file's postbacks as flat field values (RuleFile.__reduce__) and the
    last set as its fingerprint (rebuilt from the parsed files): what comes back is what YAML
    gives, with its parts still shared, and models that compare, dump and copy as before."""
    rules, state = _tree(tmp_path), tmp_path / "state"
    secret_url = "http://127.0.0.1:9/pb?k=${secret:TOKEN}"
    write_rules(
        rules,
        {
            "c.yaml": _offer(3, 20, secret_url),
            "d.yaml": "offer: 3\ngoals_enabled: false\npostbacks:\n"
            "  - {id: 30, trigger: conversion_reject, affiliate: '7', goal: g1, status: disabled,"
            " retry: {max_attempts: 3}, action: {type: ping_url, url: 'http://127.0.0.1:9/d'}}\n",
            "empty.yaml": "",
        },
    )
    fresh = load_rules(rules, git=False)
    _load(rules, state)
    counted.clear()
    cached, cache = _load(rules, state)
    assert counted == []
    assert cache.loaded == 5
    assert _shape(cached) == _shape(fresh)
    for pid, lp in cached.postbacks.items():
        again = fresh.postbacks[pid]
        assert lp.postback == again.postback
        assert lp.postback.__pydantic_fields_set__ == again.postback.__pydantic_fields_set__
        assert lp.postback.model_copy(update={"status": "disabled"}).status == "disabled"
        assert lp.postback.active == again.postback.active
    # the set's postbacks are the parsed files' own models (one copy of each)
    parsed = {
        id(pb)
        for _, (_, one) in cache._files.items()
        if one.rule_file
        for pb in one.rule_file.postbacks
    }
    assert {id(lp.postback) for lp in cached.postbacks.values()} <= parsed
    pbs = [lp.postback for lp in cached.postbacks.values()]
    assert len({id(pb.action) for pb in pbs if pb.id < 20}) == 1  # still shared across files
    assert len({id(pb.author) for pb in pbs if pb.author is not None}) == 1
    assert len({id(pb.condition) for pb in pbs if pb.condition is not None}) == 3
    assert cached.postbacks[30].postback.retry is not None
    assert cached.postbacks[30].postback.retry.max_attempts == 3
    # matching and explain give the same answers from either set
    from datetime import UTC, datetime

    from daemon.matching import explain, match
    from daemon.models import Conversion, Transition, rule_data

    for offer, sub1 in (("1", "fire-1"), ("2", "fire-0"), ("3", "none")):
        conv = Conversion.parse(
            {"conversion_id": "c", "offer": offer, "affiliate": "7", "status": "approved",
             "sub1": sub1}
        )  # fmt: skip
        data = rule_data(
            conv, source="generic", transition=Transition.NEW, previous_status=None,
            received_at=datetime.now(UTC),
        )  # fmt: skip
        assert [lp.id for lp in match(cached, conv, data)] == [
            lp.id for lp in match(fresh, conv, data)
        ]
        verdicts = [
            (v.postback.id, v.fires, v.reason) for v in explain(cached, conv, data, conv.trigger)
        ]
        assert verdicts == [
            (v.postback.id, v.fires, v.reason) for v in explain(fresh, conv, data, conv.trigger)
        ]
        assert verdicts  # every offer of the tree has postbacks


def test_a_rule_file_with_private_state_pickles_as_pydantic_does() -> None:
    from daemon.rules import RuleFile

    rule_file = RuleFile.model_validate(
        {
            "offer": 1,
            "postbacks": [
                {
                    "id": 1,
                    "trigger": "conversion_done",
                    "affiliate": "*",
                    "action": {"type": "ping_url", "url": "http://127.0.0.1:9/"},
                }
            ],
        }
    )
    plain = pickle.loads(pickle.dumps(rule_file))  # noqa: S301 (made here)
    assert plain == rule_file
    assert plain.postbacks[0].id == 1
    object.__setattr__(rule_file, "__pydantic_private__", {"x": 1})
    again = pickle.loads(pickle.dumps(rule_file))  # noqa: S301 (made here)
    assert again.__pydantic_private__ == {"x": 1}
    assert again == rule_file


def test_the_collector_is_on_again_after_a_load(tmp_path: Path) -> None:
    """Loads pause the cyclic collector while they build (loader.collector_paused): it is on
    again after a load, a failed one and a read of the cache, and stays off if it was off."""
    import gc

    rules, state = _tree(tmp_path), tmp_path / "state"
    assert gc.isenabled()
    _load(rules, state)
    _load(rules, state)  # from the cache
    assert gc.isenabled()
    write_rules(rules, {"c.yaml": "offer: 3\npostbacks: [{id: 1, trigger: nope}]\n"})
    with pytest.raises(RulesError):
        load_rules(rules, git=False)
    assert gc.isenabled()
    gc.disable()
    try:
        with loader.collector_paused(), loader.collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_runs_while_yaml_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paused while files are read and the set is built, on while YAML is parsed (that may take
    minutes while the daemon serves requests)."""
    import gc

    seen: dict[str, list[bool]] = {"parse": [], "build": []}
    parse, check = loader._parse_file, loader._check_ids

    def spy_parse(rel: str, data: bytes) -> Any:
        seen["parse"].append(gc.isenabled())
        return parse(rel, data)

    def spy_check(*args: Any) -> Any:
        seen["build"].append(gc.isenabled())
        return check(*args)

    monkeypatch.setattr(loader, "_parse_file", spy_parse)
    monkeypatch.setattr(loader, "_check_ids", spy_check)
    load_rules(_tree(tmp_path), git=False)
    assert seen == {"parse": [True, True], "build": [False]}
    assert gc.isenabled()


def test_a_changed_file_makes_new_loaded_postbacks_for_itself_only(tmp_path: Path) -> None:
    rules, cache = _tree(tmp_path), loader.ParseCache()
    first = load_rules(rules, cache=cache, git=False)
    write_rules(rules, {"b.yaml": _offer(2, 10, "http://127.0.0.1:9/x")})
    changed = load_rules(rules, cache=cache, git=False)
    assert changed.postbacks is not first.postbacks
    assert all(changed.postbacks[pid] is first.postbacks[pid] for pid in (1, 2, 3))  # a.yaml
    assert changed.postbacks[10] is not first.postbacks[10]
    assert changed.postbacks[10].postback.action.url.source.endswith("/x")
    assert (changed.postbacks[11].file, changed.postbacks[11].line) == ("b.yaml", 10)
    assert changed.offers["1"] == first.offers["1"]
