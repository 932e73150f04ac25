"""Issue 13 item 6, as the attack: a secret of two characters (a short PIN, a tiny API key) once
stayed in clear in attempt records (API and store), send-test output and log lines, because
values under 4 characters were never masked. They are masked wherever they stand whole, and
text that merely contains them is left readable."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from pathlib import Path

from aiohttp import web
from structlog.testing import capture_logs

from daemon.cli.send_test import send_text
from daemon.models import Conversion
from daemon.sendtest import send_once
from tests.harness import Sink, wait_for
from tests.security.support import start

TINY = "Q7"
WHOLE = re.compile(rf"(?<![A-Za-z0-9]){TINY}(?![A-Za-z0-9])")
ENV = {"POSTBACKD_SECRET_TINY": TINY}
ADMIN = "admin-token-0123456789"


def rule(sink: Sink) -> str:
    return f"""\
offer: 1
postbacks:
  - id: 3
    trigger: conversion_done
    affiliate: "*"
    action:
      type: ping_url
      method: POST
      url: "{sink.url}/pb?key=${{secret:tiny}}&tx={{conversion_id}}"
      headers: {{X-Sig: "${{secret:tiny}}"}}
      json: {{token: "${{secret:tiny}}", sub: "{{sub1}}"}}
"""


async def echo(request: web.Request) -> web.Response:
    return web.Response(status=500, text=f"bad key {request.query.get('key')}; retry")


async def test_a_two_character_secret_is_masked_in_records_store_and_logs(tmp_path: Path) -> None:
    sink = await Sink().start()
    sink.script = [echo]
    tokens = [
        {"name": "ops", "token_sha256": hashlib.sha256(ADMIN.encode()).hexdigest(), "role": "admin"}
    ]
    with capture_logs() as logs:
        daemon = await start(
            tmp_path,
            {"o.yaml": rule(sink)},
            environ=ENV,
            dispatch=True,
            settings={"api": {"tokens": tokens}},
        )
        try:
            await daemon.post(
                conversion_id="S1", offer=1, affiliate=7, status="approved", sub1="Q7x"
            )
            await wait_for(lambda: len(sink.received) == 1)
            await daemon.services.dispatcher.drain()
            assert f"key={TINY}&" in sink.received[0].path_qs  # the destination did get it
            [row] = await daemon.deliveries()
            resp = await daemon.client.get(
                f"/api/v1/deliveries/{row.delivery_id}",
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            api_text = await resp.text()
            attempt = (await resp.json())["attempts"][0]
        finally:
            await daemon.client.close()
            await sink.close()
    assert attempt["request"]["url"].endswith("/pb?key=****&tx=S1")
    assert attempt["request"]["headers"]["X-Sig"] == "****"
    assert attempt["request"]["body"] == '{"token":"****","sub":"Q7x"}'  # Q7x: not a whole Q7
    assert attempt["response_excerpt"] == "bad key ****; retry"
    with sqlite3.connect(tmp_path / "postbackd.db") as db:
        stored = "\n".join(db.iterdump())
    log_text = "\n".join(str(event) for event in logs)
    for where, text in (("api", api_text), ("store", stored), ("logs", log_text)):
        assert not WHOLE.search(text), where


async def test_send_test_output_masks_a_two_character_secret(tmp_path: Path) -> None:
    sink = await Sink().start()
    sink.script = [echo]
    daemon = await start(tmp_path, {"o.yaml": rule(sink)}, environ=ENV)
    try:
        lp = daemon.services.reloader.runtime.rules.postbacks[3]
        conversion = Conversion.parse(
            {"conversion_id": "T1", "offer": "1", "affiliate": "7", "status": "approved"}
        )
        result = await send_once(daemon.settings, lp, conversion, ENV)
    finally:
        await daemon.client.close()
        await sink.close()
    text = send_text(result)
    assert "key=****" in text
    assert not WHOLE.search(text)
