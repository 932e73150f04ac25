"""The outbound guard's corpus: every address form, as an address and as a URL host.

URL forms go through OutboundHttp.request with a stub resolver; a tripwire on the event loop's
sock_connect records every connect attempt (and refuses any to a non-loopback address without
touching the network), so "refused" also means "no connection was attempted".
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator

import pytest

from daemon.errors import GuardRefusedError
from daemon.guard import Guard, decode_legacy_ipv4
from daemon.outbound import OutboundHttp
from tests.harness import StubResolver

LOOP = "loopback address"
PRIV = "private address"
META = "cloud metadata address"
DOC = "documentation address"

# (address, the refusal the guard must give, or None when it must pass)
CORPUS: list[tuple[str, str | None]] = [
    # IPv4
    ("127.0.0.1", LOOP),
    ("127.255.255.254", LOOP),
    ("10.0.0.1", PRIV),
    ("172.16.0.1", PRIV),
    ("172.31.255.255", PRIV),
    ("192.168.1.1", PRIV),
    ("100.64.0.1", "shared address (CGNAT)"),
    ("100.127.255.254", "shared address (CGNAT)"),
    ("169.254.1.1", "link-local address"),
    ("169.254.169.254", META),
    ("100.100.100.200", META),
    ("168.63.129.16", META),
    ("0.0.0.0", "unspecified address"),
    ("0.1.2.3", "reserved address (this network)"),
    ("192.0.0.8", "reserved address (IETF protocol assignments)"),
    ("192.0.2.1", DOC),
    ("198.51.100.7", DOC),
    ("203.0.113.9", DOC),
    ("198.18.0.1", "benchmarking address"),
    ("198.19.255.255", "benchmarking address"),
    ("192.88.99.1", "reserved address (6to4 relay anycast)"),
    ("224.0.0.1", "multicast address"),
    ("239.255.255.250", "multicast address"),
    ("240.0.0.1", "reserved address"),
    ("255.255.255.255", "broadcast address"),
    # IPv6
    ("::1", LOOP),
    ("::", "unspecified address"),
    ("fe80::1", "link-local address"),
    ("fe80::1%eth0", "link-local address"),
    ("fc00::1", "private address (ULA)"),
    ("fd12:3456::1", "private address (ULA)"),
    ("fd00:ec2::254", META),
    ("fec0::1", "site-local address"),
    ("ff02::1", "multicast address"),
    ("2001:db8::1", DOC),
    ("3fff::1", DOC),
    ("100::1", "reserved address (discard-only)"),
    ("2001:2::1", "benchmarking address"),
    ("2001:10::1", "reserved address (IETF protocol assignments)"),
    ("5f00::1", "reserved address (SRv6)"),
    ("1::1", "reserved address"),
    ("4000::1", "reserved address"),
    # IPv4 embedded in IPv6
    ("::ffff:127.0.0.1", f"{LOOP} (IPv4-mapped)"),
    ("::ffff:7f00:1", f"{LOOP} (IPv4-mapped)"),
    ("::ffff:169.254.169.254", f"{META} (IPv4-mapped)"),
    ("::ffff:10.0.0.1", f"{PRIV} (IPv4-mapped)"),
    ("::ffff:0.0.0.0", "unspecified address (IPv4-mapped)"),
    ("::127.0.0.1", f"{LOOP} (IPv4-compatible)"),
    ("::10.0.0.1", f"{PRIV} (IPv4-compatible)"),
    ("::2", "reserved address (this network) (IPv4-compatible)"),
    ("64:ff9b::127.0.0.1", f"{LOOP} (NAT64)"),
    ("64:ff9b::a9fe:a9fe", f"{META} (NAT64)"),
    ("64:ff9b::10.1.2.3", f"{PRIV} (NAT64)"),
    ("64:ff9b:1::a00:1", "local-use NAT64 address"),
    ("64:ff9b:1::5db8:d70e", "local-use NAT64 address"),
    ("2002:7f00:1::1", f"{LOOP} (6to4)"),
    ("2002:a9fe:a9fe::1", f"{META} (6to4)"),
    ("2002:c0a8:101::1", f"{PRIV} (6to4)"),
    # Teredo: the client address is stored inverted (RFC 4380).
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", f"{DOC} (Teredo client)"),
    ("2001:0:4136:e378::80ff:fffe", f"{LOOP} (Teredo client)"),
    ("2001:0:a00:1::a247:28f1", f"{PRIV} (Teredo server)"),
    # public: must pass
    ("93.184.215.14", None),
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("11.0.0.1", None),
    ("172.32.0.1", None),
    ("100.128.0.1", None),
    ("169.255.0.1", None),
    ("198.20.0.1", None),
    ("2606:2800::1", None),
    ("2a00:1450:4001::1", None),
    ("2001:db9::1", None),
    ("::ffff:93.184.215.14", None),
    ("64:ff9b::5db8:d70e", None),
    ("2002:5db8:d70e::1", None),
    ("2001:0:4136:e378:8000:63bf:a247:28f1", None),
]

# URL hosts spelled oddly: (host as written in the URL, the refusal)
ODD_HOSTS: list[tuple[str, str]] = [
    ("2130706433", f"{LOOP} (non-canonical IPv4 spelling)"),
    ("017700000001", f"{LOOP} (non-canonical IPv4 spelling)"),
    ("0x7f000001", f"{LOOP} (non-canonical IPv4 spelling)"),
    ("0x7f.1", f"{LOOP} (non-canonical IPv4 spelling)"),
    ("0X7F.0.0.1", f"{LOOP} (non-canonical IPv4 spelling)"),
    ("127.1", f"{LOOP} (non-canonical IPv4 spelling)"),
    ("127.0.1", f"{LOOP} (non-canonical IPv4 spelling)"),
    ("0177.0.0.1", f"{LOOP} (non-canonical IPv4 spelling)"),
    ("127.000.000.001", f"{LOOP} (non-canonical IPv4 spelling)"),
    ("127.0.0.1.", f"{LOOP} (non-canonical IPv4 spelling)"),
    ("10.1", f"{PRIV} (non-canonical IPv4 spelling)"),
    ("3232235777", f"{PRIV} (non-canonical IPv4 spelling)"),
    ("2852039166", f"{META} (non-canonical IPv4 spelling)"),
    # Public, but resolvers disagree on such spellings: refused all the same.
    ("1572395790", "non-canonical IPv4 spelling"),
    ("999.1.1.1", "non-canonical IPv4 spelling"),
    ("1.2.3.4.5", "non-canonical IPv4 spelling"),
]


@pytest.mark.parametrize(("ip", "reason"), CORPUS)
def test_guard_corpus(ip: str, reason: str | None) -> None:
    guard = Guard()
    assert guard.refusal(ip) == reason
    assert guard.allowed(ip) is (reason is None)
    if reason is None:
        guard.check(ip)
    else:
        with pytest.raises(GuardRefusedError) as info:
            guard.check(ip)
        assert info.value.reason == "guard_refused"
        assert info.value.detail == reason


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) + len(ODD_HOSTS) >= 40
    assert sum(reason is None for _, reason in CORPUS) >= 10


@pytest.mark.parametrize(("host", "reason"), ODD_HOSTS)
def test_odd_ipv4_spellings_are_refused_even_when_allowed(host: str, reason: str) -> None:
    # Allowing loopback must not let an ambiguous spelling through: a resolver might read
    # 0177 as octal (127) or decimal (177).
    with pytest.raises(GuardRefusedError) as info:
        Guard().check_host(host)
    assert info.value.detail == reason
    with pytest.raises(GuardRefusedError) as info:
        Guard(["0.0.0.0/0"]).check_host(host)
    assert info.value.detail == "non-canonical IPv4 spelling"


@pytest.mark.parametrize(
    ("host", "literal"),
    [
        ("example.com", False),
        ("example.com.", False),
        ("1e100.net", False),
        ("0x.example", False),
        ("93.184.215.14", True),
        ("2606:2800::1", True),
        ("0.0.0.1", None),
        ("::1", None),
    ],
)
def test_check_host_literals_and_names(host: str, literal: bool | None) -> None:
    if literal is None:
        with pytest.raises(GuardRefusedError):
            Guard().check_host(host)
    else:
        assert Guard().check_host(host) is literal


def test_check_host_remembers_each_verdict_without_changing_it() -> None:
    # Every host of the corpus and the odd spellings, asked twice of one guard: the verdict
    # remembered from the first ask (an IP literal, a name, or the refusal) is the same.
    guard = Guard(["10.0.0.0/8"])
    hosts = [ip for ip, _ in CORPUS] + [h for h, _ in ODD_HOSTS] + ["example.com", "10.1.2.3"]
    for host in hosts:
        first: bool | str
        try:
            first = guard.check_host(host)
        except GuardRefusedError as err:
            first = err.detail
        for _ in range(2):
            try:
                again: bool | str = guard.check_host(host)
            except GuardRefusedError as err:
                again = err.detail
            assert again == first, host
    assert guard.check_host("10.1.2.3") is True


def test_a_guard_with_other_rules_does_not_take_anothers_verdicts() -> None:
    # A reload that changes allow_cidrs builds a new guard: what the old one remembered
    # (allowed, here) must not leak into the new one (refused), nor back.
    opened = Guard(["127.0.0.0/8"])
    closed = Guard()
    assert opened.check_host("127.0.0.1") is True
    with pytest.raises(GuardRefusedError, match="loopback address"):
        closed.check_host("127.0.0.1")
    assert opened.check_host("127.0.0.1") is True


def test_the_guards_memory_of_hosts_is_bounded() -> None:
    import daemon.guard as guard_module

    guard = Guard()
    for i in range(guard_module.HOST_VERDICTS + 10):
        assert guard.check_host(f"h{i}.example") is False
    assert guard._verdict.cache_info().currsize <= guard_module.HOST_VERDICTS
    with pytest.raises(GuardRefusedError, match="loopback address"):
        guard.check_host("127.0.0.1")


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("10.0x10203", "10.1.2.3"),
        ("1.2.3.4.5", None),
        ("256.1.1.1", None),
        ("1.16777216", None),
        ("08.1.1.1", None),
        ("4294967296", None),
        ("", None),
    ],
)
def test_decode_legacy_ipv4_matches_inet_aton(text: str, decoded: str | None) -> None:
    assert decode_legacy_ipv4(text) == (None if decoded is None else ipaddress.ip_address(decoded))
    if decoded is not None:  # the C library agrees (inet_aton does no I/O)
        assert socket.inet_ntoa(socket.inet_aton(text)) == decoded


def test_allow_cidrs_open_exact_ranges_and_their_embedded_forms() -> None:
    guard = Guard(["127.0.0.1/32", "::1/128", "10.0.0.0/8"])
    for ip in ("127.0.0.1", "::1", "10.9.8.7", "::ffff:127.0.0.1", "64:ff9b::7f00:1"):
        guard.check(ip)
    for ip in ("127.0.0.2", "192.168.0.1", "::ffff:127.0.0.2", "169.254.169.254"):
        assert not guard.allowed(ip)


@pytest.mark.parametrize("cidr", ["nope", "10.0.0.0/33", "10.0.0.1/8", "fe80::/129", ""])
def test_bad_allow_cidr_is_named(cidr: str) -> None:
    with pytest.raises(ValueError, match=rf"outbound.allow_cidrs: bad CIDR {cidr!r}"):
        Guard(["127.0.0.1/32", cidr])


def test_garbage_is_refused() -> None:
    assert Guard().refusal("not-an-ip") == "not an IP address"
    assert not Guard(["0.0.0.0/0"]).allowed("example.com")


# --- URL forms through OutboundHttp.request --------------------------------------------------


class Listener:
    """A loopback TCP listener that counts the connections it accepts."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()


@pytest.fixture
async def listener() -> AsyncIterator[tuple[Listener, int]]:
    lst = Listener()
    port = await lst.start()
    yield lst, port
    assert lst.server is not None
    lst.server.close()
    await lst.server.wait_closed()


REFUSED_IPS = [ip for ip, reason in CORPUS if reason is not None]
URL_FORMS = [
    "http://127.0.0.1:{port}/",
    "http://[::1]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://[::ffff:7f00:1]:{port}/",
    "http://[64:ff9b::7f00:1]:{port}/",
    "http://[2002:7f00:1::1]:{port}/",
    "http://[fe80::1%25lo]:{port}/",
    "http://[::]:{port}/",
    "http://0.0.0.0:{port}/",
    "http://\uff11\uff12\uff17.0.0.1:{port}/",  # fullwidth digits: IDNA makes them 127
    "http://localhost:{port}/",
    "http://LOCALHOST.:{port}/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "https://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    *(f"http://{host}:{{port}}/" for host, _ in ODD_HOSTS),
    *(f"http://h{i}.corpus.test:{{port}}/" for i in range(len(REFUSED_IPS))),
]


async def test_url_forms_are_refused_before_any_connection(
    connects: list[tuple[str, int]], listener: tuple[Listener, int]
) -> None:
    lst, port = listener
    names = {f"h{i}.corpus.test": [ip] for i, ip in enumerate(REFUSED_IPS)}
    names |= {"localhost": ["127.0.0.1", "::1"], "localhost.": ["127.0.0.1"]}
    names["metadata.google.internal"] = ["169.254.169.254"]
    resolver = StubResolver(names)
    async with OutboundHttp(guard=Guard(), resolver=resolver, timeout=2.0) as http:
        for form in URL_FORMS:
            url = form.format(port=port)
            with pytest.raises(GuardRefusedError) as info:
                await http.request("GET", url)
            assert info.value.detail, url
    assert connects == []
    assert lst.accepted == 0
    assert set(resolver.calls) == set(names)  # literals never reach the resolver
    # The control: once allowed, the same listener is reached, so the silence meant refusal.
    async with OutboundHttp(guard=Guard(["127.0.0.1/32"]), resolver=resolver) as http:
        response = await http.request("GET", f"http://127.0.0.1:{port}/")
    assert response.status == 204
    assert connects == [("127.0.0.1", port)]
    assert lst.accepted == 1


async def test_a_name_with_one_refused_address_keeps_only_the_allowed(
    connects: list[tuple[str, int]], listener: tuple[Listener, int]
) -> None:
    lst, port = listener
    resolver = StubResolver({"mixed.test": ["10.0.0.1", "169.254.169.254", "127.0.0.1"]})
    async with OutboundHttp(guard=Guard(["127.0.0.1/32"]), resolver=resolver) as http:
        response = await http.request("GET", f"http://mixed.test:{port}/")
    assert response.status == 204
    assert connects == [("127.0.0.1", port)]
    assert lst.accepted == 1
