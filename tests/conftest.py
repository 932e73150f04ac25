"""Fixtures shared by every test module (see tests/harness.py for the helpers)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.harness import Sink, connect_tripwire


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    yield s
    await s.close()


@pytest.fixture
async def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every connect attempt on this test's loop; non-loopback ones are refused unsent."""
    return connect_tripwire(monkeypatch)
