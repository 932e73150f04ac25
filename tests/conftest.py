"""Fixtures shared by every test module (see tests/harness.py for the helpers)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.harness import Sink


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    yield s
    await s.close()
