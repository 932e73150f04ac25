"""The fault suite's PostgreSQL: a server of its own (initdb into a temporary folder, its own
free port, pg_ctl run as the `postgres` user), started once per test session and shared by the
PostgreSQL faults, which stop, start and kill it. Never the shared server on 5432 that other
tests use at the same time. Each test gets a database of its own.

Missing binaries or no `postgres` user: the tests are skipped with the reason, unless
POSTBACKD_REQUIRE_PG=1, which turns that into a failure (as for the other PostgreSQL tests).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from tests.faults.support import STARTED, FaultSink
from tests.process_support import free_port

AS_POSTGRES = ("runuser", "-u", "postgres", "--")


@dataclass
class PgServer:
    bin: Path
    data: Path
    port: int

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _ctl(self, *args: str) -> None:
        command = [
            "runuser",
            "-u",
            "postgres",
            "--",
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
        ]
        done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"pg_ctl {' '.join(args)}: {done.stdout}{done.stderr}")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._ctl("-l", str(self.data / "server.log"), "-w", "-t", "60", "-o", options, "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "-t", "60", "stop")


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _problem() -> str | None:
    if _pg_bin() is None:
        return "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
    if shutil.which("runuser") is None:
        return "runuser is missing (pg_ctl must run as the postgres user)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user to run the server as"
    if os.geteuid() != 0:
        return "not root: cannot run pg_ctl as the postgres user"
    return None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    problem = _problem()
    if problem is not None:
        reason = f"fault suite: {problem}; POSTBACKD_REQUIRE_PG=1 makes this a failure"
        if os.environ.get("POSTBACKD_REQUIRE_PG") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    bin_dir = _pg_bin()
    assert bin_dir is not None
    folder = Path(tempfile.mkdtemp(prefix="postbackd-faults-pg-"))
    data = folder / "data"
    data.mkdir()
    user = pwd.getpwnam("postgres")
    for path in (folder, data):
        os.chown(path, user.pw_uid, user.pw_gid)
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-E", "UTF8", "--no-sync"]
    done = subprocess.run(
        [*AS_POSTGRES, *initdb],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise AssertionError(f"initdb: {done.stdout}{done.stderr}")
    server = PgServer(bin_dir, data, free_port())
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def pg_database(pg_server: PgServer) -> AsyncIterator[str]:
    """A DSN of a fresh database on the fault suite's server, dropped afterwards."""
    name = f"f_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server.admin_dsn, timeout=10)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    yield pg_server.dsn(name)
    admin = await asyncpg.connect(pg_server.admin_dsn, timeout=30)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def fault_sink() -> AsyncIterator[FaultSink]:
    sink = await FaultSink().start()
    yield sink
    await sink.close()


@pytest.fixture(autouse=True)
def stop_nodes_left_running() -> Iterator[None]:
    """A test that fails before it stops its nodes leaves no daemon running after it (it
    would hold its port and database, and load the machine for every test that follows)."""
    yield
    while STARTED:
        STARTED.pop().stop(timeout=10)
