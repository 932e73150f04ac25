"""A hostile-input corpus on every write endpoint of the affiliate API (issue 15): oversized,
deep, wrong types, unknown keys, control characters, lone surrogates, malformed JSON. Every
answer is a 4xx, and nothing is written (the store's version and every listing are unchanged)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.affiliates.kit import ADMIN, AFF_A, SETTINGS, Api, ping, rules
from tests.harness import Daemon, Sink, start_daemon


@pytest.fixture
async def daemon(tmp_path: Path, sink: Sink) -> AsyncIterator[Daemon]:
    d = await start_daemon(tmp_path, rules(sink), settings=SETTINGS, dispatch=False)
    yield d
    await d.client.close()


def raw_bodies() -> list[bytes]:
    """Bodies that are not a JSON object of sane size and shape."""
    return [
        b"",
        b"not json",
        b"{",
        b'{"a": 1,}',
        b"[]",
        b'"text"',
        b"42",
        b"null",
        b"\xff\xfe{}",
        b'{"offer": NaN}',
        b'{"offer": Infinity}',
        b'{"offer": 7, "offer": 8}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 40 + b"1" + b"}" * 40,
        json.dumps({"offer": "x" * 70_000}).encode(),
        b'{"offer": "\\ud800"}',
    ]


def objects(sink: Sink) -> list[Any]:
    """JSON objects with bad fields for a postback write."""
    good = ping(sink)
    url = good["action"]["url"]
    return [
        {},
        {"unknown": 1},
        {**good, "unknown": 1},
        {**good, "id": 5},
        {**good, "author": {"id": 1, "name": "x"}},
        {**good, "created_at": "2020-01-01T00:00:00Z"},
        {**good, "offer": None},
        {**good, "offer": [7]},
        {**good, "offer": {"a": 1}},
        {**good, "offer": True},
        {**good, "offer": "7\x00"},
        {**good, "offer": "x" * 200},
        {**good, "trigger": "conversion_maybe"},
        {**good, "trigger": 5},
        {**good, "status": "paused"},
        {**good, "goal": {"a": 1}},
        {**good, "goal": "lead\r\nX-Injected: 1"},
        {**good, "when": {"no_such_op": [1]}},
        {**good, "retry": {"max_attempts": "many"}},
        {**good, "action": "ping_url"},
        {**good, "action": {"url": url}},
        {**good, "action": {"type": "no_such_action"}},
        {**good, "action": {"type": "ping_url", "url": "ftp://x/"}},
        {**good, "action": {"type": "ping_url", "url": url, "unknown": 1}},
        {**good, "action": {"type": "ping_url", "url": url + "\x07"}},
        {**good, "action": {"type": "ping_url", "url": url + "{no_such_macro}"}},
        {**good, "action": {"type": "ping_url", "url": "https://{click_id}.example/"}},
        {**good, "action": {"type": "ping_url", "url": url, "headers": [1, 2]}},
        {**good, "action": {"type": "ping_url", "url": "x" * 5000}},
        {
            **good,
            "action": {
                "type": "ping_url",
                "url": url,
                "headers": {str(i): "v" for i in range(300)},
            },
        },
    ]


async def snapshot(api: Api, daemon: Daemon) -> tuple[Any, ...]:
    changes = await daemon.services.store.affiliate_changes(0)
    return (
        changes.version,
        await api("GET", "/api/v1/postbacks", ADMIN),
        await api("GET", "/api/v1/affiliate/secrets", AFF_A),
    )


async def test_every_write_endpoint_answers_4xx_and_writes_nothing(
    daemon: Daemon, sink: Sink
) -> None:
    api = Api(daemon)
    existing = (await api.create(AFF_A, ping(sink)))["id"]
    await api("PUT", "/api/v1/affiliate/secrets/k", AFF_A, {"value": "v"})
    before = await snapshot(api, daemon)
    writes = [
        ("POST", "/api/v1/postbacks"),
        ("PATCH", f"/api/v1/postbacks/{existing}"),
        ("DELETE", f"/api/v1/postbacks/{existing}"),
        ("POST", f"/api/v1/postbacks/{existing}/status"),
        ("POST", "/api/v1/postbacks/duplicate"),
        ("PUT", "/api/v1/affiliate/secrets/k"),
    ]  # DELETE of a secret reads no body: its hostile inputs are the paths below
    seen: dict[int, int] = {}
    for method, path in writes:
        for token in (AFF_A, ADMIN):
            for raw in raw_bodies():
                status, body = await api(method, path, token, raw=raw)
                assert 400 <= status < 500, (method, path, raw[:60], status, body)
                seen[status] = seen.get(status, 0) + 1
            for obj in objects(sink):
                status, body = await api(method, path, token, obj)
                if method == "PATCH" and obj == {}:
                    assert status == 200  # a PATCH that changes nothing, and writes nothing
                    continue
                assert 400 <= status < 500, (method, path, obj, status, body)
            status, _ = await api(
                method, path, token, raw=b"{}", headers={"Content-Type": "text/plain"}
            )
            assert status in (400, 403, 404, 409, 415), (method, path)
    for bad_path in (
        "/api/v1/postbacks/%00",
        "/api/v1/postbacks/99999999999999999999999",
        "/api/v1/postbacks/-1",
        "/api/v1/postbacks/1e9",
        "/api/v1/postbacks/%C2%B2",
        "/api/v1/affiliate/secrets/..",
        "/api/v1/affiliate/secrets/" + "n" * 300,
        "/api/v1/affiliate/secrets/a%0Ab",
    ):
        for method in ("PATCH", "DELETE", "PUT", "POST"):
            status, _ = await api(method, bad_path, AFF_A, {"value": "v", "confirm": 1})
            assert 400 <= status < 500, (method, bad_path, status)
    for value in ("", 5, None, ["v"], "v\x00", "x" * 5000, "\ud800"):
        status, _ = await api("PUT", "/api/v1/affiliate/secrets/k2", AFF_A, {"value": value})
        assert status == 400, value
    assert await snapshot(api, daemon) == before
    assert 413 in seen
    assert 400 in seen


async def test_a_body_near_the_limit_is_read_whole(daemon: Daemon, sink: Sink) -> None:
    api = Api(daemon)
    text = json.dumps(ping(sink))
    padded = (text[:-1] + " " * (64 * 1024 - len(text)) + "}").encode()
    assert len(padded) == 64 * 1024
    status, body = await api("POST", "/api/v1/postbacks", AFF_A, raw=padded)
    assert status == 201, body
    status, body = await api("POST", "/api/v1/postbacks", AFF_A, raw=padded[:-1] + b" }")
    assert status == 413
    assert body == {"error": "the body is larger than 64 KiB", "field": None}
