"""Issue 13 item 2, as the attack: anyone who reaches the port posts to the built-in `generic`
source (which fires postbacks, SMTP and SMS included). It takes loopback clients only unless its
own file opens it, and every source left open without credentials is said out loud."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.auth import LOOPBACK, AccessPolicy
from daemon.errors import ForbiddenError
from daemon.sources import GENERIC_SOURCE, exposure_warnings, load_sources
from tests.cli_support import run_cli
from tests.harness import wait_for
from tests.process_support import DaemonProcess, free_port, write_config
from tests.security.support import conversions, start

CONVERSION = {"conversion_id": "G1", "offer": "1", "affiliate": "7", "status": "approved"}


async def test_a_request_relayed_from_beyond_loopback_is_refused(tmp_path: Path) -> None:
    # A reverse proxy on the same host makes the peer 127.0.0.1; what it relays is not local.
    daemon = await start(tmp_path)
    try:
        resp = await daemon.client.get(
            "/webhooks/generic", params=CONVERSION, headers={"X-Forwarded-For": "203.0.113.9"}
        )
        assert resp.status == 403
        assert "loopback clients only" in (await resp.json())["error"]
        assert conversions(tmp_path) == []
        # The local tracker (or a test on this host) still gets in.
        ok = await daemon.client.get("/webhooks/generic", params=CONVERSION)
        assert ok.status == 200, await ok.text()
        assert conversions(tmp_path) == [("G1", "approved")]
    finally:
        await daemon.client.close()


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"},
        {"Sec-Fetch-Mode": "no-cors"},
    ],
)
async def test_a_web_page_in_a_local_browser_cannot_post_to_generic(
    tmp_path: Path, headers: dict[str, str]
) -> None:
    """A page the operator opens (or a DNS-rebound name) can make the browser post a form to
    127.0.0.1:8080/webhooks/generic: the peer is loopback, but browsers mark such requests with
    Origin / Sec-Fetch-*, which trackers never send. Refused, nothing stored."""
    daemon = await start(tmp_path)
    try:
        resp = await daemon.client.post("/webhooks/generic", data=CONVERSION, headers=headers)
        assert resp.status == 403
        assert "web browser" in (await resp.json())["error"]
        assert conversions(tmp_path) == []
    finally:
        await daemon.client.close()


@pytest.mark.parametrize("header", ["Forwarded", "X-Real-IP"])
async def test_other_proxy_headers_count_as_relayed(tmp_path: Path, header: str) -> None:
    daemon = await start(tmp_path)
    try:
        value = "for=203.0.113.9" if header == "Forwarded" else "203.0.113.9"
        resp = await daemon.client.get(
            "/webhooks/generic", params=CONVERSION, headers={header: value}
        )
        assert resp.status == 403
        assert conversions(tmp_path) == []
    finally:
        await daemon.client.close()


@pytest.mark.parametrize("peer", ["203.0.113.9", "[2001:db8::1]:4431", "10.0.0.5:1234", None])
def test_the_built_in_generic_source_refuses_every_address_beyond_loopback(
    peer: str | None,
) -> None:
    with pytest.raises(ForbiddenError):
        GENERIC_SOURCE.gate.access.check(peer, [])
    GENERIC_SOURCE.gate.access.check("127.0.0.1", [])
    GENERIC_SOURCE.gate.access.check("[::1]:5000", [])


def test_a_trusted_proxy_passes_on_a_local_client_only() -> None:
    proxied = AccessPolicy(trusted_proxies=LOOPBACK, loopback_only=True)
    proxied.check("127.0.0.1", ["127.0.0.1"])
    with pytest.raises(ForbiddenError):
        proxied.check("127.0.0.1", ["203.0.113.9"])
    with pytest.raises(ForbiddenError):  # a proxy we do not trust relays anyone
        AccessPolicy(loopback_only=True).check("127.0.0.1", ["127.0.0.1"])


@pytest.mark.parametrize(
    ("text", "local"),
    [
        ("response: text\n", True),  # a generic.yaml that opens nothing stays local
        ("public: true\n", False),
        ("allow_ips: [198.51.100.0/24]\n", False),
        ("auth: {token: {secret: t}}\n", False),
    ],
)
def test_only_its_own_file_opens_the_generic_source(tmp_path: Path, text: str, local: bool) -> None:
    (tmp_path / "generic.yaml").write_text(text)
    generic = load_sources(tmp_path)["generic"]
    assert generic.gate.access.loopback_only is local


def test_open_sources_are_warned_about_and_public_true_is_on_purpose(tmp_path: Path) -> None:
    (tmp_path / "open.yaml").write_text("response: text\n")
    (tmp_path / "ips.yaml").write_text("allow_ips: [198.51.100.0/24]\n")
    (tmp_path / "local.yaml").write_text("allow_ips: [127.0.0.1/32, '::1/128']\n")
    (tmp_path / "pub.yaml").write_text("public: true\n")
    (tmp_path / "tok.yaml").write_text("auth: {token: {secret: t}}\n")
    sources = {**load_sources(tmp_path), "generic": GENERIC_SOURCE}
    warned = {source.name: why for source, why in exposure_warnings(sources)}
    assert sorted(warned) == ["ips", "open"]
    assert warned["open"].startswith("takes conversions without authentication from any address")


def test_validate_warns_about_a_source_without_authentication(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules, hooks = tmp_path / "rules.d", tmp_path / "webhooks"
    rules.mkdir()
    hooks.mkdir()
    (hooks / "open.yaml").write_text("response: text\n")
    result = run_cli(capsys, ["validate", str(rules), "--webhooks", str(hooks)])
    assert (
        "warning: webhooks/open.yaml:1: source open takes conversions without authentication "
        "from any address" in result.out
    )


@pytest.mark.slow
async def test_the_start_log_warns_about_a_source_without_authentication(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port=port)
    (tmp_path / "webhooks" / "open.yaml").write_text("response: text\n")
    daemon = DaemonProcess(config, port)
    daemon.start()
    try:
        await daemon.ready()
        await wait_for(lambda: daemon.events("source_unauthenticated"))
    finally:
        assert daemon.stop() == 0
    events = daemon.events("source_unauthenticated")
    assert [(e["source"], e["level"]) for e in events] == [("open", "warning")]


def test_a_generic_file_that_opens_nothing_uses_the_settings_trusted_proxies(
    tmp_path: Path,
) -> None:
    (tmp_path / "generic.yaml").write_text("response: json\n")
    access = load_sources(tmp_path, trusted_proxies=["10.0.0.0/8"])["generic"].gate.access
    assert access.loopback_only
    access.check("10.1.2.3", ["127.0.0.1"])  # a local client through the trusted proxy
    with pytest.raises(ForbiddenError):
        access.check("10.1.2.3", ["203.0.113.9"])
