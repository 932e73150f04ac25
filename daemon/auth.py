"""Who may post to a source (SPEC 6): client address allowlists behind trusted proxies, credentials
(a token, Standard Webhooks signatures, HTTP basic), replay refusal and per-source rate limits.

Secret values are looked up per request (a rotated file takes effect at once), compared in
constant time, and never appear in an error message: errors name the header or parameter only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from multidict import MultiMapping

from daemon.errors import AuthError, ForbiddenError, InputError, SecretError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SecretLookup = Callable[[str], str]

TOKEN_HEADER = "X-Postback-Token"  # noqa: S105 - a header name
WEBHOOK_ID = "webhook-id"
WEBHOOK_TIMESTAMP = "webhook-timestamp"
WEBHOOK_SIGNATURE = "webhook-signature"
DEFAULT_TOLERANCE = 300.0  # the Standard Webhooks recommendation
REPLAY_CAPACITY = 100_000  # ids remembered at most; the oldest-expiring go first
MAX_SIGNATURES = 16  # entries of one webhook-signature header (key rotation needs two or three)
MAX_WEBHOOK_ID = 256
WHSEC_PREFIX = "whsec_"
_TIMESTAMP = re.compile(r"^\d{1,12}$")


class Unauthorized(AuthError):
    """401; `headers` go on the answer (a Basic challenge)."""

    def __init__(self, message: str, field: str | None, challenge: str | None = None) -> None:
        super().__init__(message, field)
        self.headers: Mapping[str, str] = {"WWW-Authenticate": challenge} if challenge else {}


class RateLimited(InputError):
    """429 with Retry-After (whole seconds, at least 1)."""

    status = 429

    def __init__(self, retry_after: float) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(f"rate limit exceeded; retry after {seconds} s")
        self.headers: Mapping[str, str] = {"Retry-After": str(seconds)}


@dataclass(frozen=True)
class Inbound:
    """What credentials are checked against: headers, query parameters and the raw body."""

    headers: MultiMapping[str]
    params: Mapping[str, str]
    body: bytes = b""


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _header(headers: MultiMapping[str], name: str) -> str | None:
    """One header's value; a header repeated with different values is malformed credentials."""
    values = headers.getall(name, [])
    if not values:
        return None
    if any(v != values[0] for v in values[1:]):
        raise Unauthorized(f"{name} header given twice with different values", name)
    return values[0]


def _required(headers: MultiMapping[str], name: str) -> str:
    value = _header(headers, name)
    if not value:
        raise Unauthorized(f"missing {name} header", name)
    return value


class Ticket:
    """A reserved webhook-id: kept when the arrival is committed or refused, released only when
    the sender is told to try again (429, 503), so its retry of the same message is not taken for
    a replay while a refused message can never be sent again, changed or not."""

    def __init__(self, cache: ReplayCache, key: tuple[str, str], expires: float) -> None:
        self._cache, self._key, self._expires = cache, key, expires

    def release(self) -> None:
        self._cache.release(self._key, self._expires)


class ReplayCache:
    """webhook-ids seen in the last tolerance window, in memory (one node; see docs/sources.md)."""

    def __init__(self, capacity: int = REPLAY_CAPACITY) -> None:
        self.capacity = capacity
        self._seen: dict[tuple[str, str], float] = {}
        self._expiry: list[tuple[float, tuple[str, str]]] = []  # heap, with stale entries

    def __len__(self) -> int:
        return len(self._seen)

    def reserve(self, key: tuple[str, str], expires: float, now: float) -> Ticket | None:
        """Remember `key` until `expires`; None when it is already remembered (a replay)."""
        self._drop(lambda at: at <= now)
        if key in self._seen:
            return None
        while len(self._seen) >= self.capacity:
            self._drop(lambda at: True, once=True)
        self._seen[key] = expires
        heapq.heappush(self._expiry, (expires, key))
        return Ticket(self, key, expires)

    def release(self, key: tuple[str, str], expires: float) -> None:
        if self._seen.get(key) == expires:
            del self._seen[key]  # its heap entry goes stale and is skipped later

    def _drop(self, due: Callable[[float], bool], once: bool = False) -> None:
        while self._expiry and due(self._expiry[0][0]):
            at, key = heapq.heappop(self._expiry)
            if self._seen.get(key) == at:
                del self._seen[key]
                if once:
                    return


@dataclass(frozen=True)
class RateLimit:
    requests: int
    per: float
    burst: int

    @property
    def rate(self) -> float:
        return self.requests / self.per


class RateLimiter:
    """A token bucket per source; a bucket whose limit changed on reload starts full again."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[RateLimit, float, float]] = {}

    def wait(self, key: str, limit: RateLimit, now: float) -> float:
        """Take one token: 0.0 when allowed, else the seconds until a token is available."""
        spec, tokens, at = self._buckets.get(key, (limit, float(limit.burst), now))
        if spec != limit:
            spec, tokens, at = limit, float(limit.burst), now
        tokens = min(float(limit.burst), tokens + max(0.0, now - at) * limit.rate)
        if tokens >= 1.0:
            self._buckets[key] = (spec, tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (spec, tokens, now)
        return (1.0 - tokens) / limit.rate


@dataclass
class GateState:
    """What outlives a reload: remembered webhook-ids and rate limit buckets."""

    replay: ReplayCache = field(default_factory=ReplayCache)
    limiter: RateLimiter = field(default_factory=RateLimiter)


def parse_address(text: str) -> IPAddress | None:
    """An address as peers and X-Forwarded-For write it (`[v6]:port`, `v4:port`), IPv4-mapped
    IPv6 read as IPv4; None when it is not an address."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


ACCESS_CACHE_SIZE = 4096  # access decisions each policy keeps (AccessPolicy.check)
ACCESS_CACHE_HOPS = 256  # X-Forwarded-For characters beyond which a decision is not kept

LOOPBACK: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


@dataclass(frozen=True)
class AccessPolicy:
    """`allow_ips`; the client is the peer, or, when the peer is a trusted proxy, the nearest
    untrusted hop of X-Forwarded-For (read right to left).

    `loopback_only` (the built-in `generic` source unless its file opens it): the client must be
    a loopback address, and a request relayed by a proxy we do not trust is refused (a reverse
    proxy on the same host would otherwise make every client look local), and so is a request a
    web browser made (it carries `Origin` or `Sec-Fetch-*`): any page a local user opens could
    otherwise post a form to 127.0.0.1, or reach it by DNS rebinding. Trackers send neither."""

    allow: tuple[IPNetwork, ...] = ()
    trusted_proxies: tuple[IPNetwork, ...] = ()
    loopback_only: bool = False
    # Decisions already made: (peer, X-Forwarded-For values, relayed, from_browser) -> None
    # (the client may post) or the refusal's message. A decision depends on nothing else, and a
    # policy never changes (a reload builds a new one, with an empty cache). Bounded: emptied
    # when full, and long X-Forwarded-For values are decided every time, never kept.
    _decisions: dict[tuple[str | None, tuple[str, ...], bool, bool], str | None] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @property
    def open_beyond_loopback(self) -> bool:
        """Whether a client that is not on this host can get past this policy."""
        if self.loopback_only:
            return False
        return not self.allow or not all(
            net.network_address.is_loopback and net.broadcast_address.is_loopback
            for net in self.allow
        )

    def client_address(self, peer: str | None, forwarded_for: Iterable[str]) -> IPAddress | None:
        address = parse_address(peer) if peer else None
        if address is None or not _within(address, self.trusted_proxies):
            return address
        hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
        for hop in reversed(hops):
            address = parse_address(hop)
            if address is None or not _within(address, self.trusted_proxies):
                return address  # None: a hop we cannot read, so we cannot know the client
        return address

    def check(
        self,
        peer: str | None,
        forwarded_for: Iterable[str],
        relayed: bool = False,
        from_browser: bool = False,
    ) -> None:
        """ForbiddenError unless the client may post; `relayed`: the request carries another
        proxy header (`Forwarded`, `X-Real-IP`), `from_browser`: a header only browsers send
        (`Origin`, `Sec-Fetch-*`); both only matter to `loopback_only`."""
        hops = tuple(forwarded_for)
        key = (peer, hops, relayed, from_browser)
        decisions = self._decisions
        if key in decisions:
            refusal = decisions[key]
        else:
            refusal = self._decide(peer, hops, relayed, from_browser)
            if sum(map(len, hops)) <= ACCESS_CACHE_HOPS:
                if len(decisions) >= ACCESS_CACHE_SIZE:
                    decisions.clear()
                decisions[key] = refusal
        if refusal is not None:
            raise ForbiddenError(refusal)

    def _decide(
        self, peer: str | None, forwarded_for: tuple[str, ...], relayed: bool, from_browser: bool
    ) -> str | None:
        """None when the client may post, else why not (check's ForbiddenError message)."""
        try:
            self._check(peer, forwarded_for, relayed, from_browser)
        except ForbiddenError as err:
            return err.message
        return None

    def _check(
        self, peer: str | None, forwarded_for: tuple[str, ...], relayed: bool, from_browser: bool
    ) -> None:
        if self.loopback_only:
            if from_browser:
                raise ForbiddenError(
                    "this source takes loopback clients only, and not requests a web browser "
                    "makes (a web page could post them)"
                )
            self._check_local(peer, forwarded_for, relayed)
        if not self.allow:
            return
        client = self.client_address(peer, forwarded_for)
        if client is None:
            raise ForbiddenError("client address cannot be determined")
        if not _within(client, self.allow):
            raise ForbiddenError(f"client address {client} is not allowed")

    def _check_local(self, peer: str | None, forwarded_for: tuple[str, ...], relayed: bool) -> None:
        address = parse_address(peer) if peer else None
        untrusted = address is not None and not _within(address, self.trusted_proxies)
        if untrusted and (relayed or any(value.strip() for value in forwarded_for)):
            raise ForbiddenError(
                "this source takes loopback clients only, and the request came through a proxy "
                "that is not in trusted_proxies"
            )
        client = self.client_address(peer, forwarded_for)
        if client is None or not _within(client, LOOPBACK):
            raise ForbiddenError(
                "this source takes loopback clients only (give it auth, allow_ips or public: true "
                "in its file under webhooks/)"
            )


def _within(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(address in network for network in networks)


class Credentials(Protocol):
    @property
    def consumed(self) -> frozenset[str]:
        """Query parameters that carry credentials: never mapped, never stored."""

    def verify(self, inbound: Inbound, secret: SecretLookup, now: float) -> Ticket | None:
        """Raise Unauthorized unless the request carries valid credentials."""


@dataclass(frozen=True)
class TokenCredentials:
    """A shared token in the X-Postback-Token header or, if `param` is set, a query parameter."""

    secret_name: str
    param: str | None = None
    header: str = TOKEN_HEADER

    @property
    def consumed(self) -> frozenset[str]:
        return frozenset({self.param}) if self.param else frozenset()

    def verify(self, inbound: Inbound, secret: SecretLookup, now: float) -> Ticket | None:
        where = self.param or self.header
        given = _header(inbound.headers, self.header)
        if given is None and self.param is not None:
            given = inbound.params.get(self.param)
        if not given:
            raise Unauthorized("missing credentials", where)
        if not hmac.compare_digest(_bytes(given), _bytes(secret(self.secret_name))):
            raise Unauthorized("invalid credentials", where)
        return None


@dataclass(frozen=True)
class BasicCredentials:
    """HTTP basic authentication (RFC 7617); the password is a secret."""

    username: str
    secret_name: str
    realm: str = "postbackd"

    @property
    def consumed(self) -> frozenset[str]:
        return frozenset()

    def verify(self, inbound: Inbound, secret: SecretLookup, now: float) -> Ticket | None:
        challenge = f'Basic realm="{self.realm}", charset="UTF-8"'
        header = _header(inbound.headers, "Authorization")
        if not header:
            raise Unauthorized("missing credentials", "Authorization", challenge)
        scheme, _, encoded = header.strip().partition(" ")
        try:
            if scheme.lower() != "basic":
                raise ValueError(scheme)
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError) as err:
            raise Unauthorized(
                "malformed Authorization header", "Authorization", challenge
            ) from err
        user, colon, password = decoded.partition(b":")
        good_user = hmac.compare_digest(user, _bytes(self.username))
        good_password = hmac.compare_digest(password, _bytes(secret(self.secret_name)))
        if not (colon and good_user and good_password):
            raise Unauthorized("invalid credentials", "Authorization", challenge)
        return None


def signing_key(name: str, value: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; SecretError (naming only the secret) if not."""
    if not value.startswith(WHSEC_PREFIX):
        raise SecretError(f"secret {name} is not a Standard Webhooks secret (whsec_<base64>)")
    try:
        key = base64.b64decode(value[len(WHSEC_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as err:
        raise SecretError(f"secret {name} is not whsec_ followed by base64") from err
    if not key:
        raise SecretError(f"secret {name} is empty after whsec_")
    return key


def parse_signatures(header: str) -> list[bytes]:
    """The v1 signatures of a webhook-signature header (space-separated `version,base64`
    entries; other versions are skipped). Unauthorized when malformed."""
    entries = header.split()
    if not entries or len(entries) > MAX_SIGNATURES:
        raise Unauthorized("malformed webhook-signature header", WEBHOOK_SIGNATURE)
    found: list[bytes] = []
    for entry in entries:
        version, comma, encoded = entry.partition(",")
        if not comma or not version or not encoded:
            raise Unauthorized("malformed webhook-signature header", WEBHOOK_SIGNATURE)
        if version != "v1":
            continue
        try:
            found.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError) as err:
            raise Unauthorized("malformed webhook-signature header", WEBHOOK_SIGNATURE) from err
    if not found:
        raise Unauthorized("no v1 signature in webhook-signature", WEBHOOK_SIGNATURE)
    return found


def _digest(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    return hmac.new(key, _bytes(f"{msg_id}.{timestamp}.") + body, hashlib.sha256).digest()


def sign(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    """One `v1,<base64>` entry: HMAC-SHA256 over `{id}.{timestamp}.{body}`."""
    return "v1," + base64.b64encode(_digest(key, msg_id, timestamp, body)).decode("ascii")


@dataclass(frozen=True)
class StandardWebhooksCredentials:
    """Standard Webhooks signatures: any v1 entry made with any of our secrets (several during a
    key rotation), a timestamp within the tolerance, and a webhook-id not seen before."""

    source: str
    secret_names: tuple[str, ...]
    replay: ReplayCache
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def consumed(self) -> frozenset[str]:
        return frozenset()

    def verify(self, inbound: Inbound, secret: SecretLookup, now: float) -> Ticket | None:
        if inbound.params:
            # Standard Webhooks signs `{id}.{timestamp}.{body}`: a query string is not covered,
            # and a conversion must be read only from what the sender signed (SPEC 6).
            raise InputError(
                "a query string is not covered by the signature: send every parameter in the "
                "signed body",
                "query",
            )
        msg_id = _required(inbound.headers, WEBHOOK_ID)
        stamp = _required(inbound.headers, WEBHOOK_TIMESTAMP)
        signatures = parse_signatures(_required(inbound.headers, WEBHOOK_SIGNATURE))
        if len(msg_id) > MAX_WEBHOOK_ID:
            raise Unauthorized("malformed webhook-id header", WEBHOOK_ID)
        if not _TIMESTAMP.match(stamp):
            raise Unauthorized("malformed webhook-timestamp header", WEBHOOK_TIMESTAMP)
        if abs(now - int(stamp)) > self.tolerance:
            raise Unauthorized(
                f"webhook-timestamp is more than {int(self.tolerance)} s from our clock",
                WEBHOOK_TIMESTAMP,
            )
        keys = [signing_key(name, secret(name)) for name in self.secret_names]
        expected = [_digest(key, msg_id, stamp, inbound.body) for key in keys]
        if not any(hmac.compare_digest(e, g) for e in expected for g in signatures):
            raise Unauthorized("no valid signature", WEBHOOK_SIGNATURE)
        ticket = self.replay.reserve((self.source, msg_id), int(stamp) + self.tolerance, now)
        if ticket is None:
            raise Unauthorized("webhook-id already accepted (replay)", WEBHOOK_ID)
        return ticket


@dataclass(frozen=True)
class Gate:
    """Everything a source checks before it reads a conversion: address, credentials, rate."""

    access: AccessPolicy = AccessPolicy()
    credentials: Credentials | None = None
    rate_limit: RateLimit | None = None
    limiter: RateLimiter | None = None
    secret: SecretLookup | None = None

    @property
    def consumed(self) -> frozenset[str]:
        return self.credentials.consumed if self.credentials else frozenset()

    def authenticate(self, inbound: Inbound, now: float) -> Ticket | None:
        """Unauthorized (401), or SecretError when our own secret cannot be read."""
        if self.credentials is None:
            return None
        if self.secret is None:
            raise SecretError("no secret resolver for a source with credentials")
        return self.credentials.verify(inbound, self.secret, now)

    def throttle(self, source: str, now: float) -> None:
        if self.rate_limit is None or self.limiter is None:
            return
        wait = self.limiter.wait(source, self.rate_limit, now)
        if wait > 0:
            raise RateLimited(wait)


OPEN = Gate()
