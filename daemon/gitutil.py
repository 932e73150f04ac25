"""The few git questions postbackd asks (rules version, `validate --base`, author names)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


class GitError(Exception):
    """git is missing, or the command failed; the message is git's first line of complaint."""


def git(cwd: str | Path, *args: str, timeout: float = 10.0) -> str:
    """Run git with fixed arguments in `cwd` and return its stdout."""
    return git_bytes(cwd, *args, timeout=timeout).decode("utf-8", "replace")


def work_tree_state(root: Path) -> tuple[str | None, bool]:
    """The commit of the work tree that holds `root` and whether `root` has local changes;
    (None, False) outside a work tree."""
    try:
        head = git(root, "rev-parse", "HEAD").strip()
        status = git(root, "status", "--porcelain", "--", ".")
    except GitError:
        return None, False
    return head or None, bool(status.strip())


def git_bytes(cwd: str | Path, *args: str, timeout: float = 30.0) -> bytes:
    """Run git with fixed arguments in `cwd` and return its raw stdout (`git archive`)."""
    exe = shutil.which("git")
    if exe is None:
        raise GitError("git is not installed")
    try:
        done = subprocess.run(  # noqa: S603 - fixed executable, arguments are not a shell line
            [exe, "-C", str(cwd), *args], capture_output=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise GitError(f"git {args[0]} failed: {err}") from err
    if done.returncode != 0:
        first = (done.stderr.decode("utf-8", "replace").strip().splitlines() or ["failed"])[0]
        raise GitError(f"git {args[0]}: {first}")
    return done.stdout
