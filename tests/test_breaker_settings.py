"""The breaker and fair-use settings (outbound.breaker, delivery.per_affiliate_in_flight):
defaults, the file, the environment, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.hosts import Destinations
from daemon.settings import load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "postbackd.yaml"
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""), {})
    b = s.outbound.breaker
    assert (b.threshold, b.first_pause, b.growth, b.max_pause) == (5, 5.0, 2.0, 60.0)
    assert s.delivery.per_affiliate_in_flight == 64
    d = Destinations.from_settings(s, lambda: 0.0)
    assert (d.policy.threshold, d.policy.max_pause, d.hold_safety) == (5, 60.0, 120.0)


def test_the_shipped_config_states_the_defaults() -> None:
    path = Path(__file__).parent.parent / "config" / "postbackd.yaml"
    assert load_settings(path, {}).outbound.breaker == load_settings(None, {}).outbound.breaker


def test_file_and_environment(tmp_path: Path) -> None:
    text = "outbound:\n  breaker: {threshold: 3, first_pause: 2s, growth: 1.5, max_pause: 5m}\n"
    s = load_settings(write(tmp_path, text), {})
    b = s.outbound.breaker
    assert (b.threshold, b.first_pause, b.growth, b.max_pause) == (3, 2.0, 1.5, 300.0)
    env = {"POSTBACKD_OUTBOUND": "{breaker: {first_pause: 1s}}"}
    assert load_settings(None, env).outbound.breaker.first_pause == 1.0
    env = {"POSTBACKD_DELIVERY": "{per_affiliate_in_flight: 3}"}
    assert load_settings(None, env).delivery.per_affiliate_in_flight == 3


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ("outbound:\n  breaker: {threshold: 0}\n", "outbound.breaker.threshold"),
        ("outbound:\n  breaker: {threshold: five}\n", "outbound.breaker.threshold"),
        ("outbound:\n  breaker: {threshold: 99999999999999999999}\n", "outbound.breaker.threshold"),
        ("outbound:\n  breaker: {first_pause: -1s}\n", "outbound.breaker.first_pause"),
        ("outbound:\n  breaker: {first_pause: soon}\n", "is not a duration"),
        ("outbound:\n  breaker: {growth: 0.5}\n", "outbound.breaker.growth"),
        ("outbound:\n  breaker: {growth: [2]}\n", "outbound.breaker.growth"),
        ("outbound:\n  breaker: {max_pause: 2d}\n", "outbound.breaker.max_pause"),
        (
            "outbound:\n  breaker: {first_pause: 30s, max_pause: 10s}\n",
            "max_pause must not be shorter than breaker.first_pause",
        ),
        ("outbound:\n  breaker: {pause: 5s}\n", "pause"),
        ("outbound:\n  breaker: on\n", "outbound.breaker"),
        ('outbound:\n  breaker: {threshold: "5\\u0000"}\n', "outbound.breaker.threshold"),
        ("delivery: {per_affiliate_in_flight: 0}\n", "delivery.per_affiliate_in_flight"),
        ("delivery: {per_affiliate_in_flight: lots}\n", "delivery.per_affiliate_in_flight"),
    ],
)
def test_bad_values_are_refused_with_the_key(tmp_path: Path, text: str, wanted: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), {})
    assert wanted in str(caught.value)
    assert "\x00" not in str(caught.value)
