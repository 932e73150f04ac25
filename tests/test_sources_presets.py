"""Each shipped preset, fed a postback written the way that tracker sends it (its URL template
with the macros filled in, empty macros left empty), ends in the right canonical conversion and
fires the rules of that offer with the right macro values."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import Sink, start_daemon, wait_for


@dataclass
class Tracker:
    name: str
    sent: list[str]  # query strings, in the order the tracker sends them
    conversion_id: str
    expected: dict[str, str]  # canonical fields of the stored conversion
    extra: dict[str, str] = field(default_factory=dict)
    transitions: list[str] = field(default_factory=lambda: ["new"])


TRACKERS = [
    Tracker(
        "everflow",
        [
            "transaction_id=7f3c1b9a2e&offer_id=12&affiliate_id=7&payout=3.50"
            "&sale_amount=49.99&event_id=&sub1=aff-click-9&sub2=&sub3=&sub4=&sub5=",
            "transaction_id=7f3c1b9a2e&offer_id=12&affiliate_id=7&payout=3.50"
            "&sale_amount=49.99&event_id=&sub1=aff-click-9&status=invalid",
        ],
        "7f3c1b9a2e",
        {
            "offer": "12",
            "affiliate": "7",
            "status": "rejected",
            "payout": "3.50",
            "revenue": "49.99",
            "sub1": "aff-click-9",
        },
        transitions=["new", "status_changed"],
    ),
    Tracker(
        "cake",
        [
            "leadid=9F1A2B&oid=45&affid=3&tid=adv-778&price=12.00&s1=subaff&s2=clk-1&s3=&s4=&s5="
            "&ip=203.0.113.5&utcunixtime=1790000000"
        ],
        "9F1A2B",
        {
            "offer": "45",
            "affiliate": "3",
            "status": "approved",
            "click_id": "clk-1",
            "payout": "12.00",
            "event_time": "1790000000",
            "ip": "203.0.113.5",
            "sub1": "subaff",
            "sub2": "clk-1",
        },
        extra={"tid": "adv-778"},
    ),
    Tracker(
        "keitaro",
        [
            "subid=3kq8v2a1&tid=&status=lead&revenue=0&offer_id=17&ts_id=4&external_id=ts-click-5"
            "&sub_id_1=banner-a&ip=198.51.100.23&user_agent=Mozilla%2F5.0%20%28X11%29&country=DE",
            "subid=3kq8v2a1&tid=&status=sale&revenue=25.5&offer_id=17&ts_id=4"
            "&external_id=ts-click-5&sub_id_1=banner-a",
        ],
        "3kq8v2a1",
        {
            "offer": "17",
            "affiliate": "4",
            "status": "approved",
            "click_id": "ts-click-5",
            "payout": "25.5",
            "revenue": "25.5",
            "ip": "198.51.100.23",
            "user_agent": "Mozilla/5.0 (X11)",
            "country": "DE",
            "sub1": "banner-a",
        },
        extra={"tid": ""},
        transitions=["new", "status_changed"],
    ),
    Tracker(
        "binom",
        [
            "clickid=bn0001&externalid=ext-9&campaign=88&trafficsource=5&payout=1.20"
            "&cnv_status=Approve&cnv_currency=EUR&country_code=US&ip=192.0.2.7"
        ],
        "bn0001",
        {
            "offer": "88",
            "affiliate": "5",
            "status": "approved",
            "click_id": "ext-9",
            "payout": "1.20",
            "currency": "EUR",
            "country": "US",
            "ip": "192.0.2.7",
        },
    ),
    Tracker(
        "voluum",
        [
            "cid=VOL1C2D3E4F&externalid=ts-42&payout=0.75&txid=&currency=USD&et="
            "&campaign_id=c-100&traffic_source_id=t-9"
        ],
        "VOL1C2D3E4F",
        {
            "offer": "c-100",
            "affiliate": "t-9",
            "status": "approved",
            "click_id": "ts-42",
            "payout": "0.75",
            "currency": "USD",
        },
        extra={"txid": ""},
    ),
    Tracker(
        "tune",
        [
            "transaction_id=102f4e7c1b&offer_id=4&affiliate_id=11&goal_id=2&payout=2.00"
            "&sale_amount=&currency=USD&aff_sub=clk-77&aff_sub2=&aff_sub3=&aff_sub4=&aff_sub5="
            "&ip=203.0.113.9"
        ],
        "102f4e7c1b",
        {
            "offer": "4",
            "affiliate": "11",
            "goal": "2",
            "status": "approved",
            "click_id": "clk-77",
            "sub1": "clk-77",
            "payout": "2.00",
            "currency": "USD",
            "ip": "203.0.113.9",
        },
    ),
]


def rules_for(sink: Sink, offer: str, trigger: str) -> dict[str, str]:
    url = (
        f"{sink.url}/pb?src={{source}}&tx={{conversion_id}}&cid={{click_id}}"
        "&payout={payout}&status={status}"
    )
    return {
        "offer.yaml": f"""
            offer: "{offer}"
            postbacks:
              - id: 1
                trigger: {trigger}
                affiliate: "*"
                action: {{type: ping_url, url: "{url}"}}
        """
    }


@pytest.mark.parametrize("tracker", TRACKERS, ids=[t.name for t in TRACKERS])
async def test_a_tracker_postback_through_its_preset(
    tmp_path: Path, sink: Sink, tracker: Tracker
) -> None:
    hooks = tmp_path / "webhooks"
    hooks.mkdir()
    (hooks / f"{tracker.name}.yaml").write_text(f"preset: {tracker.name}\n")
    trigger = {"approved": "conversion_done", "rejected": "conversion_reject"}
    rules = rules_for(sink, tracker.expected["offer"], trigger[tracker.expected["status"]])
    daemon = await start_daemon(tmp_path, rules)
    try:
        transitions = []
        for query in tracker.sent:
            resp = await daemon.client.get(f"/webhooks/{tracker.name}?{query}")
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
            assert answer["conversion_id"] == tracker.conversion_id
            transitions.append(answer["transition"])
        assert transitions == tracker.transitions
        row = await daemon.services.store.get_conversion(tracker.name, tracker.conversion_id)
        assert row is not None
        extra = row.fields.pop("extra", {})
        assert row.fields == {"conversion_id": tracker.conversion_id, **tracker.expected}
        assert extra == tracker.extra
        await wait_for(lambda: sink.received)
        got = sink.received[0].path_qs
        expected = tracker.expected
        assert got.startswith(f"/pb?src={tracker.name}&tx={tracker.conversion_id}&")
        assert f"&payout={expected['payout']}&status={expected['status']}" in got
        assert f"&cid={expected.get('click_id', '')}&" in got
    finally:
        await daemon.client.close()
