"""An attempt's `{rand}` (daemon/actions/base.py AttemptValues): a new UUID for each attempt, the
same one wherever the attempt's templates read it, drawn only when something reads it."""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from daemon.actions.base import AttemptValues, Job
from daemon.store.base import DeliveryState
from tests.harness import FakeClock, Sink, start_daemon


def job(key: str = "generic:c1:1:1") -> Job:
    return Job.for_attempt(1, "d-1", key, {"conversion_id": "c1"}, {}, now=1_700_000_000.0)


def test_rand_is_drawn_when_first_read_and_kept_for_the_attempt() -> None:
    values = job().values
    assert isinstance(values, AttemptValues)
    assert "rand" not in values._values  # nothing read it yet: not drawn
    first = values["rand"]
    assert uuid.UUID(first).version == 4
    assert values.get("rand") == first == values["rand"]
    assert values["conversion_id"] == "c1"
    assert values.get("missing", "-") == "-"
    assert values.get("missing") is None


def test_each_attempt_gets_its_own_rand() -> None:
    assert job().values.get("rand") != job().values.get("rand")


def test_every_value_listed_includes_rand() -> None:
    values = job().values
    assert "rand" in values
    assert len(values) == len(dict(values))
    listed = dict(values)
    assert uuid.UUID(listed["rand"]).version == 4
    assert listed["rand"] == values["rand"]
    assert set(listed) == {
        "conversion_id",
        "postback_id",
        "delivery_id",
        "idempotency_key",
        "timestamp",
        "rand",
    }


def test_a_given_rand_is_used_as_is() -> None:
    given = Job.for_attempt(1, "d-1", "k", {}, {}, now=0.0, rand="r-1")
    assert given.values["rand"] == "r-1"


async def test_each_attempt_of_a_delivery_sends_a_new_rand(tmp_path: Path, sink: Sink) -> None:
    """Through the dispatcher: a URL and a header reading {rand}; the first attempt gets a 503
    and is retried. Each attempt sends one UUID in both places, and the two attempts differ."""
    clock = FakeClock()
    rules = {
        "o.yaml": f"""
offer: 1
postbacks:
  - id: 1
    trigger: conversion_done
    affiliate: 7
    action:
      type: ping_url
      url: "{sink.url}/p?r={{rand}}"
      headers: {{X-Rand: "{{rand}}"}}
"""
    }
    sink.script = [(503, "busy", {})]
    daemon = await start_daemon(tmp_path, rules, clock=clock, dispatch=False)
    dispatcher = daemon.services.dispatcher
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=7, status="approved")
        assert await dispatcher.dispatch_once() == 1
        await dispatcher.drain()
        clock.advance(3600)
        assert await dispatcher.dispatch_once() == 1
        await dispatcher.drain()
        [row] = await daemon.deliveries()
        assert (row.state, row.attempts) == (DeliveryState.SUCCEEDED, 2)
        sent = [
            (parse_qs(urlsplit(r.path_qs).query)["r"][0], r.headers["X-Rand"])
            for r in sink.received
        ]
        assert len(sent) == 2
        for in_url, in_header in sent:
            assert in_url == in_header
            assert uuid.UUID(in_url).version == 4
        assert sent[0][0] != sent[1][0]
    finally:
        await daemon.client.close()
