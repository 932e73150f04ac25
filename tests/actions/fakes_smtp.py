"""Real SMTP servers on 127.0.0.1 for the smtp action's tests: aiosmtpd (plain, STARTTLS
required, or implicit TLS; AUTH with one user) whose handler records every accepted message
and can be scripted per command, plus a raw TCP server for greetings aiosmtpd cannot give.
Certificates come from a trustme CA made in the test."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Awaitable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any, Literal

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

Mode = Literal["plain", "starttls", "tls"]
# A reply line for a command, or "hang" (no reply until the server stops) or "drop" (close
# the connection instead of replying).
Script = dict[str, str]


@dataclass
class Got:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    login: str | None

    @property
    def message(self) -> EmailMessage:
        parsed = BytesParser(policy=policy.default).parsebytes(self.content.replace(b"\r\n", b"\n"))
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Handler:
    script: Script = field(default_factory=dict)
    refuse: dict[str, str] = field(default_factory=dict)  # recipient -> reply
    received: list[Got] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        scripted = await self._scripted("MAIL", server)
        if scripted is not None:
            return scripted
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        scripted = await self._scripted("RCPT", server)
        if scripted is not None:
            return scripted
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        scripted = await self._scripted("DATA", server)
        if scripted is not None:
            return scripted
        assert envelope.mail_from is not None
        assert envelope.original_content is not None
        login = session.auth_data.login.decode() if session.authenticated else None
        tls = server.transport is not None and server.transport.get_extra_info("sslcontext")
        got = Got(
            envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, bool(tls), login
        )
        self.received.append(got)
        return "250 2.0.0 OK queued as 4242"

    async def _scripted(self, command: str, server: SMTP) -> str | None:
        reply = self.script.get(command)
        if reply == "hang":
            await asyncio.to_thread(self.released.wait)
            return "421 4.3.0 released"
        if reply == "drop":
            assert server.transport is not None
            server.transport.close()
            return "421 4.3.0 dropped"
        return reply


class _Controller(Controller):
    """aiosmtpd's Controller on a port the OS picked (no race for a "free" port), counting the
    connections it served."""

    def __init__(self, handler: Handler, **kwargs: Any) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        super().__init__(
            handler, hostname="127.0.0.1", port=self._listener.getsockname()[1], **kwargs
        )
        self.connections = 0

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        return self.loop.create_server(
            self._factory_invoker, sock=self._listener, ssl=self.ssl_context
        )

    def factory(self) -> SMTP:
        self.connections += 1
        return super().factory()


@dataclass
class Pki:
    """A CA made for one test, and a server certificate for mail.test and 127.0.0.1."""

    ca: trustme.CA
    ca_file: Path
    server: ssl.SSLContext

    @classmethod
    def make(cls, folder: Path) -> Pki:
        ca = trustme.CA()
        cert = ca.issue_cert("mail.test", "127.0.0.1")
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(server)
        ca_file = folder / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        return cls(ca, ca_file, server)


class SmtpServer:
    """An aiosmtpd server in its own thread. `mode` plain, starttls (required before any mail
    command) or tls (implicit); `auth` (user, password) makes AUTH required."""

    def __init__(
        self, mode: Mode, pki: Pki | None = None, auth: tuple[str, str] | None = None
    ) -> None:
        self.handler = Handler()
        kwargs: dict[str, Any] = {}
        if mode == "starttls":
            assert pki is not None
            kwargs.update(tls_context=pki.server, require_starttls=True)
        elif mode == "tls":
            assert pki is not None
            kwargs.update(ssl_context=pki.server, auth_require_tls=False)
        if auth is not None:
            kwargs.update(authenticator=_authenticator(*auth), auth_required=True)
        self.controller = _Controller(self.handler, **kwargs)

    def start(self) -> SmtpServer:
        self.controller.start()
        self.controller.connections = 0  # start() connected once to see it is up
        return self

    def stop(self) -> None:
        self.handler.released.set()
        self.controller.stop()

    @property
    def port(self) -> int:
        return int(self.controller.port)

    @property
    def connections(self) -> int:
        return self.controller.connections

    @property
    def received(self) -> list[Got]:
        return self.handler.received


def _authenticator(user: str, password: str) -> Any:
    def check(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login == user.encode()
            and data.password == password.encode()
        )
        # handled=False: aiosmtpd then answers a failure itself (535).
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    return check


class RawServer:
    """A TCP server on 127.0.0.1 that sends `greeting` (or nothing) on each connection, then
    waits for the client to leave. Counts connections."""

    def __init__(self, greeting: bytes | None) -> None:
        self.greeting = greeting
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.greeting is not None:
            writer.write(self.greeting)
            await writer.drain()
        await reader.read()
        writer.close()
