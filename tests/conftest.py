"""Fixtures shared by every test module (see tests/harness.py for the helpers)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog

from tests.harness import Sink, connect_tripwire


@pytest.fixture(autouse=True)
def _logging_as_a_new_process_has_it() -> Iterator[None]:
    """Every test ends with logging as a new process has it: structlog's defaults, no bound
    context variables, and the root logger's handlers and level as they were. A command run
    in-process, or configure_logging, sets its own (warnings and up, on stderr), which must not
    outlive the test, or the next one's capture_logs() would miss its info lines."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    yield s
    await s.close()


@pytest.fixture
async def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every connect attempt on this test's loop; non-loopback ones are refused unsent."""
    return connect_tripwire(monkeypatch)
