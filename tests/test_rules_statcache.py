"""The stat fast path of a reload (loader.ParseCache.unchanged): a reload whose every rule file
has the stat (device, inode, size, mtime, ctime) it had when the running set was built from it
reads no file; any other stat, and the file is read and hashed again. Each case below changes a
file in a way a stat on mtime and size alone would miss, and checks that the new content IS
what the reload returns."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from daemon import loader
from daemon.errors import RulesError
from daemon.loader import ParseCache, RuleSet, load_rules
from daemon.rulecache import PersistentParseCache


def _rule(offer: int, pid: int, path: str = "aaaa") -> str:
    """A rule file whose size does not depend on `path` (4 letters): same-size rewrites."""
    assert len(path) == 4
    return (
        f"offer: {offer}\npostbacks:\n"
        f'  - {{id: {pid}, trigger: conversion_done, affiliate: "*",\n'
        f'     action: {{type: ping_url, url: "http://127.0.0.1:9/{path}"}}}}\n'
    )


def _url(rules: RuleSet, pid: int) -> str:
    return str(rules.postbacks[pid].postback.action.url.source)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The rule files the loader reads from disk (each _read_file call), by relative path."""
    seen: list[str] = []
    real = loader._read_file

    def spy(path: Any, rel: str, issues: Any) -> Any:
        seen.append(rel)
        return real(path, rel, issues)

    monkeypatch.setattr(loader, "_read_file", spy)
    return seen


@pytest.fixture
def trusting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files written by the test a moment ago count as settled (RACY_NS 0): the fast path is
    taken at once. Every change below then makes sure the file's ctime did move (a write in the
    same clock tick as the previous one is exactly what RACY_NS guards against)."""
    monkeypatch.setattr(loader, "RACY_NS", 0)


def _settle(path: Path, write: Any) -> None:
    """Run write() until the file's ctime differs from before (the coarse clock ticked)."""
    before = os.stat(path).st_ctime_ns if path.exists() else None
    while True:
        write()
        if before is None or os.stat(path).st_ctime_ns != before:
            return
        time.sleep(0.002)


def _same_size_restored_mtime(path: Path, text: str) -> None:
    """Rewrite in place (same inode), same size, then set the old mtime back."""
    old = os.stat(path)
    assert len(text.encode()) == old.st_size

    def write() -> None:
        with open(path, "r+b") as fh:
            fh.write(text.encode())
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))

    _settle(path, write)
    new = os.stat(path)
    assert (new.st_ino, new.st_size, new.st_mtime_ns) == (old.st_ino, old.st_size, old.st_mtime_ns)


def _tree(tmp_path: Path) -> Path:
    rules = tmp_path / "rules.d"
    rules.mkdir(parents=True)
    (rules / "a.yaml").write_text(_rule(1, 1))
    (rules / "b.yaml").write_text(_rule(2, 2))
    return rules


def test_an_unchanged_tree_reads_no_file(tmp_path: Path, reads: list[str], trusting: None) -> None:
    rules, cache = _tree(tmp_path), ParseCache()
    first = load_rules(rules, cache=cache, git=False)
    assert sorted(reads) == ["a.yaml", "b.yaml"]
    reads.clear()
    again = load_rules(rules, cache=cache, git=False)
    assert reads == []
    assert again.postbacks is first.postbacks
    assert again.version == first.version


def test_same_size_and_restored_mtime_is_reloaded(
    tmp_path: Path, reads: list[str], trusting: None
) -> None:
    rules, cache = _tree(tmp_path), ParseCache()
    load_rules(rules, cache=cache, git=False)
    _same_size_restored_mtime(rules / "a.yaml", _rule(1, 1, "bbbb"))
    reads.clear()
    changed = load_rules(rules, cache=cache, git=False)
    assert "a.yaml" in reads
    assert _url(changed, 1).endswith("/bbbb")


def test_a_file_renamed_over_the_name_is_reloaded(
    tmp_path: Path, reads: list[str], trusting: None
) -> None:
    """An editor's save (write a temporary, rename it over the file): a new inode, here with
    the same size and the old mtime."""
    rules, cache = _tree(tmp_path), ParseCache()
    load_rules(rules, cache=cache, git=False)
    target, tmp = rules / "a.yaml", rules / ".a.yaml.tmp"
    old = os.stat(target)

    def write() -> None:
        tmp.write_text(_rule(1, 1, "cccc"))
        os.utime(tmp, ns=(old.st_atime_ns, old.st_mtime_ns))
        os.replace(tmp, target)

    _settle(target, write)
    changed = load_rules(rules, cache=cache, git=False)
    assert _url(changed, 1).endswith("/cccc")


def test_a_chmod_alone_rereads_and_keeps_the_set(
    tmp_path: Path, reads: list[str], trusting: None
) -> None:
    rules, cache = _tree(tmp_path), ParseCache()
    first = load_rules(rules, cache=cache, git=False)
    path = rules / "b.yaml"
    _settle(path, lambda: path.chmod(path.stat().st_mode ^ 0o004))
    reads.clear()
    again = load_rules(rules, cache=cache, git=False)
    assert reads == ["a.yaml", "b.yaml"]  # any stat differs: every file hashed again
    assert again.postbacks is first.postbacks  # same contents: the same set


def test_a_symlinked_rule_file_follows_its_target(
    tmp_path: Path, reads: list[str], trusting: None
) -> None:
    rules, cache = _tree(tmp_path), ParseCache()
    targets = rules / ".targets"  # an ignored folder: its files are read through the link only
    targets.mkdir()
    (targets / "one.yml").write_text(_rule(3, 3, "dddd"))
    (targets / "two.yml").write_text(_rule(3, 3, "eeee"))
    link = rules / "c.yaml"
    link.symlink_to(".targets/one.yml")
    assert _url(load_rules(rules, cache=cache, git=False), 3).endswith("/dddd")
    # the target rewritten in place, same size, old mtime: the link's stat is its target's
    _same_size_restored_mtime(targets / "one.yml", _rule(3, 3, "ffff"))
    assert _url(load_rules(rules, cache=cache, git=False), 3).endswith("/ffff")
    # the link pointed at another file of the same size (another inode)
    link.unlink()
    link.symlink_to(".targets/two.yml")
    assert os.stat(link).st_ino != os.stat(targets / "one.yml").st_ino
    assert _url(load_rules(rules, cache=cache, git=False), 3).endswith("/eeee")
    reads.clear()
    load_rules(rules, cache=cache, git=False)
    assert reads == []  # and trusted again


def test_a_git_checkout_is_reloaded(tmp_path: Path, trusting: None) -> None:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    rules = _tree(tmp_path)

    def run(*args: str) -> None:
        subprocess.run(
            [git, "-C", str(rules), "-c", "user.name=t", "-c", "user.email=t@localhost", *args],
            check=True,
            capture_output=True,
        )

    run("init", "-q")
    run("add", ".")
    run("commit", "-q", "-m", "one")
    cache = ParseCache()
    assert _url(load_rules(rules, cache=cache), 1).endswith("/aaaa")
    (rules / "a.yaml").write_text(_rule(1, 1, "gggg"))
    run("commit", "-q", "-am", "two")
    assert _url(load_rules(rules, cache=cache), 1).endswith("/gggg")
    before = os.stat(rules / "a.yaml")
    _settle(rules / "a.yaml", lambda: run("checkout", "-q", "HEAD~1", "--", "a.yaml"))
    assert os.stat(rules / "a.yaml").st_size == before.st_size
    back = load_rules(rules, cache=cache)
    assert _url(back, 1).endswith("/aaaa")
    assert back.version.git_dirty


def test_a_deleted_then_readded_file(tmp_path: Path, reads: list[str], trusting: None) -> None:
    rules, cache = _tree(tmp_path), ParseCache()
    first = load_rules(rules, cache=cache, git=False)
    (rules / "b.yaml").unlink()
    gone = load_rules(rules, cache=cache, git=False)
    assert sorted(gone.postbacks) == [1]
    (rules / "b.yaml").write_text(_rule(2, 2, "hhhh"))
    back = load_rules(rules, cache=cache, git=False)
    assert sorted(back.postbacks) == [1, 2]
    assert _url(back, 2).endswith("/hhhh")
    # re-added with the first content: the first version again
    _settle(rules / "b.yaml", lambda: (rules / "b.yaml").write_text(_rule(2, 2)))
    again = load_rules(rules, cache=cache, git=False)
    assert again.version == first.version


def test_a_changed_listing_is_reloaded(tmp_path: Path, reads: list[str], trusting: None) -> None:
    rules, cache = _tree(tmp_path), ParseCache()
    load_rules(rules, cache=cache, git=False)
    (rules / "sub").mkdir()
    (rules / "sub" / "c.yaml").write_text(_rule(3, 3))
    assert sorted(load_rules(rules, cache=cache, git=False).postbacks) == [1, 2, 3]
    # renamed, same content: another path of the set
    os.rename(rules / "sub" / "c.yaml", rules / "sub" / "d.yaml")
    renamed = load_rules(rules, cache=cache, git=False)
    assert renamed.postbacks[3].file == "sub/d.yaml"
    # an ignored name added: nothing to read, the same set
    (rules / "notes.txt").write_text("not a rule")
    reads.clear()
    assert load_rules(rules, cache=cache, git=False).postbacks is renamed.postbacks
    assert reads == []


def test_a_broken_file_fails_every_reload_until_fixed(
    tmp_path: Path, reads: list[str], trusting: None
) -> None:
    rules, cache = _tree(tmp_path), ParseCache()
    load_rules(rules, cache=cache, git=False)
    _same_size_restored_mtime(rules / "a.yaml", _rule(1, 1, "aaaa").replace("offer", "ofxer"))
    for _ in range(2):
        with pytest.raises(RulesError):
            load_rules(rules, cache=cache, git=False)
    _same_size_restored_mtime(rules / "a.yaml", _rule(1, 1, "iiii"))
    assert _url(load_rules(rules, cache=cache, git=False), 1).endswith("/iiii")


def test_a_fresh_file_is_read_again_until_it_has_settled(tmp_path: Path, reads: list[str]) -> None:
    """With the real RACY_NS: a file changed just before a load may still change within the
    same time stamp; its stat is not trusted, so the next load reads it again."""
    rules, cache = _tree(tmp_path), ParseCache()
    first = load_rules(rules, cache=cache, git=False)
    reads.clear()
    again = load_rules(rules, cache=cache, git=False)
    assert sorted(reads) == ["a.yaml", "b.yaml"]
    assert again.postbacks is first.postbacks  # read and hashed: the same contents


def test_record_stats_trusts_only_settled_files() -> None:
    cache = ParseCache()
    cache.parse("a.yaml", b"")
    cache.parse("b.yaml", b"")
    now = time.time_ns()
    old = (1, 2, 0, now - 2 * loader.RACY_NS, now - 2 * loader.RACY_NS)
    recent_ctime = (1, 3, 0, now - 2 * loader.RACY_NS, now - loader.RACY_NS // 2)
    cache.record_stats({"a.yaml": old, "b.yaml": recent_ctime}, now)
    assert set(cache._stats) == {"a.yaml"}


def test_a_start_hashes_every_file(tmp_path: Path, reads: list[str], trusting: None) -> None:
    """The parsed-rules cache on disk holds no stat: a start reads and hashes every file, so a
    file changed while the daemon was down is never taken from a cache built from another
    content, whatever its stat."""
    rules, state = _tree(tmp_path), tmp_path / "state"
    cache = PersistentParseCache(state)
    load_rules(rules, cache=cache, git=False)
    cache.wait()
    _same_size_restored_mtime(rules / "a.yaml", _rule(1, 1, "jjjj"))
    reads.clear()
    restarted = PersistentParseCache(state)
    loaded = load_rules(rules, cache=restarted, git=False)
    assert sorted(reads) == ["a.yaml", "b.yaml"]
    assert _url(loaded, 1).endswith("/jjjj")


def test_the_fast_path_still_checks_secrets(tmp_path: Path, trusting: None) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "a.yaml").write_text(_rule(1, 1).replace("/aaaa", "/?k=${secret:TOKEN}"))
    cache = ParseCache()
    load_rules(rules, cache=cache, git=False, missing_secrets=lambda names: [])
    with pytest.raises(RulesError) as err:
        load_rules(rules, cache=cache, git=False, missing_secrets=lambda names: list(names))
    assert "secret 'TOKEN' does not resolve" in str(err.value.issues[0])


def test_another_root_forgets_the_stats(tmp_path: Path, reads: list[str], trusting: None) -> None:
    """The same cache over another folder (a swapped rules.d symlink) reads its files."""
    one, two = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    cache = ParseCache()
    load_rules(one, cache=cache, git=False)
    reads.clear()
    load_rules(two, cache=cache, git=False)
    assert sorted(reads) == ["a.yaml", "b.yaml"]
