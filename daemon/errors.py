"""Every exception postbackd raises on purpose, in one tree.

::

    PostbackdError
    ├── ConfigError            the settings file is invalid (names file:line)
    ├── RulesError             a rule or source set is invalid; carries every Issue found
    ├── ConditionError         JsonLogic that cannot compile (also a ValueError)
    ├── ConditionEvalError     a compiled condition failed on some data (the rule does not fire)
    ├── TemplateError          a macro template that cannot parse (also a ValueError)
    ├── SecretError            a ${secret:NAME} that does not resolve
    ├── InputError             an inbound webhook that is malformed (HTTP 400, names the field)
    │   ├── AuthError          bad or missing credentials (HTTP 401)
    │   ├── ForbiddenError     the client address is not allowed (HTTP 403)
    │   ├── NotFoundError      no such object, or one the caller may not see (HTTP 404)
    │   ├── ConflictError      the write contradicts the object's state (HTTP 409)
    │   └── PolicyError        the affiliate policy refuses it (HTTP 422)
    │       └── TooManyWritesError  over the policy's writes a minute (HTTP 429)
    ├── StoreError             the store cannot read or commit (HTTP 503 on ingest)
    └── DeliveryError          raised by an action during one attempt
        ├── RetryableError     try again later (optionally after `retry_after` seconds)
        └── PermanentError     give up: the delivery ends `dead`
            ├── GuardRefusedError    the outbound guard refused the destination
            ├── RenderError          the request cannot be rendered
            └── OutcomeUnknownError  a non-idempotent request may or may not have been done

Messages never carry secret values: callers redact before raising, and `DeliveryError.reason`
is a short machine-readable tag (``http_503``, ``timeout``, ``outcome_unknown``...).
`DeliveryError.unwell` is the typed fact that the destination itself is unwell (refused or
dropped the connection, timed out, answered 5xx/429/408), set where the failure is classified
(daemon.httpstatus, daemon.outbound); it feeds the destination's circuit breaker.
"""

from __future__ import annotations

from dataclasses import dataclass


class PostbackdError(Exception):
    """The root of every error postbackd raises on purpose."""


class ConfigError(PostbackdError):
    """The daemon settings are invalid."""


@dataclass(frozen=True, order=True)
class Issue:
    """One validation problem, located as precisely as we can."""

    file: str
    line: int
    message: str
    postback_id: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        if self.postback_id is not None:
            return f"{where}: postback {self.postback_id}: {self.message}"
        return f"{where}: {self.message}"


class RulesError(PostbackdError):
    """A rule set (or source set) failed validation; nothing of it was loaded."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = sorted(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class ConditionError(PostbackdError, ValueError):
    """A JsonLogic condition is not valid (unknown operator, wrong arity, too deep...)."""


class ConditionEvalError(PostbackdError):
    """A compiled condition failed while evaluating (NaN arithmetic, operation budget spent, data
    that is not JSON...). Matching treats it as "does not fire". The message carries the engine's
    error tag and the operator, never the data."""

    def __init__(self, error_type: str, operator: str | None = None) -> None:
        self.error_type = error_type
        self.operator = operator
        super().__init__(f"{error_type} in {operator!r}" if operator else error_type)


class TemplateError(PostbackdError, ValueError):
    """A macro template is not valid (unknown macro, unbalanced brace, macro in a URL host...)."""


class SecretError(PostbackdError):
    """A referenced secret cannot be resolved. The message names the secret, never a value."""


class InputError(PostbackdError):
    """An inbound request is malformed. Answered with `status` and `{"error", "field"}`."""

    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        self.message = message
        self.field = field
        super().__init__(message)


class AuthError(InputError):
    status = 401


class ForbiddenError(InputError):
    status = 403


class NotFoundError(InputError):
    """No such object, or one the caller may not see: the same answer either way."""

    status = 404


class ConflictError(InputError):
    """The write contradicts what exists (a file postback, an action type change, a delete
    whose confirmation does not match)."""

    status = 409


class PolicyError(InputError):
    """The affiliate policy (rules.d/affiliates.yaml) refuses what was asked."""

    status = 422


class TooManyWritesError(PolicyError):
    """An affiliate wrote more postback changes in the last minute than the policy allows."""

    status = 429


class StoreError(PostbackdError):
    """The store could not read or commit."""


class DeliveryError(PostbackdError):
    """One attempt of one delivery failed. `reason` is a short tag for records and metrics;
    `unwell` says the destination itself is unwell (not the request or our side)."""

    def __init__(self, reason: str, detail: str = "", *, unwell: bool = False) -> None:
        self.reason = reason
        self.detail = detail
        self.unwell = unwell
        super().__init__(f"{reason}: {detail}" if detail else reason)


class RetryableError(DeliveryError):
    """The attempt may succeed later; `retry_after` (seconds) comes from the service if it said."""

    def __init__(
        self,
        reason: str,
        detail: str = "",
        retry_after: float | None = None,
        *,
        unwell: bool = False,
    ) -> None:
        super().__init__(reason, detail, unwell=unwell)
        self.retry_after = retry_after


class PermanentError(DeliveryError):
    """Retrying cannot help: the delivery ends `dead`."""


class GuardRefusedError(PermanentError):
    """The outbound guard refused every address of the destination."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("guard_refused", detail)


class RenderError(PermanentError):
    """The request could not be rendered from the rule and the conversion."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("render_failed", detail)


class OutcomeUnknownError(PermanentError):
    """A non-idempotent request was sent and its outcome is unknown; an operator decides."""

    def __init__(self, detail: str = "", *, unwell: bool = False) -> None:
        super().__init__("outcome_unknown", detail, unwell=unwell)
