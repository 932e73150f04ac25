"""What may not change between two versions of a rules tree (`validate --base GIT_REF`):
an existing postback keeps its action type, its offer, its created_at and its author."""

from __future__ import annotations

import io
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from daemon.errors import Issue
from daemon.gitutil import GitError, git, git_bytes
from daemon.loader import RuleSet, load_rules
from daemon.rules import Author, Postback


@contextmanager
def checkout_at(rules_dir: Path, ref: str) -> Iterator[Path]:
    """The rules directory as it was at `ref`, extracted into a temporary directory."""
    real = rules_dir.resolve()
    top = Path(git(real, "rev-parse", "--show-toplevel").strip())
    rel = real.relative_to(top).as_posix() if real != top else "."
    commit = git(top, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").strip()
    archive = git_bytes(top, "archive", "--format=tar", commit, "--", rel)
    with tempfile.TemporaryDirectory(prefix="postbackd-base-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp) / rel


@contextmanager
def base_at(rules_dir: Path, ref: str) -> Iterator[tuple[RuleSet, Path]]:
    """The rule set at `ref` and the checkout it was read from, for the files beside the rules
    (RulesError if it does not load, GitError if git cannot)."""
    with ExitStack() as stack:
        try:
            base_dir = stack.enter_context(checkout_at(rules_dir, ref))
            # An empty set when the rules directory did not exist yet.
            rules = load_rules(base_dir, git=False) if base_dir.is_dir() else RuleSet.empty()
        except ValueError as err:
            raise GitError(f"{ref}: {err}") from err
        yield rules, base_dir


def load_base(rules_dir: Path, ref: str) -> RuleSet:
    """Load the rule set at `ref` (RulesError if it does not load, GitError if git cannot)."""
    with base_at(rules_dir, ref) as (rules, _):
        return rules


def compare(current: RuleSet, base: RuleSet, ref: str) -> list[Issue]:
    """Issues for every change that an existing postback may not undergo."""
    issues = []
    for pid, lp in current.postbacks.items():
        old = base.postbacks.get(pid)
        if old is None:
            continue
        pb, before = lp.postback, old.postback
        if lp.offer != old.offer:
            issues.append(
                Issue(
                    lp.file,
                    lp.line,
                    f"id {pid} belongs to offer {old.offer} in "
                    f"{ref}; ids are never reused: use a new id",
                    pid,
                )
            )
        if _action_type(pb) != _action_type(before):
            issues.append(
                Issue(
                    lp.file,
                    lp.line,
                    f"action type changed from {before.action.type} "
                    f"to {pb.action.type}; the action of an existing postback cannot "
                    "change: create a new postback instead",
                    pid,
                )
            )
        if pb.created_at != before.created_at:
            issues.append(
                Issue(
                    lp.file, lp.line, f"created_at changed (was {before.created_at} in {ref})", pid
                )
            )
        if pb.author != before.author:
            issues.append(
                Issue(lp.file, lp.line, f"author changed (was {_who(before.author)} in {ref})", pid)
            )
    return issues


def _action_type(postback: Postback) -> str:
    return postback.action.type


def _who(author: Author | None) -> str:
    return "none" if author is None else f"{author.name} ({author.id})"


def new_without_origin(current: RuleSet, base: RuleSet, ref: str) -> list[Issue]:
    """A postback new since `ref` must say when it was made and by whom (`rules add` fills
    both)."""
    issues = []
    for pid, lp in current.postbacks.items():
        if pid in base.postbacks:
            continue
        missing = [
            key
            for key, value in (
                ("created_at", lp.postback.created_at),
                ("author", lp.postback.author),
            )
            if value is None
        ]
        if missing:
            issues.append(
                Issue(
                    lp.file,
                    lp.line,
                    f"new since {ref} without {' and '.join(missing)}: a new postback must carry "
                    "both (postbackd rules add fills them)",
                    pid,
                )
            )
    return issues
