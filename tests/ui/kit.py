"""The console's test kit: tokens, a rule set with admin, affiliate and file postbacks, and a
signed-in aiohttp client (the browser tests use the same daemon set-up)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from aiohttp.test_utils import TestClient

from tests.harness import Sink

ADMIN, AFF42, AFF43 = "admin-console-token", "aff42-console-token", "aff43-console-token"
SINK_SECRET = "s3cr3t-sink-value"
ENV = {"POSTBACKD_SECRET_SINK_TOK": SINK_SECRET}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


TOKENS = [
    {"name": "ops", "token_sha256": sha(ADMIN), "role": "admin"},
    {"name": "aff42", "token_sha256": sha(AFF42), "role": "affiliate", "affiliate": 42},
    {"name": "aff43", "token_sha256": sha(AFF43), "role": "affiliate", "affiliate": 43},
]


def rules(sink: Sink, bad: Sink) -> dict[str, str]:
    """Offer 7: 101 (affiliate 42's), 102 (43's), 103 (an admin's, whose sink answers 400
    first), 104 (no author, an SMTP-free ping with a secret); offer 8: 105 disabled, 42's."""

    def pb(pid: int, trigger: str, author: str, url: str, extra: str = "") -> str:
        owner = re.search(r"affiliate: '?(\d+)", author)
        return f"""
              - id: {pid}
                trigger: {trigger}
                affiliate: "{owner.group(1) if owner else "*"}"
                created_at: 2026-11-01T10:00:00Z
                {author}
                action:
                  type: ping_url
                  url: "{url}?tx={{conversion_id}}&k=${{secret:sink_tok}}"
                  headers: {{Authorization: "Bearer ${{secret:sink_tok}}"}}
                {extra}"""

    return {
        "catalogue.yaml": "offers:\n  7: {name: Solar Leads}\n  8: {name: Home Insurance}\n",
        "offer-7.yaml": "offer: 7\npostbacks:"
        + pb(
            101,
            "conversion_done",
            "author: {id: 1, name: Ann, affiliate: 42}",
            f"{sink.url}/a42",
            'when: {">=": [{"var": "payout"}, 5]}',
        )
        + pb(102, "conversion_done", "author: {id: 2, name: Bob, affiliate: 43}", f"{sink.url}/a43")
        + pb(103, "conversion_done", "author: {id: 3, name: Root}", f"{bad.url}/admin")
        + pb(104, "conversion_reject", "", f"{sink.url}/none"),
        "offer-8.yaml": "offer: 8\ngoals_enabled: true\npostbacks:"
        + pb(
            105,
            "conversion_pending",
            "author: {id: 1, name: Ann, affiliate: '42'}",
            f"{sink.url}/p42",
            "status: disabled\n                goal: lead",
        ),
    }


def settings(**ui: Any) -> dict[str, Any]:
    return {"api": {"tokens": TOKENS}, "ui": ui}


_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found is not None, html[:500]
    return found.group(1)


async def sign_in(client: TestClient, token: str) -> str:
    """Sign `client` in with `token`; returns the session's CSRF token."""
    resp = await client.get("/ui/sign-in")
    check = csrf_of(await resp.text())
    resp = await client.post(
        "/ui/sign-in",
        data={"csrf": check, "token": token, "next": "/ui/offers"},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    page = await client.get("/ui/offers")
    assert page.status == 200
    return csrf_of(await page.text())
