"""Inbound sources (SPEC 6): how one tracker's parameters map onto canonical conversion fields,
and the all-or-nothing loader of `webhooks/*.yaml` (and the presets shipped in daemon/presets/).

The file format itself lives in daemon/source_files.py. The built-in `generic` source takes
canonical names as they are, from loopback clients only; a `webhooks/generic.yaml` replaces it
(to add credentials, `allow_ips`, or `public: true` on purpose).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

from daemon.auth import (
    OPEN,
    AccessPolicy,
    BasicCredentials,
    Credentials,
    Gate,
    GateState,
    RateLimit,
    SecretLookup,
    StandardWebhooksCredentials,
    TokenCredentials,
    signing_key,
)
from daemon.errors import InputError, Issue, RulesError, SecretError
from daemon.loader import is_ignored_name, read_capped
from daemon.models import CANONICAL_FIELDS, STATUS_OF, Conversion
from daemon.secrets import SecretResolver
from daemon.source_files import (
    SOURCE_NAME,
    AuthConfig,
    SourceFile,
    check_source_file,
    merge_preset,
    parse_source_file,
    preset_for,
)
from daemon.yamlfile import YMap, line_of

GENERIC = "generic"
SOURCE_SUFFIXES = (".yaml", ".yml")
MAX_LAYOUTS = 64  # per source: Source._layouts

# (parameter, canonical field) for each field a parameter fills, and the parameters left extra
_Layout = tuple[tuple[tuple[str, str], ...], tuple[str, ...]]


@dataclass(frozen=True)
class Source:
    """One inbound source as loaded: its mapping and its gate (address, credentials, rate)."""

    name: str
    fields: Mapping[str, str | None] = field(default_factory=dict)  # canonical -> inbound param
    status_map: Mapping[str, str] = field(default_factory=dict)  # lower-case value -> status
    defaults: Mapping[str, str] = field(default_factory=dict)
    response: Literal["json", "text"] = "json"
    gate: Gate = OPEN
    secrets: frozenset[str] = frozenset()
    public: bool = False  # its file says it takes conversions without credentials on purpose
    file: str = ""  # where it was read from (`webhooks/x.yaml`), for warnings; "" built in

    @cached_property
    def _mapping(self) -> tuple[dict[str, tuple[tuple[int, str], ...]], frozenset[str]]:
        """Inbound parameter -> the canonical fields it fills, each with its place in
        CANONICAL_FIELDS; and the parameters that never land in `extra` (those mapped, even
        when empty, and credentials). Worked out once per loaded source, not per request."""
        consumed = self.gate.consumed
        targets: dict[str, list[tuple[int, str]]] = {}
        for place, name in enumerate(CANONICAL_FIELDS):
            param = self.fields.get(name, name)
            if param is None or param in consumed:
                continue
            targets.setdefault(param, []).append((place, name))
        used = frozenset(consumed).union(targets)
        return {param: tuple(found) for param, found in targets.items()}, used

    @cached_property
    def _layouts(self) -> dict[tuple[str, ...], _Layout]:
        """The layouts worked out so far, by the names of the parameters sent, in their order
        (a tracker sends the same names with every conversion). At most MAX_LAYOUTS are kept:
        past them, names sent in other ways are laid out per request."""
        return {}

    def _layout(self, names: tuple[str, ...]) -> _Layout:
        """Where the parameters named `names` go: the canonical fields they fill, in
        CANONICAL_FIELDS order (the order of the stored fields), and those left as extra."""
        targets, used = self._mapping
        found = sorted(
            (place, name, param)
            for param in names
            if param in targets
            for place, name in targets[param]
        )  # places are unique: names and parameters are never compared
        return tuple((param, name) for _, name, param in found), tuple(
            p for p in names if p not in used
        )

    def to_conversion(self, params: Mapping[str, str]) -> Conversion:
        """Canonical conversion from inbound parameters; InputError names the inbound field."""
        names = tuple(params)
        layouts = self._layouts
        layout = layouts.get(names)
        if layout is None:
            layout = self._layout(names)
            if len(layouts) < MAX_LAYOUTS:
                layouts[names] = layout
        fills, rest = layout
        canonical: dict[str, str] = dict(self.defaults)
        for param, name in fills:  # a parameter sent empty fills nothing (nor is it extra)
            value = params[param]
            if value != "":
                canonical[name] = value
        if "status" in canonical:
            canonical["status"] = self._status(canonical["status"])
        extra = {k: params[k] for k in rest}
        try:
            return Conversion.parse(canonical, extra)
        except InputError as err:
            raise InputError(err.message, self._inbound(err.field or "")) from err

    def _inbound(self, name: str) -> str:
        return self.fields.get(name, name) or name

    def _status(self, value: str) -> str:
        key = value.strip().lower()
        mapped = self.status_map.get(key)
        if mapped is not None:
            return mapped
        if key in STATUS_OF:
            return key
        raise InputError("unknown status value", self._inbound("status"))


GENERIC_SOURCE = Source(GENERIC, gate=Gate(access=AccessPolicy(loopback_only=True)))


def exposure_warnings(sources: Mapping[str, Source]) -> list[tuple[Source, str]]:
    """(source, why) for each source that takes conversions without credentials from clients
    beyond loopback and whose file does not say `public: true`; `validate` prints them and the
    daemon logs them at start."""
    found = []
    for _, source in sorted(sources.items()):
        gate = source.gate
        if gate.credentials is not None or source.public:
            continue
        if not gate.access.open_beyond_loopback:
            continue
        why = (
            "takes conversions without authentication from the addresses of allow_ips"
            if gate.access.allow
            else "takes conversions without authentication from any address"
        )
        found.append((source, f"{why}: give it auth (or write public: true if that is on purpose)"))
    return found


# --- loading ---------------------------------------------------------------------------------


def load_sources(
    webhooks_dir: str | Path | None,
    *,
    secrets: SecretResolver | None = None,
    trusted_proxies: Iterable[str] = (),
    state: GateState | None = None,
) -> dict[str, Source]:
    """Every source of `webhooks_dir` by name; RulesError listing every problem found.

    With `secrets` (the daemon), every referenced secret must resolve and Standard Webhooks
    secrets must be `whsec_<base64>`; without (`validate`), secrets are not looked up."""
    if webhooks_dir is None or not Path(webhooks_dir).is_dir():
        return {}
    root = Path(webhooks_dir)
    prefix = root.name or str(root)
    issues: list[Issue] = []
    found: dict[str, tuple[Source, str, int]] = {}
    state = state or GateState()
    for path in _discover(root, prefix, issues):
        rel = f"{prefix}/{path.name}"
        loaded = _load_file(rel, path, issues, secrets, tuple(trusted_proxies), state)
        if loaded is None:
            continue
        source, line = loaded
        other = found.get(source.name)
        if other is not None:
            issues.append(
                Issue(
                    rel, line, f"duplicate source name {source.name!r} (also {other[1]}:{other[2]})"
                )
            )
            continue
        found[source.name] = (source, rel, line)
    if issues:
        raise RulesError(issues)
    return {name: entry[0] for name, entry in sorted(found.items())}


def _discover(root: Path, prefix: str, issues: list[Issue]) -> list[Path]:
    real_root = root.resolve()
    paths: list[Path] = []
    try:
        names = sorted(os.listdir(root))
    except OSError as err:
        issues.append(Issue(prefix, 0, f"cannot read the directory: {err.strerror or err}"))
        return paths
    for name in names:
        path = root / name
        if is_ignored_name(name) or not name.endswith(SOURCE_SUFFIXES) or path.is_dir():
            continue  # anything else of that name is read_capped's to refuse (a FIFO, a socket)
        if path.resolve().parent != real_root:
            issues.append(
                Issue(f"{prefix}/{name}", 0, "symlink leads out of the webhooks directory")
            )
            continue
        paths.append(path)
    return paths


def _load_file(
    rel: str,
    path: Path,
    issues: list[Issue],
    secrets: SecretResolver | None,
    trusted: tuple[str, ...],
    state: GateState,
) -> tuple[Source, int] | None:
    data = read_capped(path, rel, issues)
    if data is None:
        return None
    spec, raw, problems = parse_source_file(rel, data)
    issues.extend(problems)
    if spec is None or raw is None:
        return None
    if spec.preset is not None:
        base, preset_issues = preset_for(rel, raw, spec.preset)
        issues.extend(preset_issues)
        if base is None:
            return None
        spec = merge_preset(base, spec)
    name = spec.name or path.name.rsplit(".", 1)[0]
    before = len(issues)
    if not SOURCE_NAME.match(name):
        issues.append(Issue(rel, 1, f"{name!r} is not a source name: name it with `name:`"))
    issues.extend(check_source_file(rel, raw, spec))
    issues.extend(_check_secrets(rel, raw, spec, secrets))
    if len(issues) > before:
        return None
    return _build(name, spec, secrets, trusted, state, rel), raw.lines.get("name", 1)


def _check_secrets(
    rel: str, raw: YMap, spec: SourceFile, secrets: SecretResolver | None
) -> list[Issue]:
    if secrets is None or spec.auth is None:
        return []
    kind = next(k for k in ("token", "hmac", "basic") if getattr(spec.auth, k) is not None)
    issues = []
    for index, name in enumerate(spec.auth.secrets):
        line = line_of(raw, ("auth", kind, "secret")) or line_of(raw, ("auth", kind))
        if kind == "hmac" and spec.auth.hmac and spec.auth.hmac.secrets:
            line = line_of(raw, ("auth", kind, "secrets", index))
        if secrets.where(name) is None:
            issues.append(Issue(rel, line, f"secret {name!r} does not resolve"))
        elif spec.auth.hmac is not None:
            try:
                signing_key(name, secrets(name))
            except SecretError as err:
                issues.append(Issue(rel, line, str(err)))
    return issues


def _build(
    name: str,
    spec: SourceFile,
    secrets: SecretLookup | None,
    trusted: tuple[str, ...],
    state: GateState,
    rel: str = "",
) -> Source:
    proxies = spec.trusted_proxies if spec.trusted_proxies is not None else list(trusted)
    access = AccessPolicy(
        tuple(ipaddress.ip_network(c, strict=False) for c in spec.allow_ips or ()),
        tuple(ipaddress.ip_network(c, strict=False) for c in proxies),
        # The built-in name stays a local door unless its file opens it (SPEC 6).
        loopback_only=name == GENERIC and not (spec.auth or spec.allow_ips or spec.public),
    )
    rate = spec.rate_limit
    gate = Gate(
        access=access,
        credentials=_credentials(name, spec.auth, state),
        rate_limit=RateLimit(rate.requests, rate.per, rate.burst or rate.requests)
        if rate
        else None,
        limiter=state.limiter,
        secret=secrets,
    )
    return Source(
        name=name,
        fields=dict(spec.fields or {}),
        status_map=dict(spec.status_map or {}),
        defaults=dict(spec.defaults or {}),
        response=spec.response or "json",
        gate=gate,
        secrets=frozenset(spec.auth.secrets if spec.auth else ()),
        public=bool(spec.public),
        file=rel,
    )


def _credentials(name: str, auth: AuthConfig | None, state: GateState) -> Credentials | None:
    if auth is None:
        return None
    if auth.token is not None:
        return TokenCredentials(auth.token.secret, auth.token.param, auth.token.header)
    if auth.basic is not None:
        return BasicCredentials(auth.basic.username, auth.basic.secret)
    assert auth.hmac is not None
    return StandardWebhooksCredentials(name, auth.hmac.names, state.replay, auth.hmac.tolerance)
