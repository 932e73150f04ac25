"""The HTTP API (SPEC 12) in-process: bearer tokens, roles, who sees which postback and delivery,
retry and reload, and strict query parameters."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import ConfigError
from tests.harness import Daemon, Sink, start_daemon, wait_for

SINK_SECRET = "s3cr3t-sink-value"
ADMIN, AFF42, AFF43 = "admin-token-1", "aff42-token-2", "aff43-token-3"
ENV = {"POSTBACKD_SECRET_SINK_TOK": SINK_SECRET, "POSTBACKD_SECRET_API_AFF43": AFF43}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


TOKENS = [
    {"name": "ops", "token_sha256": sha(ADMIN), "role": "admin"},
    {"name": "aff42", "token_sha256": sha(AFF42), "role": "affiliate", "affiliate": 42},
    {"name": "aff43", "secret": "api_aff43", "role": "affiliate", "affiliate": "43"},
]


def rules(sink: Sink, bad: Sink) -> dict[str, str]:
    # A postback authored for an affiliate matches only that affiliate's conversions (issue 13).
    def pb(pid: int, author: str, url: str, extra: str = "", affiliate: str = "42") -> str:
        return f"""
              - id: {pid}
                trigger: conversion_done
                affiliate: "{affiliate}"
                created_at: 2026-11-01T10:00:00Z
                {author}
                action:
                  type: ping_url
                  url: "{url}?tx={{conversion_id}}&k=${{secret:sink_tok}}"
                  headers: {{Authorization: "Bearer ${{secret:sink_tok}}", X-Plain: "p-{pid}"}}
                {extra}"""

    return {
        "offer-7.yaml": "offer: 7\npostbacks:"
        + pb(
            101,
            "author: {id: 1, name: Ann, affiliate: 42}",
            f"{sink.url}/a42",
            'when: {"!=": [{"var": "sub1"}, "skip"]}',
        )
        + pb(102, "author: {id: 2, name: Bob, affiliate: 43}", f"{sink.url}/a43", affiliate="43")
        + pb(103, "author: {id: 3, name: Root}", f"{bad.url}/admin")
        + pb(104, "", f"{sink.url}/none"),
        "offer-8.yaml": "offer: 8\ngoals_enabled: true\npostbacks:"
        + pb(
            105,
            "author: {id: 1, name: Ann, affiliate: '42'}",
            "https://user:pw-in-url@tracker.example/pb",
            "status: disabled\n                goal: lead",
        ),
    }


@pytest.fixture
async def daemon(tmp_path: Path, sink: Sink) -> AsyncIterator[Daemon]:
    bad = await Sink().start()
    bad.script = [(400, "unknown offer", {})]  # the first attempt of 103 dies; a retry succeeds
    d = await start_daemon(
        tmp_path, rules(sink, bad), environ=ENV, settings={"api": {"tokens": TOKENS}}
    )
    d.bad = bad  # type: ignore[attr-defined]
    yield d
    await d.client.close()
    await bad.close()


async def call(
    d: Daemon, path: str, token: str | None, method: str = "GET", header: str | None = None
) -> tuple[int, Any, Any]:
    headers = {}
    if header is not None:
        headers["Authorization"] = header
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    resp = await d.client.request(method, path, headers=headers)
    body = await resp.json() if resp.content_type == "application/json" else await resp.text()
    return resp.status, body, resp.headers


async def approved(d: Daemon, cid: str, sink: Sink, *, expect: int) -> None:
    """Conversion `cid` of affiliate 42 (101, 103, 104 fire) and `cid`-43 of affiliate 43 (102)."""
    await d.post(conversion_id=cid, offer=7, affiliate=42, status="approved")
    await d.post(conversion_id=f"{cid}-43", offer=7, affiliate=43, status="approved")
    await wait_for(lambda: len(sink.received) >= expect)
    await d.services.dispatcher.drain()


ENDPOINTS = [
    ("GET", "/api/v1/postbacks"),
    ("GET", "/api/v1/postbacks/101"),
    ("GET", "/api/v1/deliveries"),
    ("GET", "/api/v1/deliveries/0123abcd"),
    ("POST", "/api/v1/deliveries/0123abcd/retry"),
    ("POST", "/api/v1/reload"),
    ("GET", "/api/v1/rules/status"),
]


async def test_missing_or_wrong_tokens_get_401_with_a_bearer_challenge(daemon: Daemon) -> None:
    for method, path in ENDPOINTS:
        status, body, headers = await call(daemon, path, None, method)
        assert status == 401, (method, path)
        assert headers["WWW-Authenticate"] == 'Bearer realm="postbackd"'
        assert body["error"].startswith("missing bearer token")
        for header in (f"Bearer {ADMIN}x", "Bearer " + sha(ADMIN), f"Basic {ADMIN}", "Bearer "):
            status, body, headers = await call(daemon, path, None, method, header=header)
            assert status == 401, (method, path, header)
            assert headers["WWW-Authenticate"].startswith('Bearer realm="postbackd"')
    status, body, headers = await call(daemon, "/api/v1/postbacks", "nope")
    assert headers["WWW-Authenticate"] == 'Bearer realm="postbackd", error="invalid_token"'
    assert body == {"error": "invalid token", "field": None}
    # The scheme is case-insensitive (RFC 9110); the token is not.
    assert (await call(daemon, "/api/v1/postbacks", None, header=f"bearer {ADMIN}"))[0] == 200
    assert (await call(daemon, "/api/v1/postbacks", ADMIN.upper()))[0] == 401


async def test_an_affiliate_sees_only_its_own_affiliates_postbacks(daemon: Daemon) -> None:
    async def ids(token: str, query: str = "") -> list[int]:
        status, body, _ = await call(daemon, f"/api/v1/postbacks{query}", token)
        assert status == 200
        return [row["id"] for row in body["postbacks"]]

    assert await ids(ADMIN) == [101, 102, 103, 104, 105]
    assert await ids(AFF42) == [101, 105]
    assert await ids(AFF43) == [102]
    assert await ids(AFF42, "?offer=8") == [105]
    assert await ids(AFF42, "?offer=7&status=active") == [101]
    assert await ids(AFF43, "?offer=8") == []
    assert await ids(ADMIN, "?status=disabled") == [105]
    for pid, who_sees in {101: (ADMIN, AFF42), 102: (ADMIN, AFF43), 103: (ADMIN,)}.items():
        for token in (ADMIN, AFF42, AFF43):
            status, body, _ = await call(daemon, f"/api/v1/postbacks/{pid}", token)
            assert status == (200 if token in who_sees else 404), (pid, token)
    for token in (AFF42, AFF43):  # an admin's, an unknown id and a malformed one look the same
        for pid in ("104", "999", "abc"):
            status, body, _ = await call(daemon, f"/api/v1/postbacks/{pid}", token)
            assert (status, body) == (404, {"error": f"no postback {pid}", "field": None})


async def test_postback_columns_with_secrets_masked(daemon: Daemon, sink: Sink) -> None:
    status, body, _ = await call(daemon, "/api/v1/postbacks/101", AFF42)
    assert status == 200
    assert body == {
        "id": 101,
        "offer": "7",
        "trigger": "conversion_done",
        "trigger_settings": {
            "affiliate": "42",
            "goal": None,
            "goal_evaluated": False,
            "when": {"!=": [{"var": "sub1"}, "skip"]},
        },
        "action": "ping_url",
        "action_settings": {
            "url": f"{sink.url}/a42?tx={{conversion_id}}&k=****",
            "headers": {"Authorization": "****", "X-Plain": "p-101"},
        },
        "status": "active",
        "created_at": "2026-11-01T10:00:00Z",
        "author": {"id": "1", "name": "Ann", "affiliate": "42"},
        "file": "offer-7.yaml",
        "line": 3,
        "status_reason": None,
        "source": "file",
        "updated_at": None,
    }
    status, body, _ = await call(daemon, "/api/v1/postbacks/105", ADMIN)
    assert body["trigger_settings"]["goal"] == "lead"
    assert body["trigger_settings"]["goal_evaluated"] is True
    assert body["action_settings"]["url"].startswith("https://user:****@tracker.example/pb?")
    assert body["status"] == "disabled"
    _, text, _ = await call(daemon, "/api/v1/postbacks", ADMIN)
    assert SINK_SECRET not in str(text)
    assert "pw-in-url" not in str(text)


async def test_an_affiliate_sees_only_deliveries_of_postbacks_it_sees(
    daemon: Daemon, sink: Sink
) -> None:
    await approved(daemon, "C1", sink, expect=3)  # 101, 102, 104 to the sink; 103 to `bad`
    rows = await daemon.deliveries()
    by_pid = {row.postback_id: row.delivery_id for row in rows}
    assert sorted(by_pid) == [101, 102, 103, 104]

    async def listed(token: str, query: str = "") -> list[int]:
        status, body, _ = await call(daemon, f"/api/v1/deliveries{query}", token)
        assert status == 200, body
        return sorted(row["postback_id"] for row in body["deliveries"])

    assert await listed(ADMIN) == [101, 102, 103, 104]
    assert await listed(AFF42) == [101]
    assert await listed(AFF43) == [102]
    assert await listed(AFF42, "?postback=102") == []
    assert await listed(AFF42, "?postback=101&conversion=C1&state=succeeded") == [101]
    assert await listed(ADMIN, "?state=dead") == [103]
    for pid, delivery_id in by_pid.items():
        for token, sees in ((ADMIN, True), (AFF42, pid == 101), (AFF43, pid == 102)):
            status, body, _ = await call(daemon, f"/api/v1/deliveries/{delivery_id}", token)
            assert status == (200 if sees else 404), (pid, token)
            if not sees:
                assert body == {"error": f"no delivery {delivery_id}", "field": None}

    status, body, _ = await call(daemon, f"/api/v1/deliveries/{by_pid[101]}", AFF42)
    assert body["state"] == "succeeded"
    assert body["idempotency_key"] == "generic:C1:1:101"
    (attempt,) = body["attempts"]
    assert attempt["outcome"] == "succeeded"
    assert attempt["response_status"] == 200
    assert attempt["request"]["url"].endswith("/a42?tx=C1&k=****")
    assert attempt["request"]["headers"]["Authorization"] == "****"
    _, text, _ = await call(daemon, f"/api/v1/deliveries/{by_pid[101]}", ADMIN)
    assert SINK_SECRET not in str(text)


async def test_deliveries_page_with_a_cursor(daemon: Daemon, sink: Sink) -> None:
    for n in range(3):
        await approved(daemon, f"P{n}", sink, expect=3 * (n + 1))

    async def pages(token: str) -> list[list[str]]:
        out, cursor = [], None
        while True:
            query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
            status, body, _ = await call(daemon, f"/api/v1/deliveries{query}", token)
            assert status == 200
            out.append([row["idempotency_key"] for row in body["deliveries"]])
            cursor = body["next_cursor"]
            if cursor is None:
                return out

    admin = await pages(ADMIN)
    assert [len(page) for page in admin] == [2, 2, 2, 2, 2, 2]
    assert len({key for page in admin for key in page}) == 12
    assert await pages(AFF42) == [
        ["generic:P2:1:101", "generic:P1:1:101"],
        ["generic:P0:1:101"],
    ]


async def test_affiliate_tokens_cannot_retry_or_reload(daemon: Daemon, sink: Sink) -> None:
    await approved(daemon, "R1", sink, expect=3)
    rows = {row.postback_id: row for row in await daemon.deliveries()}
    dead, done = rows[103].delivery_id, rows[101].delivery_id
    assert rows[103].state == "dead"
    for token in (AFF42, AFF43):
        for path in (f"/api/v1/deliveries/{dead}/retry", f"/api/v1/deliveries/{done}/retry"):
            status, body, _ = await call(daemon, path, token, "POST")
            assert (status, body) == (403, {"error": "this needs an admin token", "field": None})
        status, _, _ = await call(daemon, "/api/v1/reload", token, "POST")
        assert status == 403
    assert daemon.services.reloader.status.reloads_ok == 0
    assert (await daemon.services.store.get_delivery(dead)).delivery.state == "dead"  # type: ignore[union-attr]

    status, body, _ = await call(daemon, f"/api/v1/deliveries/{dead}/retry", ADMIN, "POST")
    assert (status, body) == (200, {"status": "queued", "delivery_id": dead})
    bad: Sink = daemon.bad  # type: ignore[attr-defined]
    await wait_for(lambda: len(bad.received) == 2)
    await daemon.services.dispatcher.drain()
    detail = await daemon.services.store.get_delivery(dead)
    assert detail is not None
    assert [a.outcome for a in detail.attempts] == ["dead", "succeeded"]
    assert bad.received[1].headers["Idempotency-Key"] == "generic:R1:1:103"

    status, body, _ = await call(daemon, f"/api/v1/deliveries/{done}/retry", ADMIN, "POST")
    assert status == 409
    assert "has succeeded" in body["error"]
    status, _, _ = await call(daemon, "/api/v1/deliveries/ffff0000/retry", ADMIN, "POST")
    assert status == 404


async def test_reload_and_rules_status(daemon: Daemon) -> None:
    status, body, _ = await call(daemon, "/api/v1/reload", ADMIN, "POST")
    assert status == 200
    assert body["last_reload_ok"] is True
    assert body["reloads_ok"] == 1
    assert body["postbacks"] == 5
    assert body["files"] == ["offer-7.yaml", "offer-8.yaml"]
    version = body["version"]

    (daemon.rules_dir / "broken.yaml").write_text("offer: 9\npostbacks:\n  - id: nope\n")
    status, body, _ = await call(daemon, "/api/v1/reload", ADMIN, "POST")
    assert status == 422
    assert body["last_reload_ok"] is False
    assert body["version"] == version  # the running set is kept
    assert body["last_error"]
    assert all(line.startswith("broken.yaml:3: ") for line in body["last_error"])

    status, body, _ = await call(daemon, "/api/v1/rules/status", ADMIN)
    assert status == 200
    assert body["last_reload_ok"] is False
    assert body["reloads_failed"] == 1
    assert body["last_error"][0].startswith("broken.yaml:3: ")
    status, body, _ = await call(daemon, "/api/v1/rules/status", AFF42)
    assert status == 200
    assert "files" not in body
    assert "last_error" not in body
    assert body["postbacks"] == 2
    assert body["version"] == version
    assert body["last_reload_ok"] is False


MALFORMED = [
    ("/api/v1/deliveries?state=bogus", "state"),
    ("/api/v1/deliveries?limit=0", "limit"),
    ("/api/v1/deliveries?limit=abc", "limit"),
    ("/api/v1/deliveries?limit=1001", "limit"),
    ("/api/v1/deliveries?limit=%D9%A3", "limit"),  # an Arabic-Indic digit: isdigit() but not ASCII
    ("/api/v1/deliveries?postback=-1", "postback"),
    ("/api/v1/deliveries?postback=99999999999999999999999", "postback"),
    ("/api/v1/deliveries?cursor=zzz", "cursor"),
    ("/api/v1/deliveries?cursor=9999999999999999999_ab", "cursor"),
    ("/api/v1/deliveries?conversion=a%00b", "conversion"),
    ("/api/v1/deliveries?conversion=" + "x" * 1025, "conversion"),
    ("/api/v1/deliveries?state=dead&state=queued", "state"),
    ("/api/v1/deliveries?colour=red", "colour"),
    ("/api/v1/postbacks?status=bogus", "status"),
    ("/api/v1/postbacks?offer=1%0A2", "offer"),
    ("/api/v1/postbacks/101?x=1", "x"),
    ("/api/v1/rules/status?verbose=1", "verbose"),
]


@pytest.mark.parametrize(("path", "field"), MALFORMED)
async def test_malformed_query_parameters_get_400(daemon: Daemon, path: str, field: str) -> None:
    for token in (ADMIN, AFF42):
        status, body, _ = await call(daemon, path, token)
        assert status == 400, body
        assert body["field"] == field
        assert body["error"]


async def test_odd_but_valid_parameters_are_no_error(daemon: Daemon) -> None:
    for path in (
        "/api/v1/deliveries?state=&limit=1000&postback=9223372036854775807",
        "/api/v1/deliveries?conversion=%F0%9F%98%80&state=dead&state=dead",
        "/api/v1/deliveries?cursor=0_a",
        "/api/v1/postbacks?offer=%FF%FE",
        "/api/v1/deliveries/" + "a" * 200,
    ):
        status, _, _ = await call(daemon, path, ADMIN)
        assert status in (200, 404), path


async def test_metrics_need_an_admin_token_when_not_public(tmp_path: Path, sink: Sink) -> None:
    settings = {"api": {"tokens": TOKENS, "metrics_public": False}}
    d = await start_daemon(tmp_path, rules(sink, sink), environ=ENV, settings=settings)
    try:
        assert (await call(d, "/metrics", None))[0] == 401
        assert (await call(d, "/metrics", "wrong"))[0] == 401
        assert (await call(d, "/metrics", AFF42))[0] == 403
        status, text, headers = await call(d, "/metrics", ADMIN)
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=")
        assert "postbackd_postbacks_loaded" in text
        # The dispatch process's metrics path keeps the same rule (this node has none: 404).
        assert (await call(d, "/metrics/dispatcher", None))[0] == 401
        assert (await call(d, "/metrics/dispatcher", AFF42))[0] == 403
        assert (await call(d, "/metrics/dispatcher", ADMIN))[0] == 404
        assert (await call(d, "/healthz", None))[0] == 200
    finally:
        await d.client.close()


async def test_a_token_secret_that_does_not_resolve_stops_the_start(
    tmp_path: Path, sink: Sink
) -> None:
    with pytest.raises(ConfigError) as caught:
        await start_daemon(
            tmp_path,
            {},
            environ={},
            settings={"api": {"tokens": TOKENS}},
        )
    message = str(caught.value)
    assert message.startswith("api.tokens: token aff43: secret api_aff43 is not set")
    assert AFF43 not in message


async def test_random_query_strings_never_get_a_5xx(daemon: Daemon) -> None:
    """A seeded fuzz over names, odd bytes, encodings and repeats: 200 or 400, never a 5xx."""
    rng = random.Random(20261127)
    names = ["state", "postback", "conversion", "limit", "cursor", "offer", "status", "x", ""]
    pieces = ["%00", "%FF", "%ED%A0%80", "%C3%A9", "%F0%9F%98%80", "%", "%2", "+", "%26", "%3D"]
    pieces += ["0", "1", "-1", "9" * 25, "dead", "active", "_", "abc", "=", "\u00e9", " "]
    for _ in range(300):
        params = []
        for _ in range(rng.randint(0, 4)):
            value = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 5)))
            params.append(f"{rng.choice(names)}={value}" if rng.random() < 0.9 else value)
        query = "&".join(params)
        for path in ("/api/v1/deliveries", "/api/v1/postbacks"):
            for token in (ADMIN, AFF42):
                status, body, _ = await call(daemon, f"{path}?{query}", token)
                assert status in (200, 400), (path, query, body)
