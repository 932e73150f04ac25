"""The console's HTTP plumbing: who is signed in, CSRF on every form, strict headers, bounded
form bodies, templates, and one error page per kind of error.

Every console handler is wrapped by `page()`: it resolves the session cookie (no session: a
redirect to the sign-in page), refuses an affiliate on an admin page, checks the Origin and
the CSRF token of every POST before the handler runs, and turns errors into pages (a missing
object and one the viewer may not see render the very same 404 page).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

from aiohttp import web
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from daemon.app import SERVICES, Services
from daemon.errors import ForbiddenError, InputError, StoreError
from daemon.loader import RuleSet
from daemon.log import get_logger
from daemon.ui.session import COOKIE, Session, Sessions, SignInBound, same
from daemon.ui.views import FILTERS
from daemon.visibility import Viewer

log = get_logger("postbackd.ui")
T = TypeVar("T")

MAX_FORM = 64 * 1024  # bytes of one form body
MAX_FIELDS = 500
MAX_FIELD = 16 * 1024  # characters of one form value (a pasted conversion fits)
_FORM_TYPE = "application/x-www-form-urlencoded"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer, Chromium sends `Origin: null` on our own
    # forms, and the Origin check would refuse them.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


NOT_FOUND = "There is nothing here, or nothing you may see."


class PageNotFound(InputError):
    """A page, or an object the viewer may not see: always the same 404 page."""

    status = 404

    def __init__(self) -> None:
        super().__init__(NOT_FOUND)


class TooLarge(InputError):
    status = 413


def field_message(err: InputError) -> str:
    """An input error as a form shows it above the form: `field: message`."""
    return f"{err.field}: {err.message}" if err.field else err.message


@dataclass
class UiState:
    sessions: Sessions
    sign_ins: SignInBound
    templates: Environment
    repository_url: str | None
    environ: Mapping[str, str]  # for send-test's secrets, as the daemon reads them
    # What pages derive from one rule set (offer counts, offer names, the postback index), by
    # name, with the rule set it was derived from (see per_rules).
    derived: dict[str, tuple[RuleSet, Any]] = field(default_factory=dict)

    def per_rules(self, name: str, rules: RuleSet, build: Callable[[], T]) -> T:
        """`build()` for `rules`, computed again only when the rule set changes."""
        cached = self.derived.get(name)
        if cached is None or cached[0] is not rules:
            cached = self.derived[name] = (rules, build())
        value: T = cached[1]
        return value


UI = web.AppKey("ui", UiState)


def make_templates() -> Environment:
    env = Environment(
        loader=PackageLoader("daemon.ui", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(FILTERS)
    return env


@dataclass
class Form:
    """A parsed form body: every value of every name, in order."""

    values: dict[str, list[str]] = field(default_factory=dict)

    def one(self, name: str, default: str = "") -> str:
        found = self.values.get(name)
        return found[-1] if found else default

    def all(self, name: str) -> list[str]:
        return list(self.values.get(name, ()))


@dataclass
class Ctx:
    """What a console handler gets: the request, the services, who looks, their session."""

    request: web.Request
    services: Services
    viewer: Viewer
    session: Session
    form: Form | None = None

    @property
    def ui(self) -> UiState:
        return self.request.app[UI]

    @property
    def now(self) -> datetime:
        """The services' clock, as a UTC datetime."""
        return datetime.fromtimestamp(self.services.clock.now(), UTC)

    def render(self, template: str, status: int = 200, **context: Any) -> web.Response:
        return render(self.request, template, status, session=self.session, **context)


Handler = Callable[[Ctx], Awaitable[web.StreamResponse]]


def secure(response: web.StreamResponse) -> web.StreamResponse:
    response.headers.update(SECURITY_HEADERS)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def render(
    request: web.Request,
    template: str,
    status: int = 200,
    *,
    session: Session | None = None,
    **context: Any,
) -> web.Response:
    state = request.app[UI]
    viewer = session.viewer if session is not None else None
    html = state.templates.get_template(template).render(
        **{**_DEFAULTS, **context},
        viewer=viewer,
        csrf=session.csrf if session is not None else "",
        path=request.path,
        repository_url=state.repository_url,
    )
    response = web.Response(text=html, status=status, content_type="text/html", charset="utf-8")
    secure(response)
    return response


# What a template may test for without every handler passing it.
_DEFAULTS: dict[str, Any] = {
    "title": "postbackd",
    "can_manage": False,
    "notice": None,
    "error": None,
    "add_offers": (),
    "next_query": "",
    "explain_error": None,
    "explained": None,
    "sent": None,
}


def redirect(location: str) -> web.Response:
    """303 See Other: after a POST the browser GETs the result (no resubmission on reload)."""
    response = web.Response(status=303, headers={"Location": location})
    secure(response)
    return response


def sign_in_location(request: web.Request) -> str:
    return "/ui/sign-in?next=" + quote(request.path_qs, safe="/")


def safe_next(target: str) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/ui/") or "\\" in target:
        return "/ui/"
    if any(unicodedata.category(c) == "Cc" for c in target):
        return "/ui/"
    return target


def same_origin(request: web.Request) -> bool:
    """A POST's Origin (when the browser sends one) must be this very site."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin == f"{request.scheme}://{request.host}"


async def read_form(request: web.Request) -> Form:
    """The url-encoded body, within limits; InputError (a 4xx page) for anything else."""
    if request.content_type != _FORM_TYPE:
        raise InputError(f"a form must be sent as {_FORM_TYPE}")
    if request.content_length is not None and request.content_length > MAX_FORM:
        raise TooLarge(f"the form is larger than {MAX_FORM // 1024} KiB")
    body = await request.content.read(MAX_FORM + 1)
    if len(body) > MAX_FORM:
        raise TooLarge(f"the form is larger than {MAX_FORM // 1024} KiB")
    try:
        pairs = parse_qsl(
            body.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=False,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError) as err:
        raise InputError(
            "the form is malformed (not UTF-8 url-encoded, or too many fields)"
        ) from err
    form = Form()
    for name, value in pairs:
        if len(name) > 100 or len(value) > MAX_FIELD:
            raise InputError(f"a form field is longer than {MAX_FIELD} characters", name[:100])
        if any(unicodedata.category(c) in ("Cc", "Cs") and c not in "\t\r\n" for c in value):
            raise InputError("control characters are not allowed", name[:100])
        form.values.setdefault(name, []).append(value)
    return form


def _session(request: web.Request) -> Session | None:
    return request.app[UI].sessions.get(request.cookies.get(COOKIE))


def page(handler: Handler, *, admin: bool = False) -> Callable[[web.Request], Awaitable[Any]]:
    """Wrap a console handler: session, role, Origin and CSRF checks, error pages."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        session = _session(request)
        if session is None:
            if request.method == "GET":
                return redirect(sign_in_location(request))
            return render(request, "error.html", 401, title="Signed out", message=SIGNED_OUT)
        ctx = Ctx(request, request.config_dict[SERVICES], session.viewer, session)
        try:
            if admin and not session.viewer.is_admin:
                raise ForbiddenError("This page needs an admin sign-in.")
            if request.method == "POST":
                ctx.form = await read_form(request)
                if not same_origin(request) or not same(ctx.form.one("csrf"), session.csrf):
                    log.warning("ui_csrf_refused", path=request.path)
                    raise ForbiddenError(CSRF_REFUSED)
            return await handler(ctx)
        except InputError as err:
            title = {401: "Signed out", 403: "Not allowed", 404: "Not found"}.get(
                err.status, "That did not work"
            )
            # Every 404 reads the same, whoever raised it: missing and not yours look alike.
            message = NOT_FOUND if err.status == 404 else err.message
            return ctx.render("error.html", err.status, title=title, message=message)
        except StoreError as err:
            log.warning("store_error", error=str(err))
            return ctx.render("error.html", 503, title="Store unavailable", message=STORE_DOWN)

    return wrapped


SIGNED_OUT = "Your session has ended. Sign in again; nothing was changed."
CSRF_REFUSED = "The form's security token is missing or wrong. Reload the page and try again."
STORE_DOWN = "The store cannot be read right now. Try again in a moment."


def query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query as one value per known name (unknown ones are ignored on pages: a stale
    bookmark still opens), bounded and without control characters."""
    out: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in allowed or value == "":
            continue
        if len(value) > 1024:
            raise InputError("a query value is longer than 1,024 characters", name)
        if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
            raise InputError("control characters are not allowed", name)
        out[name] = value
    return out


def params(values: Mapping[str, Any]) -> str:
    """A query string of the non-empty values (for pagination links that keep the filters)."""
    from urllib.parse import urlencode

    return urlencode({k: v for k, v in values.items() if v not in (None, "")})
