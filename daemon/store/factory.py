"""Which store a `store:` URL names: SQLite (relative or absolute path) or PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from daemon.errors import ConfigError
from daemon.store.base import Store
from daemon.store.postgres import PostgresStore
from daemon.store.sqlite import SQLiteStore

_SQLITE = "sqlite:///"
_POSTGRES = ("postgresql://", "postgres://")
_EXPECTED = "expected sqlite:///relative/path, sqlite:////absolute/path or postgresql://..."


def sqlite_path(url: str, config_dir: Path) -> Path:
    """The database file a sqlite:/// URL names; relative paths start at `config_dir`."""
    rest = url[len(_SQLITE) :]
    if not rest or rest == "/" or "?" in rest or "#" in rest or rest.startswith("//"):
        raise ConfigError(f"store: not a SQLite file URL ({_EXPECTED})")
    if rest.startswith("/"):
        return Path(rest)
    return config_dir / rest


def open_store(url: str, *, config_dir: Path, create_dirs: bool = False) -> Store:
    """A store for `url`, not yet opened (``await store.open()`` connects and migrates).

    `create_dirs` (the daemon's start, not the CLI's) makes a SQLite file's missing folder, so
    that a fresh clone runs without preparing ./var. The URL is never echoed in errors: a
    PostgreSQL URL may carry a password.
    """
    if create_dirs and url.startswith(_SQLITE):
        path = sqlite_path(url, config_dir)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"store: cannot create {path.parent}: {err.strerror}") from err
    return make_store(url, config_dir=config_dir)


def make_store(url: str, *, config_dir: Path) -> SQLiteStore | PostgresStore:
    """open_store with the concrete type (for `migrate` and the backends' extras)."""
    if url.startswith(_SQLITE):
        return SQLiteStore(sqlite_path(url, config_dir))
    if url.startswith(_POSTGRES):
        parts = urlsplit(url)
        if not parts.hostname and not parts.path.strip("/") and not parts.query:
            raise ConfigError(f"store: PostgreSQL URL names no server or database ({_EXPECTED})")
        return PostgresStore(url)
    scheme = url.split(":", 1)[0] if ":" in url else ""
    if scheme in ("sqlite", "postgresql", "postgres"):
        raise ConfigError(f"store: malformed {scheme} URL ({_EXPECTED})")
    if scheme:
        raise ConfigError(f"store: unsupported scheme {scheme!r} ({_EXPECTED})")
    raise ConfigError(f"store: not a URL ({_EXPECTED})")
