"""The per-request counters increment their labelled children through the value's inc (what
the child's inc() calls after its checks): the exposition is what inc() would have made."""

from __future__ import annotations

import contextlib

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry, Counter, generate_latest

from daemon.metrics import Metrics, _inc_of
from daemon.models import Transition


def test_arrivals_count_as_inc_would() -> None:
    metrics = Metrics()
    reference = Counter(
        "postbackd_conversions", "x", ["source", "transition"], registry=CollectorRegistry()
    )
    for source, transition in [("a", Transition.NEW)] * 3 + [("b", "duplicate"), ("a", "stale")]:
        metrics.arrival(source, transition)
        reference.labels(source, str(transition)).inc()
    for labels, count in [(("a", "new"), 3), (("b", "duplicate"), 1), (("a", "stale"), 1)]:
        assert metrics.conversions.labels(*labels)._value.get() == count
        assert reference.labels(*labels)._value.get() == count
    text = generate_latest(metrics.registry).decode()
    assert 'postbackd_conversions_total{source="a",transition="new"} 3.0' in text
    assert 'postbackd_conversions_total{source="b",transition="duplicate"} 1.0' in text


async def test_requests_count_per_route_and_code() -> None:
    metrics = Metrics()
    app = web.Application()

    async def ok(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    async def gone(request: web.Request) -> web.StreamResponse:
        raise web.HTTPGone()

    app.router.add_get("/webhooks/{source}", ok)
    app.router.add_get("/gone", gone)
    counted = metrics.count(app._handle)  # what count_requests installs: routing, then handler
    for path, times in [("/webhooks/a", 4), ("/webhooks/b", 1), ("/gone", 2), ("/x/y", 1)]:
        for _ in range(times):
            with contextlib.suppress(web.HTTPGone, web.HTTPNotFound):
                await counted(make_mocked_request("GET", path, app=app))
    text = generate_latest(metrics.registry).decode()
    assert 'postbackd_http_requests_total{code="200",route="/webhooks/{source}"} 5.0' in text
    assert 'postbackd_http_requests_total{code="410",route="/gone"} 2.0' in text
    assert 'postbackd_http_requests_total{code="404",route="unmatched"} 1.0' in text


def test_inc_of_is_the_childs_inc() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "x", ["l"], registry=registry)
    inc = _inc_of(counter.labels("v"))
    inc(1)
    inc(1)
    counter.labels("v").inc()
    assert counter.labels("v")._value.get() == 3
    assert 'c_total{l="v"} 3.0' in generate_latest(registry).decode()

    class Plain:  # a counter without the value attribute keeps its own inc
        def __init__(self) -> None:
            self.n = 0.0

        def inc(self, amount: float = 1) -> None:
            self.n += amount

    plain = Plain()
    _inc_of(plain)(1)  # type: ignore[arg-type]
    assert plain.n == 1
