"""Issue 13 item 10, as the attack (the fix is H1's /readyz): a reload fails on a rule whose URL
carries a partner's password, and anyone who reaches the port asks `/readyz`. Without a token
it says only whether the daemon is ready and which part fails; the error lines stay behind an
admin token."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.security.support import start

PASSWORD = "Sup3rPassw0rd"
ADMIN = "admin-token-0123456789"
TOKENS = [
    {"name": "ops", "token_sha256": hashlib.sha256(ADMIN.encode()).hexdigest(), "role": "admin"}
]
GOOD = """\
offer: 1
postbacks:
  - id: 1
    trigger: conversion_done
    affiliate: 7
    action: {type: ping_url, url: "https://t.example.com/pb"}
"""
# A bad key beside a URL with userinfo: the reload fails, and its error lines quote the file.
BAD = f"""\
offer: 2
postbacks:
  - id: 2
    trigger: conversion_done
    affiliate: 7
    colour: red
    action: {{type: ping_url, url: "https://partner:{PASSWORD}@t.example.com/pb?x=${{nope"}}
"""


async def test_readyz_without_a_token_quotes_no_reload_error(tmp_path: Path) -> None:
    daemon = await start(tmp_path, {"ok.yaml": GOOD}, settings={"api": {"tokens": TOKENS}})
    try:
        (daemon.rules_dir / "bad.yaml").write_text(BAD)
        assert await daemon.services.reloader.reload("test") is False
        assert daemon.services.reloader.status.last_error  # there is something to leak
        anonymous = await daemon.client.get("/readyz")
        text = await anonymous.text()
        assert PASSWORD not in text
        assert "bad.yaml" not in text
        assert (await anonymous.json())["last_reload_ok"] is False
        admin = await daemon.client.get("/readyz", headers={"Authorization": f"Bearer {ADMIN}"})
        assert (await admin.json())["last_reload_errors"]
        assert PASSWORD not in await admin.text()
    finally:
        await daemon.client.close()
