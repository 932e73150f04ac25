"""The store commands next to a running daemon, and `send-test`, against a real sink on
127.0.0.1: run as separate processes, as an operator would."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from daemon.secrets import env_var_name
from daemon.store.base import DeliveryState
from tests.harness import Sink, start_daemon, wait_for

SECRET = "s3cr3t-Token-value"


async def postbackd(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def rules_for(sink: Sink) -> str:
    return f"""\
offer: 1234
goals_enabled: true
postbacks:
  - id: 7
    trigger: conversion_done
    affiliate: 42
    goal: sale
    status: active
    action:
      type: ping_url
      method: POST
      url: {sink.url}/pb?cid={{click_id}}&key=${{secret:tok}}
      headers:
        X-Api-Key: ${{secret:tok}}
      form:
        payout: "{{payout}}"
"""


def setup(tmp_path: Path, sink: Sink, allow: str = "[127.0.0.1/32]") -> Path:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "offer-1234.yaml").write_text(rules_for(sink))
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "tok").write_text(SECRET)
    config = tmp_path / "postbackd.yaml"
    config.write_text(
        "store: sqlite:///never.db\nrules_dir: rules.d\nsecrets_dir: secrets\n"
        f"outbound: {{allow_cidrs: {allow}, timeout: 5s}}\n"
    )
    return config


async def test_send_test_really_sends_once_and_masks_the_secret(tmp_path: Path, sink: Sink) -> None:
    config = setup(tmp_path, sink)
    code, out, err = await postbackd("send-test", "7", "-c", str(config))
    assert code == 0, err
    [got] = sink.received
    assert got.method == "POST"
    assert got.path_qs == f"/pb?cid=send-test-click&key={SECRET}"
    assert got.headers["X-Api-Key"] == SECRET
    assert got.text == "payout=1.00"
    assert SECRET not in out + err
    lines = out.splitlines()
    assert lines[0].startswith("postback 7 (ping_url, offer 1234) with conversion send-test-")
    assert lines[0].endswith("(approved, affiliate 42)")
    assert lines[1] == f"> POST {sink.url}/pb?cid=send-test-click&key=****"
    assert "> X-Api-Key: ****" in lines
    assert "> body: payout=1.00" in lines
    assert "< HTTP 200 OK" in lines
    assert lines[-1].startswith("outcome: succeeded in ")
    assert not (tmp_path / "never.db").exists()  # nothing stored


async def test_send_test_fails_with_exit_1(tmp_path: Path, sink: Sink) -> None:
    config = setup(tmp_path, sink)
    sink.script.append((404, "no such campaign", {}))
    conversion = tmp_path / "c.json"
    conversion.write_text(
        '{"conversion_id": "X1", "offer": 1234, "affiliate": 9, "status": "approved",'
        ' "payout": 3, "click_id": "zz"}'
    )
    code, out, err = await postbackd(
        "send-test", "7", "--conversion", str(conversion), "-c", str(config)
    )
    assert code == 1
    assert len(sink.received) == 1
    assert "note: this conversion would not fire it (affiliate is 42, the conversion's is 9)" in err
    assert "< HTTP 404 no such campaign" in out
    assert out.splitlines()[-1] == "outcome: failed (permanent): http_404"


async def test_send_test_goes_through_the_outbound_guard(tmp_path: Path, sink: Sink) -> None:
    config = setup(tmp_path, sink, allow="[]")
    code, out, _ = await postbackd("send-test", "7", "-c", str(config))
    assert code == 1
    assert sink.received == []
    assert out.splitlines()[-1].startswith("outcome: failed (permanent): guard_refused")


async def test_send_test_unknown_postback(tmp_path: Path, sink: Sink) -> None:
    config = setup(tmp_path, sink)
    code, out, err = await postbackd("send-test", "8", "-c", str(config))
    assert (code, out, err) == (1, "", "postbackd: error: no postback with id 8 in the rules\n")


async def test_a_retry_from_the_command_line_is_sent_by_the_running_daemon(
    tmp_path: Path, sink: Sink
) -> None:
    sink.script.append((404, "not yet", {}))  # the first attempt dies: a 4xx is not retried
    daemon = await start_daemon(tmp_path, {"offer-1234.yaml": rules_for(sink)},
                                environ={env_var_name("tok"): SECRET})  # fmt: skip
    try:
        await daemon.post(conversion_id="c1", offer=1234, affiliate=42, goal="sale",
                          status="approved", payout="5", click_id="k")  # fmt: skip
        [dead] = await wait_for(lambda: daemon.deliveries(state=DeliveryState.DEAD))
        config = tmp_path / "cli.yaml"
        config.write_text(f"store: sqlite:///postbackd.db\nrules_dir: {daemon.rules_dir}\n")
        code, out, err = await postbackd("deliveries", "retry", dead.delivery_id, "-c", str(config))
        assert code == 0, err
        assert (
            out == f"delivery {dead.delivery_id} queued again; the daemon sends it within seconds\n"
        )
        await wait_for(lambda: daemon.deliveries(state=DeliveryState.SUCCEEDED), deadline=20)
        assert len(sink.received) == 2
        assert (
            sink.received[0].headers["Idempotency-Key"]
            == sink.received[1].headers["Idempotency-Key"]
        )
        code, out, _ = await postbackd("deliveries", "show", dead.delivery_id, "-c", str(config))
        assert "attempt 2 at" in out
        assert "succeeded" in out
        assert SECRET not in out
    finally:
        await daemon.client.close()
