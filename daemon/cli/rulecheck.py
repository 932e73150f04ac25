"""The catalogue and retired-id checks of `postbackd validate`, run on a planned edit before it
is written (so `rules add --goal sael` fails like validate would), and the retired-ids record
that `rules delete` appends to."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from daemon.catalogue import CATALOGUE_FILE, RETIRED_FILE, load_catalogue, load_retired, retire_text
from daemon.cli.ruletree import Plan, Tree
from daemon.errors import RulesError
from daemon.gitutil import GitError, git
from daemon.loader import RuleSet, read_capped
from daemon.rulelint import Findings, lint


def lint_plan(
    tree: Tree, plan: Plan, rules: RuleSet, side: Mapping[str, str] | None = None
) -> Findings:
    """Errors and warnings of `rules` (the rules with the plan applied, as check() loaded
    them) against the catalogue and retired ids with the side files applied, for the postbacks
    the plan touches (a mistake elsewhere is validate's to report, not a reason to refuse this
    edit)."""
    side = side or {}
    real = tree.root.resolve()
    with tempfile.TemporaryDirectory(prefix="postbackd-lint-") as tmp:
        copy = Path(tmp)
        for name in (CATALOGUE_FILE, RETIRED_FILE):
            data = side[name].encode("utf-8") if name in side else None
            if data is None and (real / name).exists():
                data = read_capped(real / name, name, [])  # copied as copy_rule_files would
            if data is not None:
                (copy / name).write_bytes(data)
        try:
            catalogue = load_catalogue(copy)
            retired = load_retired(copy)
        except RulesError as err:
            return Findings(list(err.issues), [])
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
