"""The affiliate policy, kept by ops in git as `rules.d/affiliates.yaml` (issue 15): what
affiliates may create in the store. Loaded and hot reloaded with the rules; its errors name
`file:line` like a rule file's. Without the file, the defaults below apply.

    actions: [ping_url]        # action types affiliates may create
    when: false                # whether they may write `when:` conditions
    max_postbacks: 20          # live (active or disabled) store postbacks per affiliate
    max_writes_per_minute: 60  # postback writes (create, change, delete) per affiliate and node
    offers: "*"                # "*": every offer that has a rule file; or a list of offer ids
    deny_destinations:         # hosts (exact or glob: "*.corp.example") and CIDRs (10.0.0.0/8)
      - localhost

The checks are pure functions of a policy and a postback (:func:`problems`), so the service and
the reload (which disables postbacks a new policy no longer allows) decide the same way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError
from yarl import URL

from daemon.actions import BUILDERS
from daemon.errors import Issue, RulesError
from daemon.guard import _embedded_ipv4 as embedded_ipv4
from daemon.guard import decode_legacy_ipv4
from daemon.loader import LoadedPostback, pydantic_issues, read_capped
from daemon.rules import Id, Postback
from daemon.store.affiliate_types import FIRST_STORE_ID
from daemon.yamlfile import YamlError, YMap, load_yaml

POLICY_FILE = "affiliates.yaml"
DEFAULT_ACTIONS = ("ping_url",)
DEFAULT_MAX = 20
DEFAULT_WRITES = 60
MAX_LIMIT = 10_000
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def _action_type(value: Any) -> Any:
    if isinstance(value, str) and value not in BUILDERS:
        raise ValueError(f"unknown action type {value!r} (known: {', '.join(sorted(BUILDERS))})")
    return value


def _destination(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip() or len(value) > 253:
        raise ValueError("must be a host name, a glob such as *.corp.example, or a CIDR")
    text = value.strip().lower()
    if "/" in text:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError as err:
            raise ValueError(f"{value!r} is not a CIDR: {err}") from err
        return text
    if "*" in text or "?" in text:
        return text.rstrip(".")
    return canonical_host(text)


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    actions: tuple[Annotated[str, BeforeValidator(_action_type)], ...] = DEFAULT_ACTIONS
    when: StrictBool = False
    max_postbacks: int = Field(default=DEFAULT_MAX, ge=0, le=MAX_LIMIT, strict=True)
    # Each write adds an audit row of up to twice the 64 KiB body: unbounded, 300 PATCHes in
    # 4 s stored 34 MB (red team, issue 15).
    max_writes_per_minute: int = Field(default=DEFAULT_WRITES, ge=1, le=1_000_000, strict=True)
    offers: Literal["*"] | tuple[Id, ...] = "*"
    deny_destinations: tuple[Annotated[str, BeforeValidator(_destination)], ...] = ()

    def offer_allowed(self, offer: str, offers_with_files: Collection[str]) -> bool:
        return offer in offers_with_files and (self.offers == "*" or offer in self.offers)


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    file: str | None  # None: no policy file, the defaults

    def limits(self) -> dict[str, Any]:
        p = self.policy
        return {
            "actions": list(p.actions),
            "when": p.when,
            "max_postbacks": p.max_postbacks,
            "max_writes_per_minute": p.max_writes_per_minute,
            "offers": p.offers if p.offers == "*" else list(p.offers),
        }


DEFAULT_POLICY = LoadedPolicy(Policy(), None)


def load_policy(rules_dir: Path) -> LoadedPolicy:
    """The policy in `rules_dir/affiliates.yaml`, or the defaults when there is none; RulesError
    with `file:line` issues when it is invalid."""
    path = rules_dir / POLICY_FILE
    if not path.exists() and not path.is_symlink():
        return DEFAULT_POLICY
    issues: list[Issue] = []
    data = read_capped(path, POLICY_FILE, issues)
    if data is None:
        raise RulesError(issues)
    try:
        raw = load_yaml(data)
    except YamlError as err:
        raise RulesError([Issue(POLICY_FILE, err.line, err.message)]) from err
    if raw is None:
        return LoadedPolicy(Policy(), POLICY_FILE)
    if not isinstance(raw, YMap):
        line = getattr(raw, "line", 1)
        raise RulesError([Issue(POLICY_FILE, line, "the affiliates policy must be a mapping")])
    try:
        return LoadedPolicy(Policy.model_validate(raw), POLICY_FILE)
    except ValidationError as err:
        raise RulesError(list(pydantic_issues(POLICY_FILE, raw, err))) from err


def destination_host(destination: str) -> str:
    """The host of an action's destination (`scheme://host:port`, or a bare host), in the one
    spelling :func:`canonical_host` gives it."""
    _, sep, rest = destination.partition("://")
    rest = (rest if sep else destination).split("/", 1)[0].rsplit("@", 1)[-1]
    if rest.startswith("[") and "]" in rest:
        return canonical_host(rest[1 : rest.index("]")])
    if rest.count(":") > 1:  # an IPv6 address, written without brackets (origin() does)
        try:
            return canonical_host(str(ipaddress.ip_address(rest)))
        except ValueError:
            rest = rest.rsplit(":", 1)[0]
    elif ":" in rest:
        rest = rest.split(":", 1)[0]
    return canonical_host(rest)


def canonical_host(host: str) -> str:
    """`host` as the outbound client connects to it, so that no spelling of a denied
    destination passes for another (red team, issue 15): IDNA-encoded the way yarl sends it
    (UTS 46 maps fullwidth letters and the ideographic full stop to ASCII ones), lower case,
    without brackets or a trailing dot, and a legacy IPv4 spelling (2130706433, 0x7f.1,
    0177.0.0.1, 127.1) decoded to the address a resolver would connect to."""
    text = host.strip().strip("[]")
    with contextlib.suppress(ValueError):  # not a host yarl would send to: compared as is
        text = URL.build(scheme="http", host=text).raw_host or text
    text = text.lower().rstrip(".")
    if text and all(_NUMERIC_LABEL.match(label) for label in text.split(".")):
        decoded = decode_legacy_ipv4(text)
        if decoded is not None:
            return str(decoded)
    return text


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The address `host` is, and the IPv4 addresses it embeds (IPv4-mapped, NAT64, 6to4,
    Teredo: the packets end there); empty for a name."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return []
    if isinstance(address, ipaddress.IPv6Address):
        return [address, *(inner for _, inner in embedded_ipv4(address))]
    return [address]


def denied(policy: Policy, host: str) -> str | None:
    """The deny_destinations entry that `host` (a name or an address, any spelling) matches,
    if any."""
    host = canonical_host(host)
    addresses = _addresses(host)
    for entry in policy.deny_destinations:
        if "/" in entry:
            network = ipaddress.ip_network(entry, strict=False)
            if any(a.version == network.version and a in network for a in addresses):
                return entry
        elif fnmatchcase(host, entry) or host == entry:
            return entry
    return None


def problems(
    policy: Policy, offer: str, postback: Postback, host: str, offers_with_files: Collection[str]
) -> list[str]:
    """Why the policy refuses this postback (empty: it allows it). Quotas are counted apart."""
    found = []
    kind = postback.action.type
    if kind not in policy.actions:
        allowed = ", ".join(policy.actions) or "none"
        found.append(f"action type {kind} is not allowed for affiliates (allowed: {allowed})")
    if postback.when is not None and not policy.when:
        found.append("when: conditions are not allowed for affiliates")
    if not policy.offer_allowed(offer, offers_with_files):
        found.append(f"offer {offer} is not open to affiliate postbacks")
    entry = denied(policy, host)
    if entry is not None:
        found.append(f"destination {host} is not allowed (deny_destinations: {entry})")
    return found


def file_id_issues(postbacks: Iterable[LoadedPostback]) -> list[Issue]:
    """File postbacks keep below the ids of store postbacks (one id space, issue 15)."""
    return [
        Issue(
            lp.file,
            lp.line,
            f"ids from {FIRST_STORE_ID:,} up belong to affiliate postbacks kept in the store",
            lp.id,
        )
        for lp in postbacks
        if lp.id >= FIRST_STORE_ID
    ]
