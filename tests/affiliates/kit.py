"""Shared pieces of the affiliate postback tests (issue 15): two affiliates (42 and 77) and an
admin, a rule set with file postbacks of each kind, and a small JSON client."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tests.harness import Daemon, Sink

ADMIN, AFF_A, AFF_B = "admin-token-1", "affiliate-a-token-2", "affiliate-b-token-3"
A, B = "42", "77"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


TOKENS = [
    {"name": "ops", "token_sha256": sha(ADMIN), "role": "admin"},
    {"name": "alice", "token_sha256": sha(AFF_A), "role": "affiliate", "affiliate": 42},
    {"name": "bob", "token_sha256": sha(AFF_B), "role": "affiliate", "affiliate": 77},
]
SETTINGS = {"api": {"tokens": TOKENS}}


def rules(sink: Sink, policy: str | None = None) -> dict[str, str]:
    """Offer 7 (goals enabled): file postback 101 of affiliate 42's user, 102 of an admin.
    Offer 8: 103 of affiliate 77's user. Offer 9 has no rule file."""
    files = {
        "offer-7.yaml": f"""
            offer: 7
            goals_enabled: true
            postbacks:
              - id: 101
                trigger: conversion_done
                affiliate: 42
                goal: lead
                author: {{id: 1, name: Ann, affiliate: 42}}
                action: {{type: ping_url, url: "{sink.url}/file101?tx={{conversion_id}}"}}
              - id: 102
                trigger: conversion_done
                affiliate: "*"
                goal: sale
                author: {{id: 2, name: Root}}
                action: {{type: ping_url, url: "{sink.url}/file102?tx={{conversion_id}}"}}
            """,
        "offer-8.yaml": f"""
            offer: 8
            postbacks:
              - id: 103
                trigger: conversion_reject
                affiliate: 77
                author: {{id: 3, name: Bob, affiliate: 77}}
                action: {{type: ping_url, url: "{sink.url}/file103?tx={{conversion_id}}"}}
            """,
    }
    if policy is not None:
        files["affiliates.yaml"] = policy
    return files


def ping(sink: Sink, path: str = "aff", **extra: Any) -> dict[str, Any]:
    """A postback body as an affiliate sends it."""
    body: dict[str, Any] = {
        "offer": 7,
        "trigger": "conversion_done",
        "action": {"type": "ping_url", "url": f"{sink.url}/{path}?tx={{conversion_id}}"},
    }
    body.update(extra)
    return body


@dataclass
class Api:
    daemon: Daemon

    async def __call__(
        self,
        method: str,
        path: str,
        token: str | None,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {"headers": sent}
        if raw is not None:
            kwargs["data"] = raw
            sent.setdefault("Content-Type", "application/json")
        elif body is not None:
            kwargs["json"] = body
        resp = await self.daemon.client.request(method, path, **kwargs)
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()

    async def create(self, token: str, body: Mapping[str, Any]) -> dict[str, Any]:
        status, answer = await self("POST", "/api/v1/postbacks", token, body)
        assert status == 201, answer
        assert isinstance(answer, dict)
        return answer
