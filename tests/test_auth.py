"""Who may post to a source: tokens, Standard Webhooks signatures, HTTP basic, allow_ips behind
trusted proxies, rate limits, and secrets looked up per request (SPEC 6)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from daemon.auth import (
    AccessPolicy,
    Inbound,
    RateLimit,
    RateLimiter,
    ReplayCache,
    StandardWebhooksCredentials,
    Unauthorized,
    parse_address,
    parse_signatures,
    sign,
    signing_key,
)
from daemon.errors import ForbiddenError, RulesError, SecretError
from tests.harness import Daemon, FakeClock, start_daemon
from tests.test_ingest import stored

OK = {"conversion_id": "A1", "offer": "7", "affiliate": "42", "status": "approved"}
OLD_KEY, NEW_KEY = b"o" * 24, b"n" * 24
NOW = 1_790_000_000


def whsec(key: bytes) -> str:
    return "whsec_" + base64.b64encode(key).decode()


async def start(
    tmp_path: Path,
    sources: dict[str, str],
    secrets: dict[str, str] | None = None,
    **kw: Any,
) -> Daemon:
    hooks = tmp_path / "webhooks"
    hooks.mkdir(exist_ok=True)
    for name, text in sources.items():
        (hooks / name).write_text(text)
    folder = tmp_path / "secrets"
    folder.mkdir(exist_ok=True)
    for name, value in (secrets or {}).items():
        (folder / name).write_text(value + "\n")
    conf = {"secrets_dir": str(folder), **kw.pop("settings", {})}
    return await start_daemon(tmp_path, {}, dispatch=False, settings=conf, **kw)


async def get(
    daemon: Daemon, source: str, headers: dict[str, str] | None = None, **params: str
) -> tuple[int, Any, Any]:
    resp = await daemon.client.get(
        f"/webhooks/{source}", params={**OK, **params}, headers=headers or {}
    )
    return resp.status, await resp.json(), resp.headers


def err(message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": message, "field": field}


# --- tokens and basic ------------------------------------------------------------------------


async def test_token_in_a_parameter_or_the_header_never_stored(tmp_path: Path) -> None:
    daemon = await start(
        tmp_path,
        {"t.yaml": "auth: {token: {param: key, secret: t_token}}\n"},
        {"t_token": "right"},
    )
    try:
        assert (await get(daemon, "t", key="right"))[0] == 200
        assert (await get(daemon, "t", {"X-Postback-Token": "right"}, conversion_id="A2"))[0] == 200
        assert (await get(daemon, "t", key="wrong"))[:2] == (401, err("invalid credentials", "key"))
        assert (await get(daemon, "t"))[:2] == (401, err("missing credentials", "key"))
        # the header, when present, is the credential
        found = await get(daemon, "t", {"X-Postback-Token": "wrong"}, key="right")
        assert found[:2] == (401, err("invalid credentials", "key"))
        row = await daemon.services.store.get_conversion("t", "A1")
        assert row is not None
        assert "key" not in row.fields
        assert "extra" not in row.fields  # the token went nowhere
        (tmp_path / "secrets" / "t_token").write_text("rotated")  # takes effect at once
        assert (await get(daemon, "t", key="right", conversion_id="A3"))[0] == 401
        assert (await get(daemon, "t", key="rotated", conversion_id="A3"))[0] == 200
    finally:
        await daemon.client.close()


async def test_token_only_in_the_header(tmp_path: Path) -> None:
    daemon = await start(
        tmp_path, {"h.yaml": "auth: {token: {secret: h_token}}\n"}, {"h_token": "tok"}
    )
    try:
        assert (await get(daemon, "h", key="tok"))[:2] == (
            401,
            err("missing credentials", "X-Postback-Token"),
        )
        assert (await get(daemon, "h", {"X-Postback-Token": "tok"}, key="tok"))[0] == 200
        row = await daemon.services.store.get_conversion("h", "A1")
        assert row is not None
        assert row.fields["extra"] == {"key": "tok"}  # not a credential of this source
    finally:
        await daemon.client.close()


async def test_http_basic(tmp_path: Path) -> None:
    daemon = await start(
        tmp_path,
        {"b.yaml": "auth: {basic: {username: tracker, secret: b_pass}}\nresponse: text\n"},
        {"b_pass": "pa:ss"},
    )

    def basic(user: str, password: str) -> dict[str, str]:
        return {
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        }

    async def status(headers: dict[str, str]) -> tuple[int, str, str | None]:
        resp = await daemon.client.get("/webhooks/b", params=OK, headers=headers)
        return resp.status, await resp.text(), resp.headers.get("WWW-Authenticate")

    challenge = 'Basic realm="postbackd", charset="UTF-8"'
    try:
        assert await status(basic("tracker", "pa:ss")) == (200, "OK", None)
        assert await status(basic("tracker", "wrong")) == (
            401,
            "ERROR invalid credentials",
            challenge,
        )
        assert await status(basic("other", "pa:ss")) == (
            401,
            "ERROR invalid credentials",
            challenge,
        )
        assert await status({}) == (401, "ERROR missing credentials", challenge)
        for header in ("Basic !!!", "Bearer abc", "Basic " + base64.b64encode(b"nocolon").decode()):
            found = await status({"Authorization": header})
            assert found[0] == 401
            assert found[2] == challenge
    finally:
        await daemon.client.close()


# --- Standard Webhooks ------------------------------------------------------------------------


def signed_headers(msg_id: str, stamp: int, body: bytes, *keys: bytes) -> dict[str, str]:
    signatures = " ".join(sign(key, msg_id, str(stamp), body) for key in keys)
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": signatures,
    }


async def test_standard_webhooks_key_rotation_on_both_sides(tmp_path: Path) -> None:
    daemon = await start(
        tmp_path,
        {"s.yaml": "auth: {hmac: {secrets: [new_key, old_key]}}\n"},
        {"new_key": whsec(NEW_KEY), "old_key": whsec(OLD_KEY)},
        clock=FakeClock(NOW),
    )

    async def post(msg_id: str, *keys: bytes, signature: str | None = None) -> tuple[int, Any]:
        fields = {"conversion_id": msg_id, "offer": 7, "affiliate": 42, "status": "pending"}
        body = json.dumps(fields).encode()
        headers = signed_headers(msg_id, NOW, body, *keys)
        if signature is not None:
            headers["webhook-signature"] = signature
        resp = await daemon.client.post("/webhooks/s", data=body, headers=headers)
        return resp.status, await resp.json()

    try:
        assert (await post("m1", NEW_KEY))[0] == 200  # our current key
        assert (await post("m2", OLD_KEY))[0] == 200  # the sender has not rotated yet
        wrong = b"w" * 24
        assert (await post("m3", wrong, NEW_KEY))[0] == 200  # the sender signs with two keys
        assert await post("m4", wrong) == (401, err("no valid signature", "webhook-signature"))
        assert await post("m5", signature="v1a,AAAA v2,BBBB") == (
            401,
            err("no v1 signature in webhook-signature", "webhook-signature"),
        )
        assert stored(tmp_path) == (3, 3)
    finally:
        await daemon.client.close()


async def test_replay_refused_across_a_reload(tmp_path: Path) -> None:
    daemon = await start(
        tmp_path,
        {"s.yaml": "auth: {hmac: {secret: key}}\n"},
        {"key": whsec(NEW_KEY)},
        clock=FakeClock(NOW),
    )
    body = b'{"conversion_id": "R1", "offer": 7, "affiliate": 42, "status": "pending"}'
    headers = signed_headers("msg_r", NOW, body, NEW_KEY)
    try:
        assert (await daemon.client.post("/webhooks/s", data=body, headers=headers)).status == 200
        assert await daemon.services.reloader.reload("test")
        resp = await daemon.client.post("/webhooks/s", data=body, headers=headers)
        assert resp.status == 401
        assert await resp.json() == err("webhook-id already accepted (replay)", "webhook-id")
    finally:
        await daemon.client.close()


def test_signature_of_the_standard_webhooks_example() -> None:
    """The example of the Standard Webhooks specification and its reference libraries."""
    key = signing_key("example", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", body) == expected
    replay = ReplayCache()
    creds = StandardWebhooksCredentials("ex", ("example",), replay)
    headers = CIMultiDictProxy(
        CIMultiDict(
            {
                "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
                "webhook-timestamp": "1614265330",
                "webhook-signature": f"v1,bm9wZQ== {expected}",
            }
        )
    )
    secret = {"example": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}.__getitem__
    ticket = creds.verify(Inbound(headers, {}, body), secret, 1614265330 + 299)
    assert ticket is not None
    assert len(replay) == 1
    ticket.release()
    assert len(replay) == 0


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("v1garbage", "malformed webhook-signature header"),
        ("v1,", "malformed webhook-signature header"),
        (",AAAA", "malformed webhook-signature header"),
        ("v1,AAAA v1,%%%", "malformed webhook-signature header"),
        (" ".join(["v1,AAAA"] * 17), "malformed webhook-signature header"),
        ("v2,AAAA", "no v1 signature in webhook-signature"),
    ],
)
def test_malformed_signature_headers(header: str, message: str) -> None:
    with pytest.raises(Unauthorized) as caught:
        parse_signatures(header)
    assert caught.value.message == message
    assert caught.value.status == 401


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "secret k is not a Standard Webhooks secret (whsec_<base64>)"),
        ("whsec_", "secret k is empty after whsec_"),
        ("whsec_***", "secret k is not whsec_ followed by base64"),
    ],
)
def test_signing_keys_must_be_whsec_base64(value: str, message: str) -> None:
    assert signing_key("k", whsec(b"abc")) == b"abc"
    with pytest.raises(SecretError) as caught:
        signing_key("k", value)
    assert str(caught.value) == message  # names the secret, never its value


def test_replay_cache_forgets_after_expiry_and_bounds_its_size() -> None:
    cache = ReplayCache(capacity=3)
    assert cache.reserve(("s", "a"), expires=100, now=0) is not None
    assert cache.reserve(("s", "a"), expires=100, now=50) is None  # a replay
    assert cache.reserve(("t", "a"), expires=100, now=50) is not None  # another source
    assert cache.reserve(("s", "a"), expires=200, now=100) is not None  # expired: forgotten
    cache.reserve(("s", "b"), expires=150, now=100)
    cache.reserve(("s", "c"), expires=300, now=100)
    assert len(cache) == 3
    assert cache.reserve(("s", "d"), expires=500, now=100) is not None  # full: b goes
    assert len(cache) == 3
    assert cache.reserve(("s", "c"), expires=300, now=100) is None
    assert cache.reserve(("s", "b"), expires=150, now=100) is not None  # forgotten


# --- addresses and proxies -------------------------------------------------------------------


async def test_allow_ips_with_and_without_trusted_proxies(tmp_path: Path) -> None:
    daemon = await start(
        tmp_path,
        {
            "direct.yaml": "allow_ips: [198.51.100.0/24]\ntrusted_proxies: []\n",
            "local.yaml": "allow_ips: [127.0.0.1/32, '::1/128']\ntrusted_proxies: []\n",
            "behind.yaml": "allow_ips: [198.51.100.0/24]\ntrusted_proxies: [127.0.0.0/8]\n",
            "global.yaml": "allow_ips: [198.51.100.0/24]\n",
        },
        settings={"inbound": {"trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]}},
    )
    xff = "X-Forwarded-For"
    try:
        # without a trusted proxy, X-Forwarded-For is not believed
        found = await get(daemon, "direct", {xff: "198.51.100.7"})
        assert found[:2] == (403, err("client address 127.0.0.1 is not allowed"))
        assert (await get(daemon, "local", {xff: "203.0.113.1"}))[0] == 200
        # behind a trusted proxy, the nearest untrusted hop is the client
        assert (await get(daemon, "behind", {xff: "198.51.100.7"}, conversion_id="B1"))[0] == 200
        found = await get(daemon, "behind", {xff: "198.51.100.7, 10.1.2.3"})
        assert found[:2] == (403, err("client address 10.1.2.3 is not allowed"))
        found = await get(daemon, "behind", {xff: "unknown"})
        assert found[:2] == (403, err("client address cannot be determined"))
        # the top-level inbound.trusted_proxies: both proxies of the chain are ours
        found = await get(daemon, "global", {xff: "198.51.100.7, 10.1.2.3"}, conversion_id="B2")
        assert found[0] == 200
        found = await get(daemon, "global", {xff: "198.51.100.7:4711"}, conversion_id="B3")
        assert found[0] == 200
        assert stored(tmp_path) == (4, 4)
    finally:
        await daemon.client.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("198.51.100.7:8080", "198.51.100.7"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        (" 198.51.100.7 ", "198.51.100.7"),
        ("unknown", None),
        ("[2001:db8::1", None),
        ("", None),
    ],
)
def test_addresses_as_peers_and_proxies_write_them(text: str, expected: str | None) -> None:
    found = parse_address(text)
    assert (str(found) if found else None) == expected


def test_a_client_that_cannot_be_placed_is_refused() -> None:
    import ipaddress

    policy = AccessPolicy(
        allow=(ipaddress.ip_network("198.51.100.0/24"),),
        trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
    )
    policy.check("127.0.0.1", ["198.51.100.1"])
    policy.check("198.51.100.2", [])
    with pytest.raises(ForbiddenError):
        policy.check(None, [])
    with pytest.raises(ForbiddenError):
        policy.check("127.0.0.1", ["198.51.100.1, garbage"])
    with pytest.raises(ForbiddenError):
        policy.check("127.0.0.1", [])  # the proxy itself is not an allowed client


def test_access_decisions_are_kept_per_request_shape_never_across_addresses() -> None:
    import ipaddress

    net = ipaddress.ip_network
    policy = AccessPolicy(allow=(net("198.51.100.0/24"),), trusted_proxies=(net("127.0.0.0/8"),))
    for _ in range(2):  # the second round is answered from the policy's kept decisions
        policy.check("198.51.100.2", [])
        with pytest.raises(ForbiddenError, match=r"client address 203.0.113.9 is not allowed"):
            policy.check("203.0.113.9", [])
        # the same proxy, a different X-Forwarded-For: decided on its own
        policy.check("127.0.0.1", ["198.51.100.1"])
        with pytest.raises(ForbiddenError, match=r"client address 203.0.113.1 is not allowed"):
            policy.check("127.0.0.1", ["203.0.113.1"])
        with pytest.raises(ForbiddenError, match=r"client address 203.0.113.1 is not allowed"):
            policy.check("127.0.0.1", ["198.51.100.1", "203.0.113.1"])  # two header lines
        with pytest.raises(ForbiddenError, match="cannot be determined"):
            policy.check("127.0.0.1", ["198.51.100.1, garbage"])
    local = AccessPolicy(loopback_only=True)
    for _ in range(2):
        local.check("127.0.0.1", [])
        with pytest.raises(ForbiddenError, match="not requests a web browser makes"):
            local.check("127.0.0.1", [], from_browser=True)
        with pytest.raises(ForbiddenError, match="through a proxy that is not in trusted"):
            local.check("127.0.0.1", [], relayed=True)
        with pytest.raises(ForbiddenError, match="loopback clients only"):
            local.check("198.51.100.2", [])
    # a policy changed by a reload is another object: nothing decided before carries over
    import dataclasses

    changed = dataclasses.replace(policy, allow=(net("203.0.113.0/24"),))
    with pytest.raises(ForbiddenError, match=r"client address 198.51.100.2 is not allowed"):
        changed.check("198.51.100.2", [])
    changed.check("203.0.113.9", [])
    policy.check("198.51.100.2", [])  # the old policy still decides as it did


def test_access_decisions_kept_are_bounded() -> None:
    import ipaddress

    from daemon.auth import ACCESS_CACHE_HOPS, ACCESS_CACHE_SIZE

    policy = AccessPolicy(
        allow=(ipaddress.ip_network("10.0.0.0/8"),),
        trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
    )
    for n in range(ACCESS_CACHE_SIZE + 10):
        policy.check(f"10.0.{n // 256}.{n % 256}", [])
        assert len(policy._decisions) <= ACCESS_CACHE_SIZE
    policy._decisions.clear()
    long_chain = ", ".join(["10.1.1.1"] * (ACCESS_CACHE_HOPS // 8 + 1))
    assert len(long_chain) > ACCESS_CACHE_HOPS
    policy.check("127.0.0.1", [long_chain])  # decided, not kept: a header could be 8 KiB
    assert policy._decisions == {}
    with pytest.raises(ForbiddenError, match=r"client address 192.0.2.1 is not allowed"):
        policy.check("127.0.0.1", [long_chain + ", 192.0.2.1"])


async def test_allow_ips_changed_by_a_reload_apply_at_once(tmp_path: Path) -> None:
    daemon = await start(tmp_path, {"s.yaml": "allow_ips: [198.51.100.0/24]\n"})
    try:
        found = await get(daemon, "s", conversion_id="P1")
        assert found[:2] == (403, err("client address 127.0.0.1 is not allowed"))
        (tmp_path / "webhooks" / "s.yaml").write_text("allow_ips: [127.0.0.1/32]\n")
        assert await daemon.services.reloader.reload("test")
        assert (await get(daemon, "s", conversion_id="P2"))[0] == 200
        (tmp_path / "webhooks" / "s.yaml").write_text("allow_ips: [198.51.100.0/24]\n")
        assert await daemon.services.reloader.reload("test")
        found = await get(daemon, "s", conversion_id="P3")
        assert found[:2] == (403, err("client address 127.0.0.1 is not allowed"))
        assert stored(tmp_path) == (1, 1)
    finally:
        await daemon.client.close()


# --- rate limits ------------------------------------------------------------------------------


async def test_rate_limit_429_with_retry_after_counts_only_authenticated(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    daemon = await start(
        tmp_path,
        {
            "r.yaml": (
                "auth: {token: {param: key, secret: r_token}}\nrate_limit: {requests: 2, per: 1m}\n"
            )
        },
        {"r_token": "tok"},
        clock=clock,
    )
    try:
        for _ in range(5):
            assert (await get(daemon, "r", key="bad"))[0] == 401  # costs nothing
        assert (await get(daemon, "r", key="tok", conversion_id="R1"))[0] == 200
        assert (await get(daemon, "r", key="tok", conversion_id="R2"))[0] == 200
        status, body, headers = await get(daemon, "r", key="tok", conversion_id="R3")
        assert (status, body) == (429, err("rate limit exceeded; retry after 30 s"))
        assert headers["Retry-After"] == "30"
        assert stored(tmp_path) == (2, 2)
        await daemon.services.reloader.reload("test")  # the bucket outlives a reload
        assert (await get(daemon, "r", key="tok", conversion_id="R3"))[0] == 429
        clock.advance(30)
        assert (await get(daemon, "r", key="tok", conversion_id="R3"))[0] == 200
    finally:
        await daemon.client.close()


def test_token_bucket_refills_and_restarts_when_its_limit_changes() -> None:
    limiter = RateLimiter()
    limit = RateLimit(requests=10, per=1.0, burst=2)
    assert [limiter.wait("s", limit, 0.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]
    assert limiter.wait("s", limit, 0.1) == 0.0
    assert limiter.wait("s", limit, 0.1) == pytest.approx(0.1)
    assert limiter.wait("s", RateLimit(requests=1, per=1.0, burst=1), 0.1) == 0.0
    assert limiter.wait("other", limit, 0.1) == 0.0


# --- secrets ----------------------------------------------------------------------------------


async def test_a_secret_that_vanishes_answers_503_and_stores_nothing(tmp_path: Path) -> None:
    daemon = await start(
        tmp_path, {"t.yaml": "auth: {token: {param: key, secret: t_token}}\n"}, {"t_token": "x"}
    )
    try:
        (tmp_path / "secrets" / "t_token").unlink()
        found = await get(daemon, "t", key="x")
        assert found[:2] == (503, err("credentials cannot be checked now, retry later"))
        assert stored(tmp_path) == (0, 0)
    finally:
        await daemon.client.close()


async def test_a_source_whose_secret_does_not_resolve_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(RulesError) as caught:
        await start(tmp_path, {"t.yaml": "auth:\n  token: {secret: absent}\n"})
    assert [str(i) for i in caught.value.issues] == [
        "webhooks/t.yaml:2: secret 'absent' does not resolve"
    ]


async def test_a_standard_webhooks_secret_must_be_whsec(tmp_path: Path) -> None:
    with pytest.raises(RulesError) as caught:
        await start(tmp_path, {"s.yaml": "auth: {hmac: {secret: raw}}\n"}, {"raw": "plain"})
    assert [str(i) for i in caught.value.issues] == [
        "webhooks/s.yaml:1: secret raw is not a Standard Webhooks secret (whsec_<base64>)"
    ]


async def test_credentials_never_reach_logs_answers_or_the_store(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    daemon = await start(
        tmp_path,
        {
            "t.yaml": "auth: {token: {param: key, secret: t_token}}\n",
            "s.yaml": "auth: {hmac: {secret: h_key}}\n",
        },
        {"t_token": "tok-SECRET-1", "h_key": whsec(b"SECRET-KEY-BYTES")},
        clock=FakeClock(NOW),
    )
    texts: list[str] = []
    try:
        with capture_logs() as logs:
            for key in ("tok-SECRET-1", "wrong"):
                resp = await daemon.client.get("/webhooks/t", params={**OK, "key": key})
                texts.append(await resp.text())
            body = json.dumps(OK).encode()
            for signing in (b"SECRET-KEY-BYTES", b"other"):
                headers = signed_headers("m1", NOW, body, signing)
                resp = await daemon.client.post("/webhooks/s", data=body, headers=headers)
                texts.append(await resp.text())
        row = await daemon.services.store.get_conversion("t", "A1")
        assert row is not None
        texts += [repr(event) for event in logs] + [json.dumps(row.fields)]
        for secret in ("tok-SECRET-1", whsec(b"SECRET-KEY-BYTES"), "SECRET-KEY-BYTES"):
            assert not any(secret in text for text in texts)
        assert any(event["event"] == "conversion_rejected" for event in logs)
    finally:
        await daemon.client.close()
