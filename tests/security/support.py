"""What the attack tests share: the daemon in-process on loopback with a few sources, and a look
at what the SQLite store holds after the attack (it must hold nothing the attacker chose)."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.harness import Daemon, FakeClock, start_daemon

SIGNING_KEY = b"s" * 32
ENVIRON = {"POSTBACKD_SECRET_HOOK_KEY": "whsec_" + base64.b64encode(SIGNING_KEY).decode()}
SIGNED = {"signed.yaml": "auth: {hmac: {secret: hook_key}}\n"}


async def start(
    tmp_path: Path,
    rules: Mapping[str, str] | None = None,
    *,
    sources: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    **kw: Any,
) -> Daemon:
    hooks = tmp_path / "webhooks"
    hooks.mkdir(exist_ok=True)
    for name, text in (sources or {}).items():
        (hooks / name).write_text(text)
    return await start_daemon(
        tmp_path,
        rules or {},
        clock=kw.pop("clock", FakeClock()),
        dispatch=kw.pop("dispatch", False),
        environ={**ENVIRON, **(environ or {})},
        **kw,
    )


def conversions(tmp_path: Path) -> list[tuple[str, str]]:
    """(conversion_id, status) of every stored conversion."""
    with sqlite3.connect(tmp_path / "postbackd.db") as db:
        rows = db.execute("SELECT conversion_id, status FROM conversion ORDER BY 1").fetchall()
    return [(str(a), str(b)) for a, b in rows]
