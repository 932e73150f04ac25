"""`postbackd migrate`: apply the store's pending schema migrations and name them."""

from __future__ import annotations

from pathlib import Path

from daemon.store.factory import make_store


async def migrate(url: str, config_dir: Path) -> list[str]:
    """Apply every pending migration of the store at `url`; the names applied, in order.

    Safe to run while nodes are running or starting: migrations are serialised (SQLite write
    lock, PostgreSQL advisory lock) and each is applied once. Raises ConfigError for a bad URL
    and StoreError when the store cannot be reached or a migration fails.
    """
    return await make_store(url, config_dir=config_dir).migrate()
