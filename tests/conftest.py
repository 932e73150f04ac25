"""Fixtures shared by every test module (see tests/harness.py for the helpers)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import structlog

from tests.harness import Sink, connect_tripwire


@pytest.fixture(autouse=True)
def _logging_as_a_new_process_has_it() -> Iterator[None]:
    """Every test ends with structlog as a new process has it (its defaults): a command run
    in-process sets its own logging (warnings and up, on stderr), which must not outlive the
    test, or the next one's capture_logs() would miss its info lines."""
    yield
    structlog.reset_defaults()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    yield s
    await s.close()


@pytest.fixture
async def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every connect attempt on this test's loop; non-loopback ones are refused unsent."""
    return connect_tripwire(monkeypatch)
