"""The bench's reading of how deliveries started (postbackd_deliveries_started_total)."""

from __future__ import annotations

import pytest

from bench.procs import _PACED, _STARTED, PACED, leased_share


def test_the_started_counters_are_read_from_the_metrics_text() -> None:
    text = (
        "# HELP postbackd_deliveries_started_total Deliveries ...\n"
        "# TYPE postbackd_deliveries_started_total counter\n"
        'postbackd_deliveries_started_total{via="claim"} 12.0\n'
        'postbackd_deliveries_started_total{via="lease_at_insert"} 1e+03\n'
        'postbackd_deliveries_total{action="ping_url",outcome="succeeded"} 5.0\n'
    )
    assert {via: float(n) for via, n in _STARTED.findall(text)} == {
        "claim": 12.0,
        "lease_at_insert": 1000.0,
    }


def test_the_paced_arrivals_are_read_from_the_metrics_text() -> None:
    text = (
        'postbackd_ingest_paced_total{released_by="turn"} 7.0\n'
        'postbackd_ingest_paced_total{released_by="max_hold"} 2.0\n'
        'postbackd_ingest_paced_created{released_by="turn"} 1.7e+09\n'
    )
    assert sum(float(n) for n in _PACED.findall(text)) == 9.0


@pytest.mark.parametrize(
    ("since", "now", "share"),
    [
        ({"claim": 10.0, "lease_at_insert": 5.0}, {"claim": 10.0, "lease_at_insert": 8.0}, 1.0),
        ({"claim": 0.0, "lease_at_insert": 0.0}, {"claim": 3.0, "lease_at_insert": 1.0}, 0.25),
        ({"claim": 4.0}, {"claim": 4.0, "lease_at_insert": 0.0}, None),  # none started
        ({}, {"claim": 2.0}, 0.0),
        # the paced arrivals read with them are not a way deliveries start
        ({"claim": 0.0, PACED: 0.0}, {"claim": 1.0, "lease_at_insert": 1.0, PACED: 40.0}, 0.5),
    ],
)
def test_the_leased_share_is_of_what_started_between_two_readings(
    since: dict[str, float], now: dict[str, float], share: float | None
) -> None:
    assert leased_share(since, now) == share
