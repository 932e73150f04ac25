"""Helpers for the ops command tests: run `postbackd` in-process as a user would (one line per
error, exit codes), and make real git repositories of rules."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from click.testing import CliRunner

from daemon.cli import main

SOLAR = """\
# Offer 1234: residential solar leads.
offer: 1234
goals_enabled: true
postbacks:
  # Every affiliate's approved conversions go back to our tracker.
  - id: 101
    trigger: conversion_done
    affiliate: "*"
    status: active
    created_at: 2026-11-01T10:00:00Z
    author: {id: 7, name: Jane Doe}
    action:
      type: ping_url
      method: GET
      url: https://tracker.example.com/pb?cid={click_id}&payout={payout}&tx={conversion_id}

  # Affiliate 42 wants its sales over 5, as JSON with its API key.
  - id: 102
    trigger: conversion_done
    affiliate: 42
    goal: sale
    when: {">=": [{"var": "payout"}, 5]}   # only paying sales
    status: active
    created_at: 2026-11-02T09:30:00Z
    author: {id: 12, name: Sam Lee, affiliate: 42}
    action:
      type: ping_url
      method: POST
      url: https://api.partner-42.example.net/conversions
      headers:
        X-Api-Key: ${secret:partner_token}
      json:
        click_id: "{click_id}"
        amount: "{payout}"

  # Affiliate 42 also hears about rejections.
  - id: 103
    trigger: conversion_reject
    affiliate: 42
    status: active
    created_at: 2026-11-02T09:35:00Z
    author: {id: 12, name: Sam Lee, affiliate: 42}
    action:
      type: ping_url
      url: https://api.partner-42.example.net/reject?click={click_id}
# end of offer 1234
"""

INSURANCE = """\
offer: 501
postbacks:
  - id: 201
    trigger: conversion_done
    affiliate: "*"
    when:
      and:
        - in: [{var: sub1}, [facebook, tiktok]]
        - ">": [{var: payout}, 0]
    status: active
    created_at: 2026-10-20T08:00:00Z
    author: {id: 3, name: Ops Team}
    action:
      type: ping_url
      url: https://tracker.example.com/pb?cid={click_id}&src={sub1}
"""


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(*args: str, input: str | None = None) -> Result:
    """`postbackd ARGS` in-process, through the same entry point as the installed command."""
    runner = CliRunner()
    code = 0
    with runner.isolation(input=input) as (out, err, _):
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return Result(code, out.getvalue().decode(), err.getvalue().decode())


def on_a_terminal(args: list[str], typed: str) -> subprocess.CompletedProcess[str]:
    """`postbackd ARGS` in a subprocess with a real terminal (a pty) as stdin, typing `typed`."""
    master, slave = pty.openpty()
    try:
        os.write(master, typed.encode() + b"\n")  # the terminal buffers it until read
        return subprocess.run(
            [sys.executable, "-m", "daemon", *args],
            stdin=slave,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(slave)
        os.close(master)


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout


def make_repo(root: Path, files: Mapping[str, str]) -> Path:
    """A git repository at `root` whose `rules.d/` holds `files`, committed; returns rules.d."""
    rules = root / "rules.d"
    rules.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Repo Owner")
    git(root, "config", "user.email", "owner@example.com")
    git(root, "config", "commit.gpgsign", "false")
    write_files(rules, files)
    commit(root, "rules")
    return rules


def write_files(rules: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = rules / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def commit(root: Path, message: str) -> None:
    git(root, "add", "-A")
    git(root, "commit", "-q", "--allow-empty", "-m", message)


_CREATED = re.compile(r"created_at: (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")


def created_stamps(text: str, since: datetime) -> list[str]:
    """The created_at values written at or after `since` (checked to be from this run)."""
    stamps = []
    for found in _CREATED.findall(text):
        when = datetime.strptime(found, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        if when >= since.replace(microsecond=0):
            assert when <= datetime.now(UTC), found
            stamps.append(found)
    return stamps
