"""Red team (issue 15): a JSON integer of thousands of digits made every write endpoint of the
affiliate API answer 500 (json.loads raised int()'s ValueError past 4,300 digits, which the body
reader passed on); it is a 400 now, and nothing is written."""

from __future__ import annotations

from pathlib import Path

from tests.affiliates.kit import AFF_A, SETTINGS, Api, ping, rules
from tests.harness import Sink, start_daemon


async def test_a_huge_integer_is_a_400_on_every_write_endpoint(tmp_path: Path, sink: Sink) -> None:
    daemon = await start_daemon(tmp_path, rules(sink), settings=SETTINGS, dispatch=False)
    try:
        api = Api(daemon)
        made = await api.create(AFF_A, ping(sink))
        one = f"/api/v1/postbacks/{made['id']}"
        endpoints = [
            ("POST", "/api/v1/postbacks"),
            ("PATCH", one),
            ("DELETE", one),
            ("POST", f"{one}/status"),
            ("POST", "/api/v1/postbacks/duplicate"),
            ("PUT", "/api/v1/affiliate/secrets/key"),
        ]
        for digits in ("1" * 5000, "-" + "9" * 4400, "1" * 31):
            for method, path in endpoints:
                for key in ("offer", "confirm", "ids", "value"):
                    raw = f'{{"{key}": {digits}}}'.encode()
                    status, answer = await api(method, path, AFF_A, raw=raw)
                    assert status == 400, (method, path, key, answer)
                    assert answer["error"] == "a number of more than 30 digits"
        assert (await api("GET", "/api/v1/affiliate/limits", AFF_A))[1]["used"] == 1
        assert (await api("GET", f"{one}/history", AFF_A))[1]["next_after"] is None
        _, trail = await api("GET", f"{one}/history", AFF_A)
        assert [h["change"] for h in trail["history"]] == ["create"]
    finally:
        await daemon.client.close()
