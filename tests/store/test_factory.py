"""open_store: which store a `store:` URL names, and the errors for those it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.store.factory import open_store
from daemon.store.postgres import PostgresStore
from daemon.store.sqlite import SQLiteStore


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///../var/postbackd.db", Path("/etc/postbackd/../var/postbackd.db")),
        ("sqlite:///postbackd.db", Path("/etc/postbackd/postbackd.db")),
        ("sqlite:////var/lib/postbackd/pb.db", Path("/var/lib/postbackd/pb.db")),
    ],
)
def test_sqlite_urls(url: str, expected: Path) -> None:
    store = open_store(url, config_dir=Path("/etc/postbackd"))

    assert isinstance(store, SQLiteStore)
    assert store.path == expected


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postbackd@db.internal/postbackd",
        "postgresql://u:pw@127.0.0.1:5433/pb?sslmode=require",
        "postgres://postbackd@/postbackd?host=/run/postgresql",
    ],
)
def test_postgresql_urls(url: str) -> None:
    assert isinstance(open_store(url, config_dir=Path("/etc")), PostgresStore)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://root:hunter2@db/pb", "store: unsupported scheme 'mysql' (expected sqlite:///"),
        ("sqlite://relative.db", "store: malformed sqlite URL"),
        ("sqlite:///", "store: not a SQLite file URL"),
        ("sqlite:////", "store: not a SQLite file URL"),
        ("sqlite:///pb.db?mode=ro", "store: not a SQLite file URL"),
        ("sqlite:///:memory:x#frag", "store: not a SQLite file URL"),
        ("postgresql://", "store: PostgreSQL URL names no server or database"),
        ("postgresql:/db", "store: malformed postgresql URL"),
        ("/var/lib/pb.db", "store: not a URL"),
        ("", "store: not a URL"),
    ],
)
def test_bad_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_store(url, config_dir=Path("/etc"))

    assert str(caught.value).startswith(message)
    assert "hunter2" not in str(caught.value)


def test_the_daemon_creates_a_missing_sqlite_folder_the_cli_does_not(tmp_path: Path) -> None:

    open_store("sqlite:///var/x.db", config_dir=tmp_path)
    assert not (tmp_path / "var").exists()
    open_store("sqlite:///var/x.db", config_dir=tmp_path, create_dirs=True)
    assert (tmp_path / "var").is_dir()
