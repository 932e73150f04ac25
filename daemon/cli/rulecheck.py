"""The catalogue and retired-id checks of `postbackd validate`, run on a planned edit before it
is written (so `rules add --goal sael` fails like validate would), and the retired-ids record
that `rules delete` appends to."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from daemon.catalogue import RETIRED_FILE, load_catalogue, load_retired, retire_text
from daemon.cli.ruletree import Plan, Tree, copy_rule_files
from daemon.errors import RulesError
from daemon.gitutil import GitError, git
from daemon.loader import load_rules
from daemon.rulelint import Findings, lint


def lint_plan(tree: Tree, plan: Plan, side: Mapping[str, str] | None = None) -> Findings:
    """Errors and warnings of the rules with the plan (and the side files: catalogue, retired
    ids) applied, for the postbacks it touches (a mistake elsewhere is validate's to report,
    not a reason to refuse this edit)."""
    with tempfile.TemporaryDirectory(prefix="postbackd-lint-") as tmp:
        copy = Path(tmp) / "rules"
        copy_rule_files(tree.root, copy)  # the loader's files only: odd entries are no crash
        for rel, text in {**plan.texts, **(side or {})}.items():
            target = copy / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(text.encode("utf-8"))
        try:
            catalogue = load_catalogue(copy)
            retired = load_retired(copy)
        except RulesError as err:
            return Findings(list(err.issues), [])
        try:
            rules = load_rules(copy, git=False)
        except RulesError:
            return Findings()  # check() reports why
    found = lint(rules, catalogue=catalogue, retired=retired)
    touched = set(plan.ids)
    return Findings(
        [i for i in found.errors if i.postback_id in touched or i.postback_id is None],
        [i for i in found.warnings if i.postback_id in touched],
    )


def who(root: Path) -> str:
    """git config user.email here, or nothing."""
    try:
        return git(root, "config", "user.email").strip()
    except GitError:
        return ""


def retired_text(tree: Tree, ids: list[int], now: datetime) -> str:
    """The retired-ids file with `ids` added (created when absent)."""
    path = tree.root / RETIRED_FILE
    current = path.read_text("utf-8") if path.is_file() else None
    return retire_text(current, ids, who(tree.root), now)
