"""Issue 13 item 8, as the attack: a FIFO (or socket) named like a rule or source file. Opening
one for reading blocks until a writer comes, so it once wedged reloading (and `validate`) for
good, and SIGTERM no longer ended the daemon. Only regular files are read: a special file is an
error naming it, never opened."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from daemon.errors import RulesError, SecretError
from daemon.loader import load_rules
from daemon.secrets import SecretResolver
from daemon.sources import load_sources
from tests.cli_support import run_cli
from tests.harness import wait_for
from tests.process_support import DaemonProcess, free_port, write_config

RULE = """\
offer: 1
postbacks:
  - id: 1
    trigger: conversion_done
    affiliate: 7
    action: {type: ping_url, url: "https://t.example.com/pb?tx={conversion_id}"}
"""


def test_the_loader_names_a_fifo_and_never_opens_it(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text(RULE)
    os.mkfifo(tmp_path / "trap.yaml")
    (tmp_path / "sub").mkdir()
    os.mkfifo(tmp_path / "sub" / "deep.yml")
    with pytest.raises(RulesError) as caught:
        load_rules(tmp_path, git=False)
    assert [str(i) for i in caught.value.issues] == [
        "sub/deep.yml:0: not a regular file (a FIFO): only regular files are read",
        "trap.yaml:0: not a regular file (a FIFO): only regular files are read",
    ]


def test_a_socket_among_the_sources_is_named(tmp_path: Path) -> None:
    hooks = tmp_path / "w"
    hooks.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(hooks / "sock.yaml"))
        with pytest.raises(RulesError) as caught:
            load_sources(hooks)
    assert [str(i) for i in caught.value.issues] == [
        "w/sock.yaml:0: not a regular file (a socket): only regular files are read"
    ]


def test_a_fifo_as_a_secret_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "tok")
    resolver = SecretResolver(credentials_dir=None, secrets_dir=tmp_path, environ={})
    with pytest.raises(SecretError, match=r"^secret tok in .*/tok is not a regular file$"):
        resolver("tok")
    assert resolver.where("tok") is None


def test_validate_with_a_fifo_ends_with_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ok.yaml").write_text(RULE)
    os.mkfifo(tmp_path / "trap.yaml")
    result = run_cli(capsys, ["validate", str(tmp_path)])
    assert result.code == 1
    assert "trap.yaml:0: not a regular file (a FIFO)" in result.out


@pytest.mark.slow
async def test_a_fifo_does_not_wedge_reloading_and_sigterm_still_ends_the_daemon(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = write_config(tmp_path, port=port)
    (tmp_path / "rules.d" / "ok.yaml").write_text(RULE)
    daemon = DaemonProcess(config, port)
    daemon.start()
    try:
        await daemon.ready()
        os.mkfifo(tmp_path / "rules.d" / "trap.yaml")
        daemon.signal(signal.SIGHUP)
        [failed] = await wait_for(lambda: daemon.events("rules_reload_failed"))
        assert any("trap.yaml:0: not a regular file (a FIFO)" in e for e in failed["errors"])
        (tmp_path / "rules.d" / "trap.yaml").unlink()
        daemon.signal(signal.SIGHUP)
        await wait_for(lambda: daemon.events("rules_reloaded"))
        async with aiohttp.ClientSession() as http, http.get(f"{daemon.url}/healthz") as resp:
            assert resp.status == 200
    finally:
        assert daemon.stop(timeout=20) == 0
