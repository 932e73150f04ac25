"""The outbound guard: which IP addresses and URL hosts postbackd may connect to (SPEC 10).

An address is refused when it (or the IPv4 address it embeds: IPv4-mapped, IPv4-compatible,
NAT64, 6to4, Teredo) is loopback, private, link-local, CGNAT, multicast, reserved, unspecified
or a cloud metadata address, unless ``allow_cidrs`` covers it. Embedded addresses are decoded
and checked again, so every spelling of 127.0.0.1 meets the same rule.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from daemon.errors import GuardRefusedError

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
_Table = tuple[tuple[IPv4Network, str], ...] | tuple[tuple[IPv6Network, str], ...]

METADATA = "cloud metadata address"
# Listed before the ranges that contain them so the refusal says what they are; 168.63.129.16
# (Azure wireserver) sits in public space and is caught only here.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)

# First match wins: the narrower ranges come before the wider ones that hold them.
_V4_REFUSED: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), label)
    for net, label in (
        ("0.0.0.0/32", "unspecified address"),
        ("0.0.0.0/8", "reserved address (this network)"),
        ("10.0.0.0/8", "private address"),
        ("100.64.0.0/10", "shared address (CGNAT)"),
        ("127.0.0.0/8", "loopback address"),
        ("169.254.0.0/16", "link-local address"),
        ("172.16.0.0/12", "private address"),
        ("192.0.0.0/24", "reserved address (IETF protocol assignments)"),
        ("192.0.2.0/24", "documentation address"),
        ("192.88.99.0/24", "reserved address (6to4 relay anycast)"),
        ("192.168.0.0/16", "private address"),
        ("198.18.0.0/15", "benchmarking address"),
        ("198.51.100.0/24", "documentation address"),
        ("203.0.113.0/24", "documentation address"),
        ("224.0.0.0/4", "multicast address"),
        ("255.255.255.255/32", "broadcast address"),
        ("240.0.0.0/4", "reserved address"),
    )
)

_V6_REFUSED: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), label)
    for net, label in (
        ("::/128", "unspecified address"),
        ("::1/128", "loopback address"),
        # Local-use NAT64 (RFC 8215): the operator picks where the IPv4 address sits, so no
        # decoding is reliable, and IANA marks the block not globally reachable.
        ("64:ff9b:1::/48", "local-use NAT64 address"),
        ("100::/64", "reserved address (discard-only)"),
        ("2001:2::/48", "benchmarking address"),
        ("2001:db8::/32", "documentation address"),
        ("2001::/23", "reserved address (IETF protocol assignments)"),
        ("3fff::/20", "documentation address"),
        ("5f00::/16", "reserved address (SRv6)"),
        ("fc00::/7", "private address (ULA)"),
        ("fe80::/10", "link-local address"),
        ("fec0::/10", "site-local address"),
        ("ff00::/8", "multicast address"),
    )
)
# Everything outside global unicast that no rule above names (and no embedding explains).
_V6_GLOBAL_UNICAST = IPv6Network("2000::/3")
_V4_COMPATIBLE = IPv6Network("::/96")
_NAT64 = IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = IPv6Network("2002::/16")
_TEREDO = IPv6Network("2001::/32")

# A host made only of numeric labels (decimal, octal or 0x-hex): what inet_aton would decode.
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
# How many URL hosts a guard remembers its verdict on (check_host); past that the least recently
# used are forgotten, so hosts taken from redirects cannot grow it without bound.
HOST_VERDICTS = 4096


class Guard:
    """Decides whether an outbound connection to an address is allowed."""

    def __init__(self, allow_cidrs: Sequence[str] = ()) -> None:
        nets: list[IPNetwork] = []
        for cidr in allow_cidrs:
            try:
                nets.append(ipaddress.ip_network(cidr.strip()))
            except ValueError as err:
                raise ValueError(f"outbound.allow_cidrs: bad CIDR {cidr!r}: {err}") from err
        self._allow = tuple(nets)
        # check_host's verdict per host string: True or False (an IP literal or a name), or
        # the refusal. Its rule (allow_cidrs) is fixed for the guard's life: a reload that
        # changes it builds a new guard, with an empty memory (one cache per guard).
        self._verdict = functools.lru_cache(maxsize=HOST_VERDICTS)(self._verdict_of)

    def check(self, ip: str) -> None:
        """Return if `ip` may be contacted; raise GuardRefusedError naming its class if not."""
        reason = self.refusal(ip)
        if reason is not None:
            raise GuardRefusedError(reason)

    def allowed(self, ip: str) -> bool:
        return self.refusal(ip) is None

    def refusal(self, ip: str) -> str | None:
        """Why `ip` is refused (e.g. "loopback address"), or None when it is allowed."""
        try:
            # A zone index (fe80::1%eth0) names an interface, not a different address.
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return "not an IP address"
        return self._refusal(addr)

    def check_host(self, host: str) -> bool:
        """Check a URL's host before a request: True if it is an IP literal (checked here,
        because aiohttp connects to literals without resolving them), False for a name (whose
        addresses the resolver checks). Legacy numeric spellings (127.1, 0x7f.1, 2130706433,
        0177.0.0.1, 127.0.0.1.) are refused outright: resolvers decode them differently, so
        what we would check might not be what gets connected to.

        The verdict on each host string is remembered (it depends on nothing else): a request
        to the same destination is not parsed and checked again on every hop.
        """
        verdict = self._verdict(host)
        if isinstance(verdict, str):
            raise GuardRefusedError(verdict)
        return verdict

    def _verdict_of(self, host: str) -> bool | str:
        try:
            return self._check_host(host)
        except GuardRefusedError as err:
            return err.detail

    def _check_host(self, host: str) -> bool:
        if ":" in host:
            self.check(host)
            return True
        bare = host[:-1] if host.endswith(".") else host
        labels = bare.split(".")
        if not all(_NUMERIC_LABEL.match(label) for label in labels):
            return False
        if bare == host and _is_canonical_ipv4(labels):
            self.check(host)
            return True
        decoded = decode_legacy_ipv4(bare)
        inner = self._refusal(decoded) if decoded is not None else None
        if inner is not None:
            raise GuardRefusedError(f"{inner} (non-canonical IPv4 spelling)")
        raise GuardRefusedError("non-canonical IPv4 spelling")

    def _allows(self, addr: IPAddress) -> bool:
        return any(addr.version == net.version and addr in net for net in self._allow)

    def _refusal(self, addr: IPAddress) -> str | None:
        if self._allows(addr):
            return None
        if addr in _METADATA_ADDRESSES:
            return METADATA
        if isinstance(addr, IPv4Address):
            return _first_match(addr, _V4_REFUSED)
        return self._refusal_v6(addr)

    def _refusal_v6(self, addr: IPv6Address) -> str | None:
        if addr.is_unspecified or addr.is_loopback:
            return _first_match(addr, _V6_REFUSED)
        embedded = _embedded_ipv4(addr)
        for form, inner in embedded:
            reason = self._refusal(inner)
            if reason is not None:
                return f"{reason} ({form})"
        if embedded:
            return None  # the packets end at the embedded addresses, and they are public
        reason = _first_match(addr, _V6_REFUSED)
        if reason is None and addr not in _V6_GLOBAL_UNICAST:
            return "reserved address"
        return reason


def _first_match(
    addr: IPAddress,
    table: tuple[tuple[IPv4Network, str], ...] | tuple[tuple[IPv6Network, str], ...],
) -> str | None:
    for net, label in table:
        if addr in net:
            return label
    return None


def _embedded_ipv4(addr: IPv6Address) -> list[tuple[str, IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, with the name of each form."""
    low32 = IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.ipv4_mapped is not None:
        return [("IPv4-mapped", addr.ipv4_mapped)]
    if addr in _V4_COMPATIBLE:
        return [("IPv4-compatible", low32)]
    if addr in _NAT64:
        return [("NAT64", low32)]
    if addr.sixtofour is not None:
        return [("6to4", addr.sixtofour)]
    if addr.teredo is not None:
        server, client = addr.teredo
        return [("Teredo client", client), ("Teredo server", server)]
    return []


def _is_canonical_ipv4(labels: list[str]) -> bool:
    return len(labels) == 4 and all(
        label.isdigit() and int(label) <= 255 and (label == "0" or not label.startswith("0"))
        for label in labels
    )


def decode_legacy_ipv4(host: str) -> IPv4Address | None:
    """Decode `host` the way inet_aton does (1 to 4 parts, each decimal, 0-octal or 0x-hex,
    the last part filling the remaining bytes), or None if inet_aton would reject it."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        value = _parse_c_integer(part)
        if value is None:
            return None
        values.append(value)
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (5 - len(values))):
        return None
    number = last
    for i, v in enumerate(head):
        number |= v << (8 * (3 - i))
    return IPv4Address(number)


def _parse_c_integer(text: str) -> int | None:
    lowered = text.lower()
    try:
        if lowered.startswith("0x"):
            return int(lowered[2:] or "0", 16)
        if len(lowered) > 1 and lowered.startswith("0"):
            return int(lowered, 8)
        return int(lowered, 10)
    except ValueError:
        return None
