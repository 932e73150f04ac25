"""Red team (issue 15): an affiliate evading the policy's deny_destinations. Every spelling of a
denied host is refused when the postback is written, and the list still holds when the request
is sent: a name that resolves into a denied CIDR, a redirect to a denied host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.store.base import DeliveryState
from tests.affiliates.kit import AFF_A, SETTINGS, Api, ping, rules
from tests.harness import Daemon, Sink, StubResolver, start_daemon


async def started(tmp_path: Path, sink: Sink, deny: str) -> Daemon:
    policy = f"actions: [ping_url]\nmax_postbacks: 50\ndeny_destinations: {deny}\n"
    resolver = StubResolver({"denied.example": ["127.0.0.1"], "innocent.example": ["127.0.0.1"]})
    return await start_daemon(
        tmp_path, rules(sink, policy), settings=SETTINGS, dispatch=False, resolver=resolver
    )


def to(sink: Sink, host: str, path: str = "x") -> dict[str, Any]:
    body = ping(sink)
    port = sink.url.rsplit(":", 1)[1]
    body["action"]["url"] = f"http://{host}:{port}/{path}?tx={{conversion_id}}"
    return body


SPELLINGS = [
    "2130706433",  # 127.0.0.1 as one decimal number
    "0x7f000001",
    "0177.0.0.1",  # octal
    "127.1",
    "127.000.000.001",
    "[::ffff:127.0.0.1]",  # IPv4-mapped
    "[::ffff:7f00:1]",
    "[64:ff9b::7f00:1]",  # NAT64
    "ｄｅｎｉｅｄ.example",  # fullwidth letters: IDNA maps them to denied.example
    "BÜCHER.example",  # the policy names it as bücher.example
]


async def test_no_spelling_of_a_denied_destination_is_accepted(tmp_path: Path, sink: Sink) -> None:
    daemon = await started(tmp_path, sink, '[denied.example, "bücher.example", 127.0.0.0/8]')
    try:
        api = Api(daemon)
        for host in SPELLINGS:
            status, answer = await api("POST", "/api/v1/postbacks", AFF_A, to(sink, host))
            assert status == 422, (host, answer)
            assert "deny_destinations" in answer["error"], host
        assert (await api("GET", "/api/v1/affiliate/limits", AFF_A))[1]["used"] == 0
    finally:
        await daemon.client.close()


async def fire(daemon: Daemon, conversion: str) -> None:
    await daemon.post(conversion_id=conversion, offer=7, affiliate=42, status="approved")
    await daemon.services.dispatcher.dispatch_once()
    await daemon.services.dispatcher.drain()


async def test_a_name_that_resolves_into_a_denied_cidr_is_refused_when_sent(
    tmp_path: Path, sink: Sink
) -> None:
    daemon = await started(tmp_path, sink, "[127.0.0.1/32]")
    try:
        made = await Api(daemon).create(AFF_A, to(sink, "innocent.example", "dns"))
        await fire(daemon, "c1")
        assert not [r for r in sink.received if r.path_qs.startswith("/dns")]
        [row] = await daemon.deliveries(postback_ids=[made["id"]])
        assert row.state is DeliveryState.DEAD
        assert row.last_reason == "guard_refused"
    finally:
        await daemon.client.close()


async def test_a_redirect_to_a_denied_host_is_not_followed(tmp_path: Path, sink: Sink) -> None:
    daemon = await started(tmp_path, sink, "[denied.example]")
    try:
        port = sink.url.rsplit(":", 1)[1]
        sink.script.append((302, "", {"Location": f"http://denied.example:{port}/leak"}))
        made = await Api(daemon).create(AFF_A, to(sink, "127.0.0.1", "hop"))
        await fire(daemon, "c1")
        assert [r.path_qs for r in sink.received] == ["/hop?tx=c1"]
        [row] = await daemon.deliveries(postback_ids=[made["id"]])
        assert (row.state, row.last_reason) == (DeliveryState.DEAD, "guard_refused")
    finally:
        await daemon.client.close()


async def test_no_macro_or_secret_can_choose_the_scheme_host_or_port(
    tmp_path: Path, sink: Sink
) -> None:
    daemon = await started(tmp_path, sink, "[denied.example]")
    try:
        api = Api(daemon)
        port = sink.url.rsplit(":", 1)[1]
        for url in (
            "http://{sub1}/x",
            "http://a{sub1}.example/x",
            "{sub1}/x",
            "http{sub1}://127.0.0.1/x",
            "http://127.0.0.1:{sub1}/x",
            "http://u@{sub1}/x",
            f"http://127.0.0.1:{port}@{{sub1}}/x",
            "http://${affiliate_secret:host}/x",
        ):
            body = ping(sink)
            body["action"]["url"] = url
            status, answer = await api("POST", "/api/v1/postbacks", AFF_A, body)
            assert status == 400, (url, answer)
            assert answer["field"] == "action.url", url
        assert (await api("GET", "/api/v1/affiliate/limits", AFF_A))[1]["used"] == 0
    finally:
        await daemon.client.close()
