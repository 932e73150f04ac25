"""What the webhook path keeps between requests to do less per request, and the order of its
checks once the body is read apart from the other checks (daemon/ingest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from structlog.testing import capture_logs

from daemon.ingest import _VersionText
from tests.harness import Sink, lifecycle_rules, start_daemon, write_rules


@dataclass(frozen=True)
class _Version:
    digest: str

    def __str__(self) -> str:
        return self.digest[:4]


def test_version_text_is_made_again_for_another_rule_set() -> None:
    """The text kept is that of the very version object it was made from: a new rule set's
    version (even an equal one) gets its own, and going back to an older one is not served
    the newer one's text."""
    text = _VersionText()
    one, two, one_again = _Version("aaaa1"), _Version("bbbb2"), _Version("aaaa1")
    assert text(one) == "aaaa"
    assert text(one) == "aaaa"
    assert text(two) == "bbbb"
    assert text(one_again) == "aaaa"
    assert text(one) == "aaaa"


async def test_logged_rules_version_follows_a_reload(tmp_path: Path, sink: Sink) -> None:
    """conversion_received names the rules that were running for that conversion, before and
    after a reload changed them."""
    daemon = await start_daemon(tmp_path, {"offer-7.yaml": lifecycle_rules(sink)}, dispatch=False)
    try:
        with capture_logs() as logs:
            await daemon.post(conversion_id="V1", offer=7, affiliate=42, status="approved")
            first = str(daemon.services.reloader.runtime.rules.version)
            write_rules(daemon.rules_dir, {"offer-7.yaml": lifecycle_rules(sink) + "# changed\n"})
            assert await daemon.services.reloader.reload("test")
            second = str(daemon.services.reloader.runtime.rules.version)
            await daemon.post(conversion_id="V2", offer=7, affiliate=42, status="approved")
        assert first != second
        received = [e for e in logs if e["event"] == "conversion_received"]
        assert [(e["conversion_id"], e["rules_version"]) for e in received] == [
            ("V1", first),
            ("V2", second),
        ]
    finally:
        await daemon.client.close()


async def test_address_is_refused_before_the_body_is_looked_at(tmp_path: Path, sink: Sink) -> None:
    """403 (the address: the generic source takes no browser requests) comes before 413 and 415
    (the body) and before 400 (the mapping), for POST and GET alike."""
    daemon = await start_daemon(tmp_path, {"offer-7.yaml": lifecycle_rules(sink)}, dispatch=False)
    browser = {"Origin": "https://example.com"}
    try:
        client = daemon.client
        big = await client.post("/webhooks/generic", data=b"x" * (65 * 1024), headers=browser)
        assert big.status == 403
        odd = await client.post(
            "/webhooks/generic", data=b"a=1", headers={**browser, "Content-Type": "text/plain"}
        )
        assert odd.status == 403
        bad = await client.get("/webhooks/generic?conversion_id=%FF", headers=browser)
        assert bad.status == 403
        # Without the browser's header, the same requests get the body's and the mapping's codes.
        assert (await client.post("/webhooks/generic", data=b"x" * (65 * 1024))).status == 413
        headers = {"Content-Type": "text/plain"}
        assert (await client.post("/webhooks/generic", data=b"a=1", headers=headers)).status == 415
        assert (await client.get("/webhooks/generic?conversion_id=%FF")).status == 400
    finally:
        await daemon.client.close()


async def test_post_body_and_query_are_both_read(tmp_path: Path, sink: Sink) -> None:
    """A POST's form body is still read (only a GET skips the body), merged with its query."""
    daemon = await start_daemon(tmp_path, {"offer-7.yaml": lifecycle_rules(sink)}, dispatch=False)
    try:
        resp = await daemon.client.post(
            "/webhooks/generic?conversion_id=P1&offer=7",
            data={"affiliate": "42", "status": "approved"},
        )
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["conversion_id"] == "P1"
        # a GET's body is ignored, as before: its parameters are the query's only
        got = await daemon.client.get(
            "/webhooks/generic?conversion_id=G1&offer=7&affiliate=42&status=approved",
            data=b"status=rejected",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert got.status == 200
        row = await daemon.services.store.get_conversion("generic", "G1")
        assert row is not None
        assert row.status == "approved"
    finally:
        await daemon.client.close()
