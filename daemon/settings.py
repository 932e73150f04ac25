"""The daemon settings of SPEC 4: read once at start from one YAML file and the environment.

This is the only module that reads the environment (`environ` is passed in by the CLI).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from daemon.durations import Duration
from daemon.errors import ConfigError
from daemon.yamlfile import YamlError, YMap, load_yaml

DEFAULT_CONFIG = Path("config/postbackd.yaml")
ENV_PREFIX = "POSTBACKD_"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenSpec(_Model):
    name: str = Field(min_length=1, max_length=100)
    token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    secret: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    role: Literal["admin", "affiliate"]
    affiliate: str | int | None = None

    @model_validator(mode="after")
    def _check(self) -> TokenSpec:
        if (self.token_sha256 is None) == (self.secret is None):
            raise ValueError("give exactly one of token_sha256 or secret")
        if self.role == "affiliate" and self.affiliate is None:
            raise ValueError("an affiliate token needs `affiliate: ID`")
        if self.role == "admin" and self.affiliate is not None:
            raise ValueError("an admin token has no affiliate")
        return self

    @property
    def affiliate_id(self) -> str | None:
        return None if self.affiliate is None else str(self.affiliate)


class Breaker(_Model):
    """The circuit breaker of each destination (docs/scaling.md, "Destination outages")."""

    # Consecutive unwell results (refused, reset, timeout, 5xx, 429) that open it: enough that
    # one slow request or a blip of 1-2 failures does not, few enough that a dead destination
    # costs a handful of attempts.
    threshold: int = Field(default=5, ge=1, le=1000)
    # The first pause before the one probe: a restarting web server is usually back in seconds.
    first_pause: Duration = Field(default=5.0, gt=0, le=3600)
    # Each failed probe multiplies the pause by this, up to max_pause: one probe per max_pause
    # against a destination that stays down costs nothing, and it is noticed within max_pause.
    growth: float = Field(default=2.0, ge=1.0, le=10.0)
    max_pause: Duration = Field(default=60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _pauses(self) -> Breaker:
        if self.max_pause < self.first_pause:
            raise ValueError("breaker.max_pause must not be shorter than breaker.first_pause")
        return self


class Outbound(_Model):
    allow_cidrs: list[str] = Field(default_factory=list)
    timeout: Duration = Field(default=10.0, gt=0, le=300)
    per_host_concurrency: int = Field(default=8, ge=1, le=1000)
    breaker: Breaker = Field(default_factory=Breaker)

    @model_validator(mode="after")
    def _cidrs(self) -> Outbound:
        for cidr in self.allow_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as err:
                raise ValueError(f"allow_cidrs: {cidr!r} is not a CIDR") from err
        return self


class Inbound(_Model):
    read_timeout: Duration = Field(default=10.0, gt=0, le=300)
    trusted_proxies: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cidrs(self) -> Inbound:
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as err:
                raise ValueError(f"trusted_proxies: {cidr!r} is not a CIDR") from err
        return self


class Api(_Model):
    tokens: list[TokenSpec] = Field(default_factory=list)
    metrics_public: StrictBool = True


class Delivery(_Model):
    # How long a node's claim on a delivery lasts. Another node takes the delivery over only
    # after that, so it must outlast any attempt; a node that dies holds its claims this long.
    # The default outlasts the longest action timeout (an LMS auction: 120 s).
    lease: Duration = Field(default=300.0, ge=1, le=86400)
    # Fair use: at most this many attempts (claimed and in progress) per affiliate at once on a
    # node, for postbacks authored by an affiliate's user; the dispatcher keeps 256 in flight,
    # so one affiliate's flood leaves at least three quarters of it to the others.
    per_affiliate_in_flight: int = Field(default=64, ge=1, le=100000)


class Ui(_Model):
    """The web console (docs/console.md)."""

    # Postbacks link to their file:line; with this set, also to `{repository_url}/{file}#L{line}`
    # (e.g. https://git.example.com/ops/rules/blob/main).
    repository_url: str | None = Field(default=None, pattern=r"^https?://[^\s\x00-\x1f]{1,500}$")
    # How long a console sign-in lasts; then the token must be entered again.
    session_ttl: Duration = Field(default=8 * 3600.0, ge=60, le=30 * 86400)


class Log(_Model):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    mask_pii: StrictBool = True


class Settings(_Model):
    listen: str = "127.0.0.1:8080"
    store: str = "sqlite:///../var/postbackd.db"
    rules_dir: Path = Path("../rules.d")
    webhooks_dir: Path = Path("../webhooks")
    secrets_dir: Path | None = None
    outbound: Outbound = Field(default_factory=Outbound)
    inbound: Inbound = Field(default_factory=Inbound)
    api: Api = Field(default_factory=Api)
    delivery: Delivery = Field(default_factory=Delivery)
    log: Log = Field(default_factory=Log)
    ui: Ui = Field(default_factory=Ui)
    retention: Duration = Field(default=30 * 86400.0, gt=0)
    # Performance (docs/benchmarks.md): processes sharing the listening port; the event loop;
    # where the parsed-rules cache goes (default: next to the SQLite file; none on PostgreSQL).
    workers: int = Field(default=1, ge=1, le=64)
    # The dispatcher in a process of its own beside the serving one(s) (daemon/dispatchproc.py):
    # its own event loop and GIL, so ingest cannot starve delivery. Off: each process dispatches.
    dispatcher_process: StrictBool = False
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"  # uvloop when installed (it is)
    state_dir: Path | None = None
    # Not a key of the file: the folder that relative paths are relative to.
    config_dir: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _listen(self) -> Settings:
        split_listen(self.listen)  # ValueError, naming the key, for what is not host:port
        return self

    @model_validator(mode="after")
    def _lease(self) -> Settings:
        if self.delivery.lease <= self.outbound.timeout:
            raise ValueError(
                "delivery.lease must be longer than outbound.timeout "
                "(an attempt must end before its claim does)"
            )
        return self

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    def path(self, value: Path) -> Path:
        return value if value.is_absolute() else (self.config_dir / value).resolve()

    @property
    def rules_path(self) -> Path:
        return self.path(self.rules_dir)

    @property
    def webhooks_path(self) -> Path:
        return self.path(self.webhooks_dir)

    @property
    def secrets_path(self) -> Path | None:
        return self.path(self.secrets_dir) if self.secrets_dir else None


def split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"listen: {value!r} is not host:port (e.g. 127.0.0.1:8080)")
    return host.strip("[]"), int(port)


_TOP_KEYS = tuple(Settings.model_fields)


def config_path(option: str | None, environ: Mapping[str, str]) -> Path | None:
    """The settings file: -c, else $POSTBACKD_CONFIG, else ./config/postbackd.yaml if present."""
    if option:
        return Path(option)
    if environ.get(f"{ENV_PREFIX}CONFIG"):
        return Path(environ[f"{ENV_PREFIX}CONFIG"])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(path: Path | None, environ: Mapping[str, str]) -> Settings:
    """Read the settings file (if any) and apply POSTBACKD_<KEY> overrides; ConfigError if bad."""
    raw: Any = YMap()
    name = str(path) if path else "(defaults)"
    if path is not None:
        try:
            raw = load_yaml(path.read_bytes())
        except OSError as err:
            raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from err
        except YamlError as err:
            raise ConfigError(f"{path}:{err.line}: {err.message}") from err
        if raw is None:
            raw = YMap()
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}:1: the settings file must be a mapping")
    data = dict(raw)
    for key in _TOP_KEYS:
        env = environ.get(f"{ENV_PREFIX}{key.upper()}")
        if env is not None and key != "config_dir":
            data[key] = _env_value(key, env)
    if "config_dir" in data:
        raise ConfigError(f"{name}: unknown key 'config_dir'")
    data["config_dir"] = path.parent.resolve() if path else Path.cwd()
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        from daemon.loader import pydantic_issues

        lines = [str(i).removeprefix(f"{name}:") for i in pydantic_issues(name, raw, err)]
        raise ConfigError("\n".join(f"{name}:{line.lstrip()}" for line in lines)) from err


def _env_value(key: str, text: str) -> Any:
    if key in ("outbound", "inbound", "api", "delivery", "log", "ui", "dispatcher_process"):
        try:
            return load_yaml(text)  # e.g. POSTBACKD_LOG='{level: debug}', or true
        except YamlError as err:
            raise ConfigError(f"{ENV_PREFIX}{key.upper()}: {err.message}") from err
    return text
