"""The HTTP API of SPEC 12 and `/metrics`: bearer tokens, roles, and who sees which postback.

Every endpoint needs a token from `api.tokens` (`/metrics` only when `api.metrics_public` is
false). Tokens are compared as SHA-256 digests in constant time. An affiliate token sees only
the postbacks of its affiliate's users and their deliveries; anything else answers 404, exactly
as if it did not exist. Retry and reload need an admin token (403 otherwise). Errors are JSON
`{"error": ..., "field": ...}`; bad input is a 400, never a 5xx.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from daemon.api_affiliates import add_affiliate_routes
from daemon.api_views import (
    attempt_view,
    checked_cursor,
    delivery_view,
    parse_query,
    positive_int,
    rules_status_view,
)
from daemon.app import SERVICES, Services, metrics_response
from daemon.errors import (
    AuthError,
    ConfigError,
    ForbiddenError,
    InputError,
    SecretError,
    StoreError,
)
from daemon.loader import RuleSet
from daemon.log import get_logger
from daemon.metrics import CONTENT_TYPE
from daemon.secrets import SecretResolver
from daemon.settings import Settings, TokenSpec
from daemon.store.base import FINAL_STATES, DeliveryFilter, DeliveryState
from daemon.visibility import Viewer

log = get_logger("postbackd.api")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Path parameters are ASCII only: `'²'.isdigit()` is true and int() of it fails (a 500 once).
_DELIVERY_ID = re.compile(r"[A-Za-z0-9]{1,64}")
_RETRYABLE = (DeliveryState.DEAD, DeliveryState.CANCELLED)

ApiHandler = Callable[[web.Request, Services, Viewer], Awaitable[web.StreamResponse]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class NotFound(InputError):
    status = 404


class Conflict(InputError):
    status = 409


class InvalidToken(AuthError):
    """A well-formed bearer token that matches none (RFC 6750 error="invalid_token")."""


# --- tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    name: str
    digest: bytes
    viewer: Viewer


class Tokens:
    """The configured API tokens, each kept only as the SHA-256 digest of its value."""

    def __init__(self, tokens: Sequence[_Token] = ()) -> None:
        self._tokens = tuple(tokens)

    @classmethod
    def resolve(cls, specs: Sequence[TokenSpec], secret: Callable[[str], str]) -> Tokens:
        """Digest each token (reading `secret:` ones now); ConfigError names a missing one."""
        tokens = []
        for spec in specs:
            viewer = (
                Viewer.admin()
                if spec.role == "admin"
                else Viewer.of_affiliate(spec.affiliate_id or "")
            )
            if spec.token_sha256 is not None:
                digest = bytes.fromhex(spec.token_sha256)
            else:
                assert spec.secret is not None
                try:
                    digest = hashlib.sha256(secret(spec.secret).encode()).digest()
                except SecretError as err:
                    raise ConfigError(f"api.tokens: token {spec.name}: {err}") from err
            tokens.append(_Token(spec.name, digest, replace(viewer, name=spec.name)))
        return cls(tokens)

    def authenticate(self, authorization: str | None) -> Viewer:
        """The viewer a `Bearer` Authorization header stands for; AuthError when none."""
        if not authorization:
            raise AuthError("missing bearer token (Authorization: Bearer TOKEN)")
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            raise AuthError("the Authorization header must be Bearer TOKEN")
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
        found: _Token | None = None
        for token in self._tokens:  # every digest is compared: the time says nothing
            if hmac.compare_digest(digest, token.digest) and found is None:
                found = token
        if found is None:
            raise InvalidToken("invalid token")
        return found.viewer


@dataclass
class _State:
    tokens: Tokens
    app: web.Application

    def visible_ids(self, rules: RuleSet, viewer: Viewer) -> frozenset[int] | None:
        """The postback ids `viewer` may see (None: all of them), from the affiliate service's
        owner index (`rules` is the live rule set the service reads itself)."""
        if viewer.is_admin:
            return None
        affiliates = self.app[SERVICES].affiliates
        assert affiliates is not None, "the affiliate service starts with the app"
        # Its owner index: every store write makes a new rule set, and walking 100,000
        # store postbacks again cost 600 ms per write and list (red team, issue 15).
        return affiliates.visible_ids(viewer)


API = web.AppKey("api", _State)


def add_api_routes(app: web.Application, settings: Settings, environ: Mapping[str, str]) -> None:
    """Register /api/v1/... and /metrics. Token secrets are read now: ConfigError names a
    missing one before anything starts."""
    secrets = SecretResolver(
        credentials_dir=environ.get("CREDENTIALS_DIRECTORY"),
        secrets_dir=settings.secrets_path,
        environ=environ,
    )
    app[API] = _State(Tokens.resolve(settings.api.tokens, secrets), app=app)
    add_affiliate_routes(app, _endpoint)  # writes on postbacks, affiliate secrets (issue 15)
    app.router.add_get("/api/v1/postbacks", _endpoint(_list_postbacks))
    app.router.add_get("/api/v1/postbacks/{id}", _endpoint(_get_postback))
    app.router.add_get("/api/v1/deliveries", _endpoint(_list_deliveries))
    app.router.add_get("/api/v1/deliveries/{id}", _endpoint(_get_delivery))
    app.router.add_post("/api/v1/deliveries/{id}/retry", _endpoint(_retry, admin=True))
    app.router.add_post("/api/v1/reload", _endpoint(_reload, admin=True))
    app.router.add_get("/api/v1/rules/status", _endpoint(_rules_status))
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/metrics/dispatcher", _dispatcher_metrics)


def _error(err: InputError) -> web.Response:
    headers = {}
    if isinstance(err, AuthError):
        detail = ', error="invalid_token"' if isinstance(err, InvalidToken) else ""
        headers["WWW-Authenticate"] = f'Bearer realm="postbackd"{detail}'
    body = {"error": err.message, "field": err.field}
    return web.json_response(body, status=err.status, headers=headers)


def _viewer(request: web.Request, *, admin: bool) -> Viewer:
    viewer = request.app[API].tokens.authenticate(request.headers.get("Authorization"))
    if admin and not viewer.is_admin:
        raise ForbiddenError("this needs an admin token")
    return viewer


def is_admin(request: web.Request) -> bool:
    """True when the request carries a valid admin token (no error either way: /readyz)."""
    try:
        return _viewer(request, admin=True).is_admin
    except InputError:
        return False


def _endpoint(handler: ApiHandler, *, admin: bool = False) -> Handler:
    async def endpoint(request: web.Request) -> web.StreamResponse:
        try:
            viewer = _viewer(request, admin=admin)
            return await handler(request, request.app[SERVICES], viewer)
        except InputError as err:
            return _error(err)
        except StoreError as err:
            log.warning("store_error", error=str(err))
            return web.json_response(
                {"error": "the store is unavailable", "field": None}, status=503
            )

    return endpoint


# --- postbacks ------------------------------------------------------------------------------


async def _list_postbacks(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    query = parse_query(request, ("offer", "status"))
    assert services.affiliates is not None
    rows = await services.affiliates.list(viewer, query.get("offer"), query.get("status"))
    return web.json_response({"postbacks": rows})


async def _get_postback(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    assert services.affiliates is not None
    return web.json_response(await services.affiliates.get(viewer, request.match_info["id"]))


# --- deliveries -----------------------------------------------------------------------------


async def _list_deliveries(
    request: web.Request, services: Services, viewer: Viewer
) -> web.Response:
    query = parse_query(request, ("state", "postback", "conversion", "limit", "cursor"))
    state = None
    if "state" in query:
        try:
            state = DeliveryState(query["state"])
        except ValueError:
            names = ", ".join(s.value for s in DeliveryState)
            raise InputError(f"state must be one of {names}", "state") from None
    limit = DEFAULT_LIMIT
    if "limit" in query:
        limit = positive_int(query["limit"], "limit", MAX_LIMIT)
    ids = request.app[API].visible_ids(services.reloader.runtime.rules, viewer)
    if "postback" in query:
        wanted = positive_int(query["postback"], "postback", 2**63 - 1)
        ids = frozenset({wanted}) if ids is None else ids & {wanted}
    flt = DeliveryFilter(state=state, postback_ids=ids, conversion_id=query.get("conversion"))
    cursor = checked_cursor(query.get("cursor"))
    rows, cursor = await services.store.list_deliveries(flt, limit, cursor)
    return web.json_response(
        {"deliveries": [delivery_view(row) for row in rows], "next_cursor": cursor}
    )


async def _visible_delivery(request: web.Request, services: Services, viewer: Viewer) -> Any:
    delivery_id = request.match_info["id"]
    detail = None
    if _DELIVERY_ID.fullmatch(delivery_id):
        detail = await services.store.get_delivery(delivery_id)
    if detail is not None:
        ids = request.app[API].visible_ids(services.reloader.runtime.rules, viewer)
        if ids is None or detail.delivery.postback_id in ids:
            return detail
    raise NotFound(f"no delivery {delivery_id[:64]}")


async def _get_delivery(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    detail = await _visible_delivery(request, services, viewer)
    body = delivery_view(detail.delivery)
    body["attempts"] = [attempt_view(a) for a in detail.attempts]
    return web.json_response(body)


async def _retry(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    detail = await _visible_delivery(request, services, viewer)
    row = detail.delivery
    if row.state not in _RETRYABLE:
        what = "is still pending" if row.state not in FINAL_STATES else "has succeeded"
        raise Conflict(f"delivery {row.delivery_id} {what}: only dead or cancelled ones retry")
    now = datetime.fromtimestamp(services.clock.now(), UTC)
    if await services.store.requeue([row.delivery_id], now) == 0:
        raise Conflict(f"delivery {row.delivery_id} changed state meanwhile")
    services.wake_dispatcher()
    log.info("delivery_requeued", delivery_id=row.delivery_id, postback_id=row.postback_id)
    return web.json_response({"status": "queued", "delivery_id": row.delivery_id})


# --- rules and metrics ----------------------------------------------------------------------


async def _reload(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    ok = await services.reloader.reload("api")
    return web.json_response(rules_status_view(services.reloader), status=200 if ok else 422)


async def _rules_status(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    body = rules_status_view(services.reloader)
    if not viewer.is_admin:
        # Files and error lines name other affiliates' postbacks; an affiliate sees its count.
        rules = services.reloader.runtime.rules
        ids = request.app[API].visible_ids(rules, viewer) or frozenset()
        body = {k: v for k, v in body.items() if k not in ("files", "last_error")}
        body["postbacks"] = len(ids)
    return web.json_response(body)


def _metrics_refused(request: web.Request) -> web.Response | None:
    """/metrics and /metrics/dispatcher: open unless `api.metrics_public` is false, then for an
    admin token only; the refusal, or None."""
    if request.app[SERVICES].settings.api.metrics_public:
        return None
    try:
        _viewer(request, admin=True)
    except InputError as err:
        return _error(err)
    return None


async def _metrics(request: web.Request) -> web.StreamResponse:
    if (refused := _metrics_refused(request)) is not None:
        return refused
    return await metrics_response(request.app[SERVICES])


async def _dispatcher_metrics(request: web.Request) -> web.StreamResponse:
    """The dispatch process's metrics (`dispatcher_process: true`, daemon/dispatchproc.py):
    attempts, their durations, the breakers, its loops; the same access rule as /metrics. 404
    without a dispatch process (the dispatcher's metrics are then in /metrics), 503 when it
    does not answer."""
    services = request.app[SERVICES]
    if (refused := _metrics_refused(request)) is not None:
        return refused
    if services.link is None:
        body = {"error": "no dispatch process (dispatcher_process: false): see /metrics"}
        return web.json_response(body, status=404)
    text, problem = await services.link.metrics()
    if text is None:
        return web.json_response({"error": f"the dispatch process: {problem}"}, status=503)
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE})
