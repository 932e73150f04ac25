"""Issue 13 item 3, as the attack: affiliate 42's user writes a postback with `affiliate: "*"`
(or another affiliate's id) so that it fires for affiliate 7's conversions, then reads the
rendered request (7's email and payout) through the API with 42's token. Such a postback is
refused at load and by the CLI, and no API answer shows 42 anything of another affiliate."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from daemon.errors import RulesError
from daemon.loader import load_rules
from tests.harness import Sink, wait_for
from tests.security.support import start
from tests.test_cli_ops_kit import run

AFF42 = "aff42-token-abcdefghij"
TOKENS = [
    {
        "name": "aff42",
        "token_sha256": hashlib.sha256(AFF42.encode()).hexdigest(),
        "role": "affiliate",
        "affiliate": 42,
    }
]


def rule(affiliate: str, url: str = "https://t.example.com/pb") -> str:
    return f"""\
offer: 1
postbacks:
  - id: 5
    trigger: conversion_done
    affiliate: {affiliate}
    author: {{id: 9, name: Mallory, affiliate: 42}}
    action: {{type: ping_url, url: "{url}?e={{email}}&p={{payout}}"}}
"""


@pytest.mark.parametrize("affiliate", ['"*"', "77", "'042'", "4 2"])
def test_an_affiliates_postback_for_other_affiliates_is_refused_at_load(
    tmp_path: Path, affiliate: str
) -> None:
    (tmp_path / "o.yaml").write_text(rule(affiliate))
    with pytest.raises(RulesError) as caught:
        load_rules(tmp_path, git=False)
    [issue] = caught.value.issues
    assert str(issue).startswith(
        "o.yaml:3: postback 5: affiliate: a postback authored for affiliate 42 may only match "
        "affiliate 42's conversions, not "
    )


@pytest.mark.parametrize("affiliate", ["*", "77"])
def test_the_cli_refuses_it_too(tmp_path: Path, affiliate: str) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    result = run(
        "rules", "add", "--rules", str(rules), "--offer", "1", "--trigger", "conversion_done",
        "--affiliate", affiliate, "--author", "9:Mallory", "--author-affiliate", "42",
        "--url", "https://t.example.com/pb?e={email}",
    )  # fmt: skip
    assert result.code == 1
    assert "may only match affiliate 42's conversions" in result.err
    assert list(rules.iterdir()) == []


async def test_an_affiliate_token_reads_no_other_affiliates_conversion(tmp_path: Path) -> None:
    sink = await Sink().start()
    daemon = await start(
        tmp_path,
        {"o.yaml": rule('"42"', f"{sink.url}/pb")},
        dispatch=True,
        settings={"api": {"tokens": TOKENS}},
    )
    try:
        victim = {"offer": "1", "affiliate": "7", "status": "approved"}
        answer = await daemon.post(
            conversion_id="V1", email="victim@example.com", payout="77.00", **victim
        )
        assert answer["deliveries"] == 0
        own = await daemon.post(
            conversion_id="M1", offer=1, affiliate=42, status="approved", email="m@example.com"
        )
        assert own["deliveries"] == 1
        await wait_for(lambda: len(sink.received) == 1)
        await daemon.services.dispatcher.drain()
        headers = {"Authorization": f"Bearer {AFF42}"}
        resp = await daemon.client.get("/api/v1/deliveries", headers=headers)
        listing = await resp.json()
        assert [d["conversion_id"] for d in listing["deliveries"]] == ["M1"]
        seen = [json.dumps(listing)]
        for row in listing["deliveries"]:
            detail = await daemon.client.get(
                f"/api/v1/deliveries/{row['delivery_id']}", headers=headers
            )
            seen.append(await detail.text())
        for path in ("/api/v1/postbacks", "/api/v1/postbacks/5", "/api/v1/rules/status"):
            seen.append(await (await daemon.client.get(path, headers=headers)).text())
        text = "\n".join(seen)
        for leak in ("victim", "77.00", "V1"):
            assert leak not in text
        assert [r.path_qs for r in sink.received] == ["/pb?e=m%40example.com&p="]
    finally:
        await daemon.client.close()
        await sink.close()
