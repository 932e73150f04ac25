"""Rule sets and conversions for the benchmark: `offers` offers of `per_offer` postbacks each.

Every offer has the same shape, so the small set (1 offer x 10) and the large one (10,000 x 10)
cost the same per conversion if matching goes through the offer index: postback j of an offer
fires only for `sub1=fire-j`, on approved conversions of any affiliate. A conversion with
`sub1=none` evaluates all ten conditions of its offer and fires nothing (pure ingest); one with
`sub1=fire-0` fires exactly one ping_url, to the sink, carrying its idempotency key.
"""

from __future__ import annotations

import json
from pathlib import Path

PER_OFFER = 10
NONE = "none"
FIRE = "fire-0"


def write_rules(root: Path, offers: int, sink_url: str, per_offer: int = PER_OFFER) -> int:
    """Write one file per offer under root; the number of postbacks written."""
    root.mkdir(parents=True, exist_ok=True)
    url = json.dumps(f"{sink_url}/pb?k={{idempotency_key}}")
    for offer in range(1, offers + 1):
        lines = [f"offer: {offer}", "postbacks:"]
        for j in range(per_offer):
            lines += [
                f"  - id: {(offer - 1) * per_offer + j + 1}",
                "    trigger: conversion_done",
                '    affiliate: "*"',
                f'    when: {{"==": [{{"var": "sub1"}}, "fire-{j}"]}}',
                "    status: active",
                "    created_at: 2026-11-01T10:00:00Z",
                "    author: {id: 1, name: Bench}",
                f"    action: {{type: ping_url, url: {url}}}",
            ]
        (root / f"offer-{offer}.yaml").write_text("\n".join(lines) + "\n")
    return offers * per_offer


def offer_of(n: int, offers: int) -> int:
    """Request n's offer: spread over every offer (a stride prime to any offer count we use)."""
    return (n * 7919) % offers + 1


def conversion_query(cid: str, offer: int, sub1: str, status: str = "approved") -> str:
    return (
        f"conversion_id={cid}&offer={offer}&affiliate=42&status={status}"
        f"&payout=12.50&currency=USD&click_id=ck{cid}&sub1={sub1}"
    )


def key_of(cid: str, offer: int, seq: int = 1) -> str:
    """The idempotency key of the one delivery a FIRE conversion makes (postback j=0) on its
    arrival `seq` (1: it came approved; 2: it came pending, then approved)."""
    return f"generic:{cid}:{seq}:{(offer - 1) * PER_OFFER + 1}"
