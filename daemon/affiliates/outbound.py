"""The shared HTTP client as store postbacks use it: the affiliates policy's
``deny_destinations`` hold at send time too (red team, issue 15).

The policy is checked when a postback is written, on the host it names. That host is not where
the request may end: a name can resolve into a denied CIDR (or be made to later), and a
destination can redirect to a denied host. So every hop of a store postback's request (the
first and each redirect) and every connection it opens (SMTP) is checked against the policy in
force at that moment: the host in any spelling (:func:`daemon.affiliates.policy.denied`), and
for a name, every address it resolves to when the policy denies CIDRs. The outbound guard
(daemon.guard) applies as for every action, after this.

A name re-resolved between this check and the connection (DNS rebinding with a zero TTL) can
still slip through the CIDR part; the global guard is what stops private and local addresses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from yarl import URL

from daemon.affiliates.policy import Policy, canonical_host, denied
from daemon.errors import GuardRefusedError
from daemon.httpstatus import HttpResponse


class PolicyHttp:
    """Wraps :class:`daemon.outbound.OutboundHttp` (anything else is passed through)."""

    def __init__(self, http: Any, policy: Callable[[], Policy]) -> None:
        self._http = http
        self._policy = policy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._http, name)

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 -- passed on: a per-request deadline
        idempotent: bool = True,
        follow_redirects: bool | None = None,
    ) -> HttpResponse:
        response: HttpResponse = await self._http.request(
            method,
            url,
            headers=headers,
            data=data,
            timeout=timeout,
            idempotent=idempotent,
            follow_redirects=follow_redirects,
            check=self._check_hop,
        )
        return response

    async def connect(self, host: str, port: int, origin: str) -> Any:
        await self.check(host, port, origin)
        return await self._http.connect(host, port, origin)

    async def _check_hop(self, target: URL) -> None:
        origin = f"{target.scheme}://{target.raw_host}:{target.port}"
        await self.check(target.raw_host or "", target.port or 0, origin)

    async def check(self, host: str, port: int, origin: str) -> None:
        """GuardRefusedError (naming the origin and the policy entry, never a path or query)
        when the policy denies `host` or an address it resolves to."""
        policy = self._policy()
        if not policy.deny_destinations:
            return
        entry = denied(policy, host)
        if entry is None and any("/" in e for e in policy.deny_destinations):
            name = canonical_host(host)
            if not _is_address(name):
                try:
                    ips = await self._http.resolver.resolve(host.rstrip("."), port)
                except OSError:
                    ips = []  # the request's own resolution reports the DNS failure
                entry = next((e for ip in ips if (e := denied(policy, ip)) is not None), None)
        if entry is not None:
            raise GuardRefusedError(
                f"the affiliates policy denies this destination (deny_destinations: {entry}): "
                f"{origin}"
            )


def _is_address(host: str) -> bool:
    return ":" in host or host.replace(".", "").isdigit()
