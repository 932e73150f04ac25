"""Fixtures every action test may use (the helpers are in tests/actions/kit.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from daemon.outbound import OutboundHttp
from tests.actions.kit import loopback_http
from tests.harness import FakeClock


@pytest.fixture
async def http() -> AsyncIterator[OutboundHttp]:
    """The shared HTTP client, its guard open to loopback only; it resolves no name."""
    async with loopback_http() as client:
        yield client


@pytest.fixture
def clock() -> FakeClock:
    """The clock an action's resources read (kit.NOW until a test moves it)."""
    return FakeClock()
