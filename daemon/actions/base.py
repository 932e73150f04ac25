"""What every action is: a settings model, and an object that previews and sends one request.

An action module (one per `type:`) holds three things:

- ``Settings``: a pydantic model (``extra="forbid"``, frozen) whose ``type`` field is a Literal
  of the action's name. Every string an ops person may template is a ``Template`` (or
  ``UrlTemplate``) from :mod:`daemon.macros`, so macros and secret references are checked when
  the rules load, never at the first conversion. A credential is a :data:`SecretTemplateStr`
  (exactly one ``${secret:NAME}``); a hosted API's address is a :data:`BaseUrlStr`.
- a class implementing :class:`Action`, built by ``build(settings, resources)``; it does no I/O
  in its constructor.
- its outcome classification: it returns on success and raises ``RetryableError`` or
  ``PermanentError`` (``OutcomeUnknownError`` for a non-idempotent request whose fate is
  unknown). The dispatcher owns the schedule; an action never sleeps or retries by itself.

Each attempt fills ``job.record`` with the request as sent (after :meth:`Redactor.redact`) and
the response, so a failed attempt still leaves a useful record; :func:`send_http` does both
around one request through the shared HTTP client.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Protocol, TypeVar, overload

from pydantic import AfterValidator, BaseModel, ConfigDict

from daemon.errors import RetryableError, SecretError
from daemon.macros import MASK as MASK  # re-exported: records mask with the same ****
from daemon.macros import Template, TemplateStr, encoded_forms
from daemon.models import attempt_values
from daemon.urltemplate import UrlTemplate, UrlTemplateStr

if TYPE_CHECKING:
    from daemon.httpstatus import HttpResponse

BODY_LIMIT = 4096
EXCERPT_LIMIT = 1024
# Header names whose values never reach a record, whatever they hold.
SENSITIVE_HEADERS = re.compile(
    r"^(authorization|proxy-authorization|cookie|set-cookie|x-api-key|api-key|.*token.*|.*secret.*)$",
    re.IGNORECASE,
)


class ActionSettings(BaseModel):
    """Base of every action's settings model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str


# --- settings every action checks the same way ------------------------------------------------


def is_secret_reference(template: Template) -> bool:
    """True when the template is exactly one `${secret:NAME}` and nothing else."""
    names = template.secrets
    return len(names) == 1 and template.source == f"${{secret:{next(iter(names))}}}"


def _secret_only(template: Template) -> Template:
    # A credential written out would sit in git and in every listing of the rules.
    if not is_secret_reference(template):
        raise ValueError("must be a ${secret:NAME} reference, not literal text")
    return template


def _literal(url: UrlTemplate) -> UrlTemplate:
    if url.macros or url.secrets:
        raise ValueError("cannot hold macros or secrets")
    return url


def _no_query(url: UrlTemplate) -> UrlTemplate:
    # The action appends its own path: a query or fragment would end up in front of it.
    if "?" in url.source or "#" in url.source:
        raise ValueError("cannot have a query or a fragment")
    return url


# A credential: exactly one ${secret:NAME}.
SecretTemplateStr = Annotated[TemplateStr, AfterValidator(_secret_only)]
# A URL that is literal text: no macro or secret.
LiteralUrlStr = Annotated[UrlTemplateStr, AfterValidator(_literal)]
# Where a hosted API is (tests point it at a fake): literal, without a query or a fragment.
BaseUrlStr = Annotated[UrlTemplateStr, AfterValidator(_literal), AfterValidator(_no_query)]


def origin(url: UrlTemplate) -> str:
    """`scheme://host:port` of a URL template: the usual `destination` of an action."""
    return f"{url.scheme}://{url.host}:{url.port}"


class Clock(Protocol):
    def now(self) -> float:
        """Unix time in seconds."""
        ...


# A value shorter than this is masked only where it stands whole (not inside a longer word):
# masking every `ab` of a text would shred it, and a whole `key=ab` is exactly the leak.
WHOLE_ONLY_BELOW = 4


class Redactor:
    """Replaces every secret value it was told about (and derived forms) with ****, whatever
    its length: a value of 4 characters or more wherever it occurs, a shorter one wherever it
    stands whole (bounded by anything but a letter or a digit: `?key=ab&`, `"ab"`, `Bearer
    ab`)."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._short: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        if value and value not in self._values:
            self._values.add(value)
            self._short = None

    def redact(self, text: str) -> str:
        if not self._values:  # no secret was handed out for this attempt: nothing to mask
            return text
        for value in sorted(self._values, key=len, reverse=True):
            if len(value) >= WHOLE_ONLY_BELOW:
                text = text.replace(value, MASK)
        return self._short_pattern().sub(MASK, text) if self._has_short() else text

    def _has_short(self) -> bool:
        return any(len(v) < WHOLE_ONLY_BELOW for v in self._values)

    def _short_pattern(self) -> re.Pattern[str]:
        if self._short is None:
            short = sorted((v for v in self._values if len(v) < WHOLE_ONLY_BELOW), key=len)
            alternatives = "|".join(re.escape(v) for v in reversed(short))
            self._short = re.compile(rf"(?<![^\W_])(?:{alternatives})(?![^\W_])")
        return self._short

    def headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        return {k: MASK if _sensitive(k) else self.redact(v) for k, v in headers.items()}


# Remembered per name (a few distinct names: the rules' and the actions' own; bounded all the
# same).
@functools.lru_cache(maxsize=1024)
def _sensitive(name: str) -> bool:
    """Whether a header name is one of SENSITIVE_HEADERS."""
    return SENSITIVE_HEADERS.match(name) is not None


@dataclass
class RequestRecord:
    """The request as sent (or as it would be sent, for explain), secrets masked."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "url": self.url, "headers": self.headers, "body": self.body}


@dataclass
class AttemptRecord:
    """Filled in by the action during one attempt; the dispatcher stores it."""

    request: RequestRecord | None = None
    response_status: int | None = None
    response_excerpt: str | None = None

    def set_request(
        self,
        redactor: Redactor,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: str | bytes | None = None,
    ) -> None:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        if text is not None:
            text = redactor.redact(text)[:BODY_LIMIT]
        self.request = RequestRecord(
            method, redactor.redact(url), redactor.headers(headers or {}), text
        )

    def set_response(self, redactor: Redactor, status: int | None, body: str | bytes) -> None:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        self.response_status = status
        self.response_excerpt = redactor.redact(text[:EXCERPT_LIMIT])


_T = TypeVar("_T")


class AttemptValues(Mapping[str, str]):
    """An attempt's macro values whose `rand` (a new UUID for each attempt) is drawn when it is
    first read, then kept for the attempt: most templates never use it, and drawing one reads
    the system's random source on every attempt."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values  # `rand` among them once drawn

    def _rand(self) -> str:
        value = self._values["rand"] = str(uuid.uuid4())
        return value

    def __getitem__(self, key: str) -> str:
        value = self._values.get(key)
        if value is not None:
            return value
        if key == "rand":
            return self._rand()
        raise KeyError(key)

    @overload
    def get(self, key: str, /) -> str | None: ...
    @overload
    def get(self, key: str, /, default: str | _T) -> str | _T: ...
    def get(self, key: str, /, default: object = None) -> object:
        value = self._values.get(key)
        if value is not None:
            return value
        return self._rand() if key == "rand" else default

    def __contains__(self, key: object) -> bool:
        return key == "rand" or key in self._values

    def __iter__(self) -> Iterator[str]:
        if "rand" not in self._values:
            self._rand()  # every value is asked for
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values) + ("rand" not in self._values)


@dataclass
class Job:
    """One attempt of one delivery, as an action sees it."""

    postback_id: int
    delivery_id: str
    idempotency_key: str
    values: Mapping[str, str]  # macro name -> value (see daemon.macros), already complete
    data: Mapping[str, Any]  # the conversion data of SPEC 5 (JSON values)
    record: AttemptRecord = field(default_factory=AttemptRecord)
    redactor: Redactor = field(default_factory=Redactor)
    # The event loop time by which the attempt must end, given (by the dispatcher) only to an
    # action that is `bounded` (see is_bounded): send_http's requests then end by it.
    deadline: float | None = None

    @classmethod
    def for_attempt(
        cls,
        postback_id: int,
        delivery_id: str,
        idempotency_key: str,
        values: Mapping[str, str],
        data: Mapping[str, Any],
        *,
        now: float,
        rand: str | None = None,
        deadline: float | None = None,
    ) -> Job:
        """The job of one attempt: the arrival's macro values plus the per-attempt ones; `rand`
        None: a new UUID, drawn if a template reads it (AttemptValues)."""
        full = attempt_values(
            values,
            postback_id=postback_id,
            delivery_id=delivery_id,
            idempotency_key=idempotency_key,
            now=now,
            rand=rand or "",
        )
        if rand is not None:
            return cls(postback_id, delivery_id, idempotency_key, full, data, deadline=deadline)
        del full["rand"]
        values = AttemptValues(full)
        return cls(postback_id, delivery_id, idempotency_key, values, data, deadline=deadline)


def is_bounded(action: object) -> bool:
    """Whether `action` ends every send by its job's deadline by itself: its `bounded`
    attribute is True when all its send awaits is send_http through the shared client itself
    (whose requests end by `job.deadline`), so the dispatcher needs no timer of its own around
    it. Any other action (SMTP, several requests, a wrapped client that awaits more) is bounded
    by the dispatcher's timer."""
    return getattr(action, "bounded", False) is True


class SecretLookup(Protocol):
    def __call__(self, name: str) -> str:
        """The secret's value; raises SecretError when it does not resolve."""
        ...


class Action(Protocol):
    """One configured action of one postback."""

    # False when a request that was sent but not answered may have done the work (SMS, SMTP
    # after DATA, LMS post...): such failures end as outcome_unknown, never retried blindly.
    idempotent: ClassVar[bool]

    @property
    def destination(self) -> str:
        """The key that per-host concurrency and pausing group by (usually scheme://host:port)."""
        ...

    def preview(self, job: Job) -> RequestRecord:
        """The exact request this job would send, secrets shown as ****. No I/O."""
        ...

    async def send(self, job: Job) -> None:
        """Make the request; fill job.record; return on success, raise DeliveryError if not."""
        ...


Builder = Callable[[Any, "Resources"], Action]


@dataclass(frozen=True)
class Resources:
    """Shared resources handed to every action's constructor."""

    http: Any  # daemon.outbound.OutboundHttp (Any here to keep this module import-light)
    secret: SecretLookup
    clock: Clock
    timeout: float = 10.0
    # For tests only, set from code (never from a rule): hosts an action that pins its service
    # (TrustedForm) may use instead of the real one.
    overrides: Mapping[str, str] = field(default_factory=dict)


def secret_lookup(job: Job, resources: Resources) -> Callable[[str], str]:
    """A secret resolver for one attempt that tells the job's redactor every value it hands out
    (and the encoded forms it may take on the wire), so records and errors can mask them."""

    def lookup(name: str) -> str:
        try:
            value = resources.secret(name)
        except SecretError as err:
            # Checked at load; gone since. Ops can put it back, so the delivery waits for them.
            raise RetryableError("secret_unresolved", str(err)) from err
        for form in encoded_forms(value):  # as it lands in a URL, a form, JSON, XML...
            job.redactor.add(form)
        return value

    return lookup


class _Timed(Protocol):
    @property
    def timeout(self) -> float | None: ...


class HttpAction(Protocol):
    """What send_http needs of an action: its settings' timeout, resources and idempotency."""

    idempotent: ClassVar[bool]
    resources: Resources

    @property
    def settings(self) -> _Timed: ...


async def send_http(
    action: HttpAction,
    job: Job,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    *,
    shown_url: str | None = None,
    follow_redirects: bool | None = None,
) -> HttpResponse:
    """One request of `action` through the shared client, put in job.record before it is sent
    (so a failed attempt still shows it; as `shown_url` when the URL itself is a credential)
    and its answer after."""
    job.record.set_request(job.redactor, method, shown_url or url, headers, body)
    resources = action.resources
    timeout = action.settings.timeout or resources.timeout
    # A bounded action's job carries the attempt's deadline (is_bounded): its client is
    # OutboundHttp, which takes it; any other client is called without it.
    bound: dict[str, Any] = {} if job.deadline is None else {"deadline": job.deadline}
    response: HttpResponse = await resources.http.request(
        method,
        url,
        headers=headers,
        data=body,
        timeout=timeout,
        idempotent=action.idempotent,
        follow_redirects=follow_redirects,
        **bound,
    )
    job.record.set_response(job.redactor, response.status, response.body)
    return response
