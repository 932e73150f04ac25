"""smtp: one email per delivery through an SMTP server (STARTTLS, implicit TLS or plain, AUTH)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate
from typing import Any, ClassVar, Literal

import aiosmtplib
from pydantic import ConfigDict, Field, field_validator, model_validator

from daemon.actions.base import (
    ActionSettings,
    Job,
    RequestRecord,
    Resources,
    SecretTemplateStr,
    secret_lookup,
)
from daemon.durations import Duration
from daemon.errors import (
    DeliveryError,
    OutcomeUnknownError,
    PermanentError,
    RenderError,
    RetryableError,
)
from daemon.macros import Template, TemplateStr, encode_header

DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}
QUIT_TIMEOUT = 2.0
# 7bit: non-ASCII bodies go quoted-printable, so no server needs 8BITMIME.
_POLICY = SMTP_POLICY.clone(cte_type="7bit")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"^(?:{_LABEL}\.)*{_LABEL}\.?$|^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*$")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR_SPEC = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*@(?:{_LABEL}\.)+{_LABEL}$")
_MAILBOX = re.compile(r"^(?P<name>[^<>]*?)\s*<(?P<addr>[^<>]*)>$")
# RFC 2047 encoded words are decoded by the email package before it folds a header; a CR/LF
# hidden in one then reaches the wire raw on this CPython (CVE-2024-6923).
_ENCODED_WORD = "=?"


def encode_mail_header(value: str) -> str:
    """A value inside a mail header: no line break and no encoded-word opener."""
    encode_header(value)
    if _ENCODED_WORD in value:
        raise RenderError("a header value carries `=?` (an RFC 2047 encoded word)")
    return value


class Settings(ActionSettings):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    type: Literal["smtp"]
    host: str
    port: int | None = Field(default=None, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: TemplateStr | None = None
    password: SecretTemplateStr | None = None
    validate_certs: bool = True
    ca_file: str | None = None
    from_: TemplateStr = Field(alias="from")
    to: list[TemplateStr] = Field(min_length=1)
    cc: list[TemplateStr] = Field(default_factory=list)
    bcc: list[TemplateStr] = Field(default_factory=list)
    reply_to: TemplateStr | None = None
    subject: TemplateStr
    text: TemplateStr | None = None
    html: TemplateStr | None = None
    helo_name: str | None = None
    timeout: Duration | None = Field(default=None, gt=0, le=120)

    @field_validator("host", "helo_name")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is not None and not _HOST.match(value):
            raise ValueError("must be a host name or IP address (no scheme, port or path)")
        return value

    @field_validator("username")
    @classmethod
    def _username(cls, value: Template | None) -> Template | None:
        if value is not None and value.macros:
            raise ValueError("cannot hold macros")
        return value

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value

    @field_validator("from_", "subject", "reply_to", "to", "cc", "bcc")
    @classmethod
    def _one_line(cls, value: Any) -> Any:
        for template in value if isinstance(value, list) else [value]:
            try:
                if template is not None:
                    encode_mail_header(template.render({}))
            except RenderError:
                raise ValueError("a mail header cannot hold a line break or `=?`") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.security == "none" and self.password is not None:
            raise ValueError(
                "AUTH needs security starttls or tls: it would send the password in clear text"
            )
        if self.security == "none" and self.ca_file is not None:
            raise ValueError("ca_file needs security starttls or tls")
        if self.text is None and self.html is None:
            raise ValueError("give text, html or both")
        return self


@dataclass
class Mail:
    """One rendered message: the bytes for DATA, the envelope, and what the record shows."""

    raw: bytes
    sender: str
    recipients: list[str]
    shown: dict[str, str]
    body: str


@dataclass(frozen=True)
class Login:
    user: str
    password: str = field(repr=False)


@dataclass
class _Progress:
    """How far one conversation got: connect, greeting, starttls, auth, mail, rcpt, data, done."""

    phase: str = "connect"
    sock: socket.socket | None = None
    client: aiosmtplib.SMTP | None = None


class Smtp:
    idempotent: ClassVar[bool] = False  # a message sent before a lost reply may be queued

    def __init__(self, settings: Settings, resources: Resources) -> None:
        self.settings = settings
        self.resources = resources
        self.port = settings.port or DEFAULT_PORTS[settings.security]
        scheme = "smtps" if settings.security == "tls" else "smtp"
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self._origin = f"{scheme}://{host}:{self.port}"
        self._tls: ssl.SSLContext | None = None

    @property
    def destination(self) -> str:
        return self._origin

    def preview(self, job: Job) -> RequestRecord:
        mail = compose(self.settings, job, None, self.resources.clock.now())
        return RequestRecord(
            "SMTP", self._origin, job.redactor.headers(mail.shown), job.redactor.redact(mail.body)
        )

    async def send(self, job: Job) -> None:
        secret = secret_lookup(job, self.resources)
        mail = compose(self.settings, job, secret, self.resources.clock.now())
        login = self._login(job, secret)
        job.record.set_request(job.redactor, "SMTP", self._origin, mail.shown, mail.body)
        tls = await self._tls_context() if self.settings.security != "none" else None
        progress = _Progress()
        try:
            async with asyncio.timeout(self.settings.timeout or self.resources.timeout):
                code, text = await self._converse(progress, tls, login, mail)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as err:
            if isinstance(err, aiosmtplib.SMTPResponseException):
                job.record.set_response(job.redactor, err.code, f"{err.code} {err.message}")
            raise _failure(err, progress.phase, self._origin) from err
        finally:
            await _hang_up(progress)
        job.record.set_response(job.redactor, code, text)

    async def _converse(
        self,
        progress: _Progress,
        tls: ssl.SSLContext | None,
        login: Login | None,
        mail: Mail,
    ) -> tuple[int, str]:
        s = self.settings
        # Through the outbound guard and resolver, like every HTTP request (outbound.allow_cidrs).
        progress.sock = await self.resources.http.connect(s.host, self.port, self._origin)
        progress.phase = "greeting"
        progress.client = client = aiosmtplib.SMTP(
            hostname=s.host,  # TLS checks the certificate against the name, not the address
            sock=progress.sock,
            use_tls=s.security == "tls",
            start_tls=False,  # never opportunistic: STARTTLS below is required or not done
            tls_context=tls,
            timeout=s.timeout or self.resources.timeout,
            local_hostname=s.helo_name or socket.gethostname(),
        )
        await client.connect()  # from here on the client owns (and closes) the socket
        if s.security == "starttls":
            progress.phase = "starttls"
            await client.starttls()
        if login is not None:
            progress.phase = "auth"
            await client.login(login.user, login.password)
        progress.phase = "mail"
        await client.mail(mail.sender)
        progress.phase = "rcpt"
        refused = await _recipients(client, mail.recipients)
        progress.phase = "data"
        reply = await client.data(mail.raw)
        progress.phase = "done"
        note = f" (refused: {', '.join(str(code) for code in refused)})" if refused else ""
        return reply.code, f"{reply.code} {reply.message}{note}"

    def _login(self, job: Job, secret: Callable[[str], str]) -> Login | None:
        s = self.settings
        if s.username is None or s.password is None:
            return None
        user = s.username.render(job.values, encode=encode_header, secret=secret)
        return Login(user, s.password.render(job.values, encode=encode_header, secret=secret))

    async def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            try:
                self._tls = await asyncio.to_thread(self._build_tls)
            except (OSError, ssl.SSLError) as err:
                # Ops can put the file back; until then the delivery waits.
                raise RetryableError("ca_file_unreadable", type(err).__name__) from err
        return self._tls

    def _build_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.settings.ca_file)
        if not self.settings.validate_certs:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def compose(settings: Settings, job: Job, secret: Callable[[str], str] | None, now: float) -> Mail:
    """The message for one job; PermanentError (nothing sent) when it cannot be made safely."""

    def header(template: Template) -> str:
        return template.render(job.values, encode=encode_mail_header, secret=secret)

    def mailboxes(where: str, templates: list[Template]) -> list[Address]:
        found = []
        for template in templates:
            addr, name = _parts(template)
            box = mailbox(header(addr), header(name) if name else None, where)
            if box is not None:
                found.append(box)
        return found

    sender = mailboxes("from", [settings.from_])
    to, cc, bcc = (mailboxes(n, getattr(settings, n)) for n in ("to", "cc", "bcc"))
    if not sender or not to:
        raise PermanentError("no_recipients" if sender else "bad_address", "renders empty")
    message = EmailMessage(policy=_POLICY)
    message["From"], message["To"] = sender, to
    if cc:
        message["Cc"] = cc
    if reply_to := mailboxes("reply_to", [settings.reply_to] if settings.reply_to else []):
        message["Reply-To"] = reply_to
    message["Subject"] = header(settings.subject)
    message["Date"] = formatdate(now, usegmt=True)
    message["Message-ID"] = message_id(job.idempotency_key)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
    text = settings.text.render(job.values, secret=secret) if settings.text else None
    body_html = (
        settings.html.render(job.values, encode=html.escape, secret=secret)
        if settings.html
        else None
    )
    raw = _generate(message, text, body_html)
    shown = {k: str(v) for k, v in message.items() if not k.startswith(("Content-", "MIME"))}
    if bcc:
        shown["Bcc"] = ", ".join(map(str, bcc))  # the envelope's, never a header
    recipients = list(dict.fromkeys(a.addr_spec for a in (*to, *cc, *bcc)))
    body = "\n\n--- text/html ---\n".join(b for b in (text, body_html) if b is not None)
    return Mail(raw, sender[0].addr_spec, recipients, shown, body)


def _generate(message: EmailMessage, text: str | None, body_html: str | None) -> bytes:
    """The message's bytes, refused when its header block holds other header lines than the
    ones set: the last guard against a value the email package folds into a new header."""
    try:
        if text is not None:
            message.set_content(text)
        if body_html is not None and text is not None:
            message.add_alternative(body_html, subtype="html")
        elif body_html is not None:
            message.set_content(body_html, subtype="html")
        raw = message.as_bytes()
    except (UnicodeError, ValueError) as err:
        raise RenderError("a value cannot be encoded (lone surrogate?)") from err
    lines = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    names = [line.split(b":", 1)[0].lower() for line in lines if line[:1] not in (b" ", b"\t")]
    expected = [name.lower().encode() for name in message]
    if names != expected or any(b"\r" in line or b"\n" in line for line in lines):
        raise RenderError("a header value would start a new header line")
    return raw


def _parts(template: Template) -> tuple[Template, Template | None]:
    """An address template as (address, display name): split on its literal `<...>`, so that
    values in the name can never move the address."""
    match = _MAILBOX.match(template.source.strip())
    if match is None:
        return template, None
    return Template(match["addr"]), Template(match["name"])


def mailbox(addr: str, name: str | None, where: str) -> Address | None:
    """The Address of a rendered address (and display name, if the template had one); a
    rendered address alone may be `Name <addr>`. None when empty; PermanentError for anything
    that is not one ASCII address (several addresses, groups, comments...)."""
    addr = addr.strip()
    match = _MAILBOX.match(addr) if name is None else None
    name, addr = (match["name"], match["addr"].strip()) if match else (name or "", addr)
    if not addr:
        return None
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1]
    # A name read out of a value must not look like an address: "a@x)<b@y>" is for b@y.
    looks_like_address = match is not None and "@" in name
    if looks_like_address or not _ADDR_SPEC.match(addr) or len(addr) > 254:
        # No part of the value in the detail: an address is personal data.
        raise PermanentError("bad_address", f"{where}: not one email address")
    local, _, domain = addr.rpartition("@")
    return Address(display_name=name, username=local, domain=domain)


def message_id(key: str) -> str:
    """The same Message-ID for every resend of one delivery, so receivers can spot duplicates."""
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}@postbackd>"


async def _recipients(client: aiosmtplib.SMTP, recipients: list[str]) -> list[int]:
    """RCPT TO each recipient; the codes of those refused. Raises when all are refused (a
    temporary refusal first: a later attempt may then get through)."""
    refused: list[aiosmtplib.SMTPRecipientRefused] = []
    for recipient in recipients:
        try:
            await client.rcpt(recipient)
        except aiosmtplib.SMTPRecipientRefused as err:
            refused.append(err)
    if len(refused) == len(recipients):
        raise min(refused, key=lambda err: err.code >= 500)
    return [err.code for err in refused]


async def _hang_up(progress: _Progress) -> None:
    client = progress.client
    if client is None:
        if progress.sock is not None:
            progress.sock.close()
        return
    if progress.phase == "done":
        # The message is accepted: a failing QUIT changes nothing.
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            async with asyncio.timeout(QUIT_TIMEOUT):
                await client.quit()
    # The client owns the socket now; closing it under a TLS transport would skip the shutdown.
    client.close()


def _failure(err: BaseException, phase: str, origin: str) -> DeliveryError:
    """A failed conversation as a delivery error: a server's 4xx/5xx reply decides by itself;
    a lost or late reply to the message data may hide a delivered message."""
    if isinstance(err, aiosmtplib.SMTPResponseException) and 400 <= err.code < 600:
        reason = f"smtp_{err.code}"
        return RetryableError(reason, origin) if err.code < 500 else PermanentError(reason, origin)
    if phase in ("data", "done"):
        return OutcomeUnknownError(f"{type(err).__name__} after the message data: {origin}")
    if _tls_error(err):
        return RetryableError("tls_failed", origin)
    if phase == "starttls" and type(err) is aiosmtplib.SMTPException:
        return RetryableError("starttls_unsupported", origin)  # a proxy may strip it
    if phase == "auth" and type(err) is aiosmtplib.SMTPException:
        return PermanentError("auth_unsupported", origin)
    if isinstance(err, aiosmtplib.SMTPResponseException):
        return RetryableError("smtp_protocol", origin)
    return RetryableError("timeout" if isinstance(err, TimeoutError) else "disconnected", origin)


def _tls_error(err: BaseException | None) -> bool:
    while err is not None:
        if isinstance(err, ssl.SSLError):
            return True
        err = err.__cause__  # aiosmtplib wraps a failed handshake in SMTPConnectError
    return False


def build(settings: Settings, resources: Resources) -> Smtp:
    return Smtp(settings, resources)
