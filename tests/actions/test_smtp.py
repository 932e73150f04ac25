"""smtp against real aiosmtpd servers on loopback (plain, STARTTLS, implicit TLS, AUTH) with
certificates made in the test: the exact message, header injection refused before the email
package sees it, how every reply and failure is classified, the outbound guard, secrets kept
out of errors, records and logs, load-time validation, and a webhook through to the server."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from email.headerregistry import Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon.actions import smtp
from daemon.actions.base import Resources
from daemon.errors import (
    DeliveryError,
    GuardRefusedError,
    OutcomeUnknownError,
    PermanentError,
    RenderError,
    RetryableError,
)
from daemon.store.base import DeliveryState
from tests.actions.fakes_smtp import Pki, RawServer, SmtpServer
from tests.actions.kit import (
    FIRST_SETTING_LINE,
    KEY,
    StubResolver,
    action_resources,
    end_to_end,
    expect_outcome,
    leaks,
    make_job,
    rule_file,
    validate,
)
from tests.harness import FakeClock

# Implicit TLS is encrypted from the first byte, but aiosmtpd only counts STARTTLS as TLS and
# warns when AUTH is allowed without it.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

USER = "postbacks@example.com"
PASSWORD = "smtpPaSsWoRd-0001"
SECRETS = {"smtp_password": PASSWORD}
NAMES = {"mail.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
L = FIRST_SETTING_LINE
VALUES = {
    "email": "lead@example.org",
    "first_name": "Ann <b>&",
    "payout": "12.50",
    "extra.manager": "Boss <boss@example.net>",
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki"))


def serve(mode: str, pki: Pki | None = None, auth: bool = False) -> Iterator[SmtpServer]:
    server = SmtpServer(mode, pki, (USER, PASSWORD) if auth else None)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def starttls(pki: Pki) -> Iterator[SmtpServer]:
    yield from serve("starttls", pki, auth=True)


@pytest.fixture
def implicit(pki: Pki) -> Iterator[SmtpServer]:
    yield from serve("tls", pki, auth=True)


@pytest.fixture
def plain() -> Iterator[SmtpServer]:
    yield from serve("plain")


@pytest.fixture
async def resources() -> AsyncIterator[Resources]:
    async with action_resources(SECRETS, resolver=StubResolver(NAMES), clock=FakeClock()) as res:
        yield res


def settings_for(port: int, security: str, **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "type": "smtp",
        "host": "mail.test",
        "port": port,
        "security": security,
        "from": "Postbacks <postbacks@example.com>",
        "to": ["{first_name} <{email}>"],
        "subject": "Lead {conversion_id} paid {payout}",
        "text": "Hello {first_name},\npayout {payout}.",
        "timeout": 2,
    }
    if security != "none":
        raw.update(username=USER, password="${secret:smtp_password}")
    raw.update(extra)
    return {k: v for k, v in raw.items() if v is not None}


def action(resources: Resources, raw: dict[str, Any]) -> smtp.Smtp:
    return smtp.build(smtp.Settings.model_validate(raw), resources)


# --- the exact message --------------------------------------------------------------------


async def test_starttls_with_auth_delivers_the_exact_message(
    starttls: SmtpServer, pki: Pki, resources: Resources
) -> None:
    raw = settings_for(
        starttls.port,
        "starttls",
        ca_file=str(pki.ca_file),
        cc=["{extra.manager}", ""],
        bcc=["audit@example.com"],
        reply_to="Desk <desk@example.com>",
        html="<p>Hello {first_name}</p>",
    )
    job = make_job(VALUES)
    await action(resources, raw).send(job)
    (got,) = starttls.received
    assert got.mail_from == "postbacks@example.com"
    assert got.rcpt_tos == ["lead@example.org", "boss@example.net", "audit@example.com"]
    assert got.tls
    assert got.login == USER
    message = got.message
    assert [(k, str(v)) for k, v in message.items()] == [
        ("From", "Postbacks <postbacks@example.com>"),
        ("To", '"Ann <b>&" <lead@example.org>'),
        ("Cc", "Boss <boss@example.net>"),
        ("Reply-To", "Desk <desk@example.com>"),
        ("Subject", "Lead T-1 paid 12.50"),
        ("Date", "Mon, 21 Sep 2026 14:13:20 +0000"),
        ("Message-ID", smtp.message_id(KEY)),
        ("Auto-Submitted", "auto-generated"),
        ("MIME-Version", "1.0"),
        ("Content-Type", message["Content-Type"]),
    ]
    assert message.get_content_type() == "multipart/alternative"
    text, body_html = (part.get_content() for part in message.iter_parts())
    assert text == "Hello Ann <b>&,\npayout 12.50.\n"
    assert body_html == "<p>Hello Ann &lt;b&gt;&amp;</p>\n"  # values HTML-escaped, markup kept
    record = job.record
    assert record.request is not None
    assert record.request.method == "SMTP"
    assert record.request.url == f"smtp://mail.test:{starttls.port}"
    assert record.request.headers["Bcc"] == "audit@example.com"
    assert record.request.headers["Message-ID"] == smtp.message_id(KEY)
    assert record.response_status == 250
    assert record.response_excerpt == "250 2.0.0 OK queued as 4242"


async def test_implicit_tls_with_auth(implicit: SmtpServer, pki: Pki, resources: Resources) -> None:
    raw = settings_for(
        implicit.port, "tls", ca_file=str(pki.ca_file), text=None, html="<b>{payout}</b>"
    )
    job = make_job(VALUES)
    await action(resources, raw).send(job)
    (got,) = implicit.received
    assert got.tls
    assert got.login == USER
    assert got.message.get_content_type() == "text/html"
    assert got.message.get_content() == "<b>12.50</b>\n"
    assert job.record.request is not None
    assert job.record.request.url == f"smtps://mail.test:{implicit.port}"


async def test_plain_relay_without_auth(plain: SmtpServer, resources: Resources) -> None:
    raw = settings_for(plain.port, "none", host="127.0.0.1")
    await action(resources, raw).send(make_job({**VALUES, "first_name": "Zoë"}))
    (got,) = plain.received
    assert not got.tls
    assert got.login is None
    assert got.message["To"] == "Zoë <lead@example.org>"
    assert got.message.get_content() == "Hello Zoë,\npayout 12.50.\n"
    assert got.content.isascii()  # no 8BITMIME or SMTPUTF8 needed


async def test_message_id_is_the_same_for_every_resend(
    plain: SmtpServer, resources: Resources
) -> None:
    sender = action(resources, settings_for(plain.port, "none"))
    await sender.send(make_job(VALUES))
    await sender.send(make_job(VALUES))
    await sender.send(make_job(VALUES, key="generic:T-1:2:7"))
    ids = [got.message["Message-ID"] for got in plain.received]
    assert ids[0] == ids[1] != ids[2]
    assert ids[0] == smtp.message_id(KEY)


def test_preview_shows_the_message_without_secrets() -> None:
    settings = smtp.Settings.model_validate(
        {
            "type": "smtp",
            "host": "smtp.example.com",
            "username": USER,
            "password": "${secret:smtp_password}",
            "from": "pb@example.com",
            "to": ["{email}"],
            "subject": "Lead {conversion_id}",
            "text": "Payout {payout}",
        }
    )
    resources = Resources(http=None, secret=SECRETS.__getitem__, clock=FakeClock())
    preview = smtp.build(settings, resources).preview(make_job(VALUES))
    assert preview.as_dict() == {
        "method": "SMTP",
        "url": "smtp://smtp.example.com:587",
        "headers": {
            "From": "pb@example.com",
            "To": "lead@example.org",
            "Subject": "Lead T-1",
            "Date": "Mon, 21 Sep 2026 14:13:20 +0000",
            "Message-ID": smtp.message_id(KEY),
            "Auto-Submitted": "auto-generated",
        },
        "body": "Payout 12.50",
    }


# --- header injection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject", "hi\r\nBcc: evil@example.com"),
        ("subject", "hi\nBcc: evil@example.com"),
        ("subject", "hi\x85Bcc: evil@example.com"),
        ("subject", "=?utf-8?q?hi=0D=0ABcc:_evil@example.com?="),  # CVE-2024-6923
        ("to", "=?utf-8?q?A=0D=0ABcc:_evil@example.com?= <a@example.com>"),
        ("to", "Ann\r\nBcc: evil@example.com <a@example.com>"),
    ],
)
async def test_header_injection_is_refused_before_sending(
    plain: SmtpServer, resources: Resources, field: str, value: str
) -> None:
    raw = settings_for(
        plain.port, "none", **{field: "{extra.v}" if field == "subject" else ["{extra.v}"]}
    )
    with pytest.raises(RenderError):
        # raw: CR and LF are refused at the door now; a conversion stored before may hold them
        await action(resources, raw).send(make_job(VALUES, raw={"extra.v": value}))
    assert plain.connections == 0


@pytest.mark.parametrize(
    "value",
    [
        "a@example.com, b@example.com",
        "a@example.com b@example.com",
        "group: a@example.com;",
        "not an address",
        "a@localhost",
        "ann@exämple.com",
        "<a@example.com> <b@example.com>",
        "a@example.com)<b@example.com>",
    ],
)
async def test_a_recipient_must_be_one_address(
    plain: SmtpServer, resources: Resources, value: str
) -> None:
    raw = settings_for(plain.port, "none", to=["{extra.v}"])
    with pytest.raises(PermanentError) as info:
        await action(resources, raw).send(make_job({**VALUES, "extra.v": value}))
    assert info.value.reason == "bad_address"
    assert value not in str(info.value)  # an address is personal data
    assert plain.connections == 0


async def test_empty_recipients_are_skipped_but_one_to_is_needed(
    plain: SmtpServer, resources: Resources
) -> None:
    raw = settings_for(plain.port, "none", to=["{extra.a}", "{email}"], cc=["{extra.b}"])
    await action(resources, raw).send(make_job(VALUES))
    assert plain.received[0].rcpt_tos == ["lead@example.org"]
    with pytest.raises(PermanentError) as info:
        await action(resources, raw).send(make_job({"email": ""}))
    assert info.value.reason == "no_recipients"


@settings(max_examples=200)
@given(name=st.text(max_size=40), subject=st.text(max_size=120))
def test_any_value_yields_exactly_our_headers_or_a_refusal(name: str, subject: str) -> None:
    config = smtp.Settings.model_validate(
        {
            "type": "smtp",
            "host": "mail.test",
            "from": "pb@example.com",
            "to": ['"{extra.name}" <a@example.com>', "{extra.name} <b@example.com>"],
            "subject": "{extra.subject} {extra.subject}",
            "text": "x",
        }
    )
    job = make_job(raw={"extra.name": name, "extra.subject": subject})
    try:
        mail = smtp.compose(config, job, None, 0.0)
    except PermanentError:
        return
    head = mail.raw.split(b"\r\n\r\n", 1)[0]
    names = [line.split(b":")[0] for line in head.split(b"\r\n") if line[:1] not in b" \t"]
    assert names == [
        b"From", b"To", b"Subject", b"Date", b"Message-ID", b"Auto-Submitted",
        b"Content-Type", b"Content-Transfer-Encoding", b"MIME-Version",
    ]  # fmt: skip
    assert b"\n" not in head.replace(b"\r\n", b"")
    assert mail.recipients == ["a@example.com", "b@example.com"]


# --- what each reply means ------------------------------------------------------------------

REPLIES: list[tuple[str, dict[str, str], type[DeliveryError], str]] = [
    ("MAIL 451", {"MAIL": "451 4.3.0 try later"}, RetryableError, "smtp_451"),
    ("MAIL 421", {"MAIL": "421 4.7.0 closing"}, RetryableError, "smtp_421"),
    ("MAIL 550", {"MAIL": "550 5.7.1 sender refused"}, PermanentError, "smtp_550"),
    ("MAIL 553", {"MAIL": "553 5.1.8 bad sender"}, PermanentError, "smtp_553"),
    ("RCPT 450", {"RCPT": "450 4.2.1 mailbox busy"}, RetryableError, "smtp_450"),
    ("RCPT 452", {"RCPT": "452 4.5.3 too many"}, RetryableError, "smtp_452"),
    ("RCPT 550", {"RCPT": "550 5.1.1 no such user"}, PermanentError, "smtp_550"),
    ("DATA 451", {"DATA": "451 4.3.0 queue full"}, RetryableError, "smtp_451"),
    ("DATA 552", {"DATA": "552 5.3.4 too big"}, PermanentError, "smtp_552"),
    ("DATA 554", {"DATA": "554 5.7.1 spam"}, PermanentError, "smtp_554"),
    ("no reply to MAIL", {"MAIL": "hang"}, RetryableError, "timeout"),
    ("dropped at MAIL", {"MAIL": "drop"}, RetryableError, "disconnected"),
    ("no reply after DATA", {"DATA": "hang"}, OutcomeUnknownError, "outcome_unknown"),
    ("dropped after DATA", {"DATA": "drop"}, OutcomeUnknownError, "outcome_unknown"),
]


@pytest.mark.parametrize(
    ("script", "error", "reason"), [r[1:] for r in REPLIES], ids=[r[0] for r in REPLIES]
)
async def test_server_replies(
    plain: SmtpServer,
    resources: Resources,
    script: dict[str, str],
    error: type[DeliveryError],
    reason: str,
) -> None:
    plain.handler.script.update(script)
    job = make_job(VALUES)
    sender = action(resources, settings_for(plain.port, "none", timeout=0.5))
    await expect_outcome(sender, job, error, reason)
    assert plain.received == []
    assert job.record.request is not None
    assert plain.connections == 1  # never retried inside the action


async def test_some_recipients_refused_is_success(plain: SmtpServer, resources: Resources) -> None:
    plain.handler.refuse["boss@example.net"] = "550 5.1.1 no such user"
    raw = settings_for(plain.port, "none", cc=["{extra.manager}"])
    job = make_job(VALUES)
    await action(resources, raw).send(job)
    assert plain.received[0].rcpt_tos == ["lead@example.org"]
    assert job.record.response_excerpt == "250 2.0.0 OK queued as 4242 (refused: 550)"


async def test_all_refused_retries_when_one_refusal_is_temporary(
    plain: SmtpServer, resources: Resources
) -> None:
    plain.handler.refuse.update(
        {"lead@example.org": "550 5.1.1 no such user", "boss@example.net": "452 4.2.2 full"}
    )
    raw = settings_for(plain.port, "none", cc=["{extra.manager}"])
    with pytest.raises(RetryableError) as info:
        await action(resources, raw).send(make_job(VALUES))
    assert info.value.reason == "smtp_452"


async def test_wrong_password_is_permanent(
    starttls: SmtpServer, pki: Pki, resources: Resources
) -> None:
    async with action_resources(
        {"smtp_password": "wrong-password"}, resolver=StubResolver(NAMES)
    ) as res:
        with pytest.raises(PermanentError) as info:
            await action(
                res, settings_for(starttls.port, "starttls", ca_file=str(pki.ca_file))
            ).send(make_job(VALUES))
    assert info.value.reason == "smtp_535"
    assert starttls.received == []


@pytest.mark.parametrize(
    ("greeting", "error", "reason"),
    [
        (b"421 4.3.2 busy\r\n", RetryableError, "smtp_421"),
        (b"554 5.7.1 go away\r\n", PermanentError, "smtp_554"),
        (None, RetryableError, "timeout"),
    ],
)
async def test_greetings(
    resources: Resources, greeting: bytes | None, error: type[DeliveryError], reason: str
) -> None:
    raw_server = await RawServer(greeting).start()
    try:
        sender = action(resources, settings_for(raw_server.port, "none", timeout=0.5))
        await expect_outcome(sender, make_job(VALUES), error, reason)
    finally:
        await raw_server.close()


async def test_refused_connection_is_retryable(resources: Resources) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    raw = settings_for(port, "none")
    with pytest.raises(RetryableError) as info:
        await action(resources, raw).send(make_job(VALUES))
    assert info.value.reason == "connect_failed"


async def test_starttls_is_required_never_opportunistic(
    plain: SmtpServer, resources: Resources
) -> None:
    raw = settings_for(plain.port, "starttls")
    with pytest.raises(RetryableError) as info:
        await action(resources, raw).send(make_job(VALUES))
    assert info.value.reason == "starttls_unsupported"
    assert plain.received == []


async def test_server_requiring_starttls_refuses_a_plain_client(
    starttls: SmtpServer, resources: Resources
) -> None:
    with pytest.raises(PermanentError) as info:
        await action(resources, settings_for(starttls.port, "none")).send(make_job(VALUES))
    assert info.value.reason == "smtp_530"


@pytest.mark.parametrize("mode", ["starttls", "tls"])
@pytest.mark.parametrize(
    ("host", "trust"), [("mail.test", False), ("other.test", True)], ids=["untrusted", "wrong name"]
)
async def test_certificate_problems_are_tls_failures(
    pki: Pki, resources: Resources, mode: str, host: str, trust: bool
) -> None:
    server = next(gen := serve(mode, pki, auth=True))
    try:
        extra = {"ca_file": str(pki.ca_file)} if trust else {}
        with pytest.raises(RetryableError) as info:
            await action(resources, settings_for(server.port, mode, host=host, **extra)).send(
                make_job(VALUES)
            )
        assert info.value.reason == "tls_failed"
        assert server.received == []
    finally:
        gen.close()


async def test_validate_certs_off_accepts_any_certificate(
    starttls: SmtpServer, resources: Resources
) -> None:
    raw = settings_for(starttls.port, "starttls", host="other.test", validate_certs=False)
    await action(resources, raw).send(make_job(VALUES))
    assert len(starttls.received) == 1


async def test_missing_ca_file_waits_for_ops(starttls: SmtpServer, resources: Resources) -> None:
    raw = settings_for(starttls.port, "starttls", ca_file="/nonexistent/ca.pem")
    with pytest.raises(RetryableError) as info:
        await action(resources, raw).send(make_job(VALUES))
    assert info.value.reason == "ca_file_unreadable"
    assert starttls.connections == 0


# --- the outbound guard -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["mail.test", "127.0.0.1", "127.1", "0x7f.0.0.1"])
async def test_the_guard_refuses_before_connecting(plain: SmtpServer, host: str) -> None:
    async with action_resources(resolver=StubResolver(NAMES), allow=["192.0.2.1/32"]) as res:
        with pytest.raises(GuardRefusedError) as info:
            await action(res, settings_for(plain.port, "none", host=host)).send(make_job(VALUES))
    assert "loopback address" in info.value.detail or "non-canonical" in info.value.detail
    assert plain.connections == 0


async def test_unknown_name_is_a_dns_failure(plain: SmtpServer, resources: Resources) -> None:
    with pytest.raises(RetryableError) as info:
        await action(resources, settings_for(plain.port, "none", host="nowhere.test")).send(
            make_job(VALUES)
        )
    assert info.value.reason == "dns_failed"
    assert plain.connections == 0


# --- secrets ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [{"DATA": "554 5.7.1 no"}, {"DATA": "hang"}, {}])
async def test_no_secret_in_errors_records_or_logs(
    starttls: SmtpServer, pki: Pki, script: dict[str, str]
) -> None:
    starttls.handler.script.update(script)
    secrets = {"smtp_password": PASSWORD if script else "wrong-but-secret"}
    raw = settings_for(starttls.port, "starttls", ca_file=str(pki.ca_file), timeout=0.5)
    job = make_job(VALUES)
    async with action_resources(secrets, resolver=StubResolver(NAMES)) as res:
        with capture_logs() as logs, pytest.raises(DeliveryError) as info:
            await action(res, raw).send(job)
    assert starttls.connections == 1
    texts = (info.value, repr(info.value), info.value.__cause__, job.record, logs)
    assert leaks(secrets["smtp_password"], *texts) == []


# --- validation ---------------------------------------------------------------------------

A = "pb.yaml:{line}: postback 7: {message}"
GOOD = (
    "type: smtp\nhost: smtp.example.com\nusername: pb@example.com\n"
    "password: ${secret:smtp_pw}\nfrom: pb@example.com\nto: ['{email}']\n"
    "subject: 'Lead {conversion_id}'\ntext: hi\n"
)


@pytest.mark.parametrize(
    ("settings_text", "line", "message"),
    [
        (
            GOOD.replace("smtp.example.com", "smtp://smtp.example.com"),
            L + 1,
            "action.host: must be a host name or IP address (no scheme, port or path)",
        ),
        (GOOD + "port: 70000", L + 8, "action.port: Input should be less than or equal to 65535"),
        (
            GOOD + "security: ssl",
            L + 8,
            "action.security: must be starttls, tls or none, not 'ssl'",
        ),
        (
            GOOD.replace("${secret:smtp_pw}", "hunter22"),
            L + 3,
            "action.password: must be a ${secret:NAME} reference, not literal text",
        ),
        (
            GOOD.replace("password: ${secret:smtp_pw}\n", ""),
            L - 1,
            "action: username and password go together",
        ),
        (
            GOOD + "security: none",
            L - 1,
            "action: AUTH needs security starttls or tls: it would send the password in clear text",
        ),
        (
            GOOD.replace("username: pb@example.com\npassword: ${secret:smtp_pw}\n", "")
            + "security: none\nca_file: /etc/ca.pem",
            L - 1,
            "action: ca_file needs security starttls or tls",
        ),
        (GOOD + "ca_file: ca.pem", L + 8, "action.ca_file: must be an absolute path"),
        (GOOD.replace("text: hi\n", ""), L - 1, "action: give text, html or both"),
        (
            GOOD.replace("to: ['{email}']", "to: []"),
            L + 5,
            "action.to: List should have at least 1 item after validation, not 0",
        ),
        (
            GOOD.replace("subject: 'Lead {conversion_id}'", 'subject: "Lead\\nBcc: x@example.com"'),
            L + 6,
            "action.subject: a mail header cannot hold a line break or `=?`",
        ),
        (
            GOOD + "cc: ['=?utf-8?q?x?= <a@example.com>']",
            L + 8,
            "action.cc: a mail header cannot hold a line break or `=?`",
        ),
        (
            GOOD.replace("'{email}'", "'{emial}'"),
            L + 5,
            "action.to: unknown macro {emial}; did you mean {email}?",
        ),
        (
            GOOD.replace("username: pb@example.com", "username: '{email}'"),
            L + 2,
            "action.username: cannot hold macros",
        ),
        (GOOD + "timeout: 3m", L + 8, "action.timeout: Input should be less than or equal to 120"),
        (GOOD + "attachments: [a.pdf]", L + 8, "unknown key 'action.attachments'"),
        (GOOD.replace("from: pb@example.com\n", ""), L - 1, "missing required key 'action.from'"),
    ],
    ids=[
        "host url",
        "port",
        "security",
        "literal password",
        "username alone",
        "auth in clear",
        "ca_file without tls",
        "relative ca_file",
        "no body",
        "no to",
        "subject line break",
        "encoded word",
        "unknown macro",
        "username macro",
        "timeout",
        "unknown key",
        "missing from",
    ],
)
def test_validation_errors(tmp_path: Path, settings_text: str, line: int, message: str) -> None:
    assert validate(tmp_path, settings_text) == [A.format(line=line, message=message)]


def test_valid_settings_load(tmp_path: Path) -> None:
    assert validate(tmp_path, GOOD) == []
    assert (
        validate(
            tmp_path,
            "type: smtp\nhost: '::1'\nsecurity: none\nfrom: a@b.co\nto: [c@d.co]\nsubject: s\nhtml: h",
        )
        == []
    )


# --- end to end ---------------------------------------------------------------------------


async def test_webhook_to_rule_to_smtp_server(
    tmp_path: Path, starttls: SmtpServer, pki: Pki
) -> None:
    rules = {
        "mail.yaml": rule_file(
            f"""
            type: smtp
            host: mail.test
            port: {starttls.port}
            security: starttls
            ca_file: {pki.ca_file}
            username: {USER}
            password: ${{secret:smtp_password}}
            from: "Postbacks <{USER}>"
            to: ["{{first_name}} <{{email}}>"]
            subject: "Conversion {{conversion_id}} approved"
            text: "Payout {{payout}}"
            """,
            offer=9,
            postback_id=51,
        )
    }
    run = await end_to_end(
        tmp_path,
        rules,
        SECRETS,
        lambda: starttls.received,
        daemon_options={"resolver": StubResolver(NAMES)},
        conversion_id="E1",
        offer=9,
        affiliate=5,
        status="approved",
        payout="7.25",
        email="lead@example.org",
        first_name="Ann",
    )
    (got,) = starttls.received
    assert got.rcpt_tos == ["lead@example.org"]
    assert got.message["Subject"] == "Conversion E1 approved"
    assert got.message["Message-ID"] == smtp.message_id("generic:E1:1:51")
    assert got.message.get_content() == "Payout 7.25\n"
    assert run.state == DeliveryState.SUCCEEDED
    (attempt,) = run.attempts
    assert attempt.outcome == "succeeded"
    assert attempt.response_status == 250
    assert leaks(PASSWORD, attempt, run.logs) == []


def test_address_objects_are_what_the_email_package_quotes() -> None:
    assert str(smtp.mailbox("a@example.com", "Ann, Jr.", "to")) == str(
        Address("Ann, Jr.", "a", "example.com")
    )
