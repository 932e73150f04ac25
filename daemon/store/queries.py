"""Named SQL queries and numbered migrations, read from the .sql files in daemon/store/sql/.

A queries file holds blocks that each start with a ``-- name: NAME`` line (the procrastinate
way): the SQL stays reviewable as SQL and the Python refers to it by name. Migrations are files
named ``{backend}_{NNNN}_{what}.sql``, applied in order and recorded by ``NNNN_what``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from daemon.log import get_logger

log = get_logger("postbackd.store")

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$")
_MIGRATION = re.compile(r"^(?P<backend>[a-z]+)_(?P<name>\d{4}_[a-z0-9_]+)\.sql$")


def _sql_dir() -> resources.abc.Traversable:
    return resources.files("daemon.store").joinpath("sql")


def parse_queries(text: str) -> dict[str, str]:
    """Split a queries file into {name: sql}; a name may appear only once."""
    queries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _NAME.match(line.strip())
        if match:
            name = match.group(1)
            if name in queries:
                raise ValueError(f"query {name!r} defined twice")
            current = queries[name] = []
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip().rstrip(";") for name, lines in queries.items()}


def load_queries(backend: str) -> dict[str, str]:
    return parse_queries(_sql_dir().joinpath(f"{backend}_queries.sql").read_text("utf-8"))


@dataclass(frozen=True)
class Migration:
    name: str  # "0001_initial": what the schema table records
    sql: str
    # A step SQL cannot say, run with the migrating connection in its transaction, before
    # `sql`'s statements (empty for such a step: daemon.store.sqlite_schema's rewrite of
    # CHECK constraints).
    run: Callable[[Any], None] | None = None


def load_migrations(backend: str) -> list[Migration]:
    """Every migration of `backend`, in order."""
    found: list[Migration] = []
    for entry in _sql_dir().iterdir():
        match = _MIGRATION.match(entry.name)
        if match and match.group("backend") == backend:
            found.append(Migration(match.group("name"), entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.name)


def log_migrated(applied: list[str]) -> None:
    """Say which migrations a store applied as it opened (`postbackd run` migrates at start,
    silently before): nothing when its schema was up to date."""
    if applied:
        log.info("store_migrated", migrations=applied)
