"""What the smtp, slack_message and twilio_sms tests share: a stub resolver, the resources an
action is built with (guard open to loopback only), a job, and load-time validation of one
action block as `postbackd validate` reports it."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from daemon.actions.base import Job, Resources
from daemon.errors import RulesError
from daemon.loader import load_rules
from daemon.outbound import Guard, OutboundHttp, Resolver
from daemon.secrets import SecretResolver, env_var_name
from tests.harness import FakeClock

LOOPBACK = ["127.0.0.1/32", "::1/128"]
KEY = "generic:T-1:1:7"
# The line of the first setting under `action:` in the file `validate` writes.
FIRST_SETTING_LINE = 8


class StubResolver:
    """Maps names to fixed addresses; unknown names fail like DNS would. Never touches DNS."""

    def __init__(self, names: Mapping[str, list[str]]) -> None:
        self.names = dict(names)
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.names[host]


def secret_env(secrets: Mapping[str, str]) -> dict[str, str]:
    """The environment that makes each `${secret:NAME}` resolve to its value."""
    return {env_var_name(name): value for name, value in secrets.items()}


@asynccontextmanager
async def action_resources(
    secrets: Mapping[str, str] | None = None,
    *,
    resolver: Resolver | None = None,
    allow: list[str] | None = None,
    clock: FakeClock | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 -- the actions' per-request deadline
) -> AsyncIterator[Resources]:
    http = OutboundHttp(
        guard=Guard(LOOPBACK if allow is None else allow),
        resolver=resolver or StubResolver({}),
        timeout=timeout,
    )
    await http.start()
    try:
        yield Resources(
            http=http,
            secret=SecretResolver(
                credentials_dir=None, secrets_dir=None, environ=secret_env(secrets or {})
            ),
            clock=clock or FakeClock(),
            timeout=timeout,
        )
    finally:
        await http.close()


def make_job(values: Mapping[str, str] | None = None, key: str = KEY) -> Job:
    base = {
        "conversion_id": "T-1",
        "offer": "1",
        "affiliate": "42",
        "postback_id": "7",
        "delivery_id": "d-1",
        "idempotency_key": key,
    }
    base.update(values or {})
    return Job(
        postback_id=7,
        delivery_id="d-1",
        idempotency_key=key,
        values=base,
        data=dict(base),
    )


def validate(tmp_path: Path, settings: str) -> list[str]:
    """The `file:line: postback N: message` lines for one postback whose action holds
    `settings` (YAML, unindented; its first line is FIRST_SETTING_LINE); [] when it loads."""
    body = textwrap.indent(textwrap.dedent(settings).strip("\n"), " " * 6)
    text = (
        "offer: 1\n"
        "postbacks:\n"
        "  - id: 7\n"
        "    trigger: conversion_done\n"
        '    affiliate: "*"\n'
        "    status: active\n"
        "    action:\n"
        f"{body}\n"
    )
    rules = tmp_path / "rules.d"
    rules.mkdir(exist_ok=True)
    (rules / "pb.yaml").write_text(text)
    try:
        load_rules(rules, git=False)
    except RulesError as err:
        return [str(issue) for issue in err.issues]
    return []


def rule_file(offer: int, postback_id: int, action: str) -> str:
    """A rule file with one active conversion_done postback for every affiliate."""
    body = textwrap.indent(textwrap.dedent(action).strip("\n"), " " * 6)
    return (
        f"offer: {offer}\n"
        "postbacks:\n"
        f"  - id: {postback_id}\n"
        "    trigger: conversion_done\n"
        '    affiliate: "*"\n'
        "    action:\n"
        f"{body}\n"
    )


def leaks(secret: str, *texts: Any) -> list[str]:
    """The texts (str() of each) that contain `secret`."""
    return [str(t) for t in texts if secret in str(t)]
