"""HTTP outcomes: the response value, the one classifier of HTTP statuses (and Retry-After),
and the mapping of transport failures onto the delivery errors of :mod:`daemon.errors`.
"""

from __future__ import annotations

import email.utils
from collections.abc import Collection, Mapping
from datetime import UTC
from typing import NamedTuple

import aiohttp

from daemon.errors import DeliveryError, OutcomeUnknownError, PermanentError, RetryableError

RETRY_AFTER_CAP = 3600.0
RETRYABLE_STATUSES = frozenset({408, 425, 429})
# Statuses that say the destination itself is unwell (overloaded, failing, timing out): they
# feed its circuit breaker. 425 (too early) and the 4xx are about the request, not the host.
UNWELL_STATUSES = frozenset({408, 429})


def status_unwell(status: int) -> bool:
    """Whether an HTTP status says the destination is unwell (5xx, 429, 408)."""
    return status in UNWELL_STATUSES or 500 <= status < 600


class HttpResponse(NamedTuple):
    """A response, its body cut at 64 KiB; `url` is the final URL after redirects. Immutable;
    a NamedTuple rather than a frozen dataclass: made for every response, and a frozen
    dataclass's __init__ sets each field through object.__setattr__ (twice the cost)."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str

    def text(self) -> str:
        charset = "utf-8"
        for param in self.headers.get("Content-Type", "").split(";")[1:]:
            key, _, value = param.strip().partition("=")
            if key.lower() == "charset" and value:
                charset = value.strip().strip('"')
        try:
            return self.body.decode(charset, "replace")
        except LookupError:
            return self.body.decode("utf-8", "replace")


def classify_failure(
    err: BaseException, origin: str, idempotent: bool, *, sent: bool
) -> DeliveryError:
    """Map a transport failure: retryable when the request was never sent, else by idempotency.
    `sent` is True once a connection was made (the request may then have reached the server).
    Every transport failure but a bad URL says the destination is unwell."""
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return RetryableError("connect_timeout", origin, unwell=True)
    if isinstance(err, aiohttp.ClientSSLError):
        return RetryableError("tls_failed", origin, unwell=True)
    if isinstance(err, aiohttp.ClientConnectorError):
        return RetryableError("connect_failed", origin, unwell=True)
    if isinstance(err, aiohttp.InvalidURL):
        return PermanentError("bad_url", origin)
    if not sent:
        # aiohttp reports the overall deadline as a bare TimeoutError even during connect.
        reason = "connect_timeout" if isinstance(err, TimeoutError) else "connect_failed"
        return RetryableError(reason, origin, unwell=True)
    if isinstance(err, TimeoutError):
        reason = "timeout"
    elif isinstance(err, aiohttp.ClientResponseError):
        reason = "bad_response"  # the server answered something that is not HTTP
    else:
        reason = "disconnected"
    if idempotent:
        return RetryableError(reason, origin, unwell=True)
    return OutcomeUnknownError(f"{reason}: {origin}", unwell=True)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or HTTP-date), capped at an
    hour; None when absent, unparseable or in the past."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_CAP)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" and asctime dates carry no zone: HTTP dates are UTC
        when = when.replace(tzinfo=UTC)
    delay = when.timestamp() - now
    if delay < 0:
        return None
    return min(delay, RETRY_AFTER_CAP)


def classify_status(
    response: HttpResponse,
    now: float,
    *,
    retryable: Collection[int] = (),
    permanent: Collection[int] = (),
) -> None:
    """The one shared classifier: return on 2xx; raise RetryableError for 408, 425, 429, 5xx
    and `retryable`; PermanentError for the rest. `permanent` wins over both retry lists. The
    error's `unwell` is :func:`status_unwell` of the status."""
    status = response.status
    if 200 <= status < 300:
        return
    if status not in permanent and (
        status in RETRYABLE_STATUSES or 500 <= status < 600 or status in retryable
    ):
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
        raise RetryableError(
            f"http_{status}", retry_after=retry_after, unwell=status_unwell(status)
        )
    raise PermanentError(f"http_{status}", unwell=status_unwell(status))
