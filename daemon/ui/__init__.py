"""The web console under /ui/ (docs/console.md): server-rendered pages over the same tokens,
visibility rules and services as the HTTP API, for ops (admin tokens) and affiliates.

`add_ui_routes` registers every route; sign-in, sign-out and the static files live here, the
pages in `ops`, `store_pages` and `affiliate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources

from aiohttp import web

from daemon.api import API
from daemon.app import SERVICES
from daemon.errors import InputError
from daemon.log import get_logger
from daemon.settings import Settings
from daemon.ui import affiliate, ops, store_pages
from daemon.ui.base import (
    UI,
    Ctx,
    PageNotFound,
    UiState,
    make_templates,
    page,
    read_form,
    redirect,
    render,
    safe_next,
    same_origin,
    secure,
)
from daemon.ui.session import COOKIE, SIGNIN_COOKIE, Sessions, SignInBound, new_secret, same

log = get_logger("postbackd.ui")

_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
MAX_TOKEN = 512
PREFIX = "/ui"  # where the console's app is mounted
THROTTLED = "Too many wrong tokens from this address. Wait a few minutes, then try again."


def add_ui_routes(app: web.Application, settings: Settings, environ: Mapping[str, str]) -> None:
    """Register /ui/...; call after the API routes (the console uses the API's tokens). The
    console is an app of its own mounted at /ui, so that its response signal runs for its
    answers only, never for a webhook's; its handlers find the API's and the daemon's state
    through `request.config_dict`, its own (UI) as `request.app`'s."""
    console = web.Application()
    console[UI] = UiState(
        sessions=Sessions(settings.ui.session_ttl, lambda: app[SERVICES].clock.now()),
        sign_ins=SignInBound(lambda: app[SERVICES].clock.now()),
        templates=make_templates(),
        repository_url=settings.ui.repository_url,
        environ=environ,
    )
    statics = _static_files()
    console.on_response_prepare.append(_console_headers)
    console.router.add_get("", _to_console)  # /ui
    console.router.add_get("/", _to_console)
    console.router.add_get("/sign-in", _sign_in_form)
    console.router.add_post("/sign-in", _sign_in)
    console.router.add_post("/sign-out", page(_sign_out))

    async def static(request: web.Request) -> web.Response:
        return await _static(request, statics)

    console.router.add_get("/static/{name}", static)
    affiliate.add_routes(console)  # first: /ui/offers/go before /ui/offers/{offer}
    ops.add_routes(console)
    store_pages.add_routes(console)
    console.router.add_get("/{tail:.*}", page(_no_such_page))  # last: the console's own 404
    app.add_subapp(PREFIX, console)  # after its routes: a mounted app's router is frozen


async def _console_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer of the console (any request the router sends under /ui) carries the
    console's headers, the router's own too (a 405 for PUT, the static files' 404): no page of
    the console goes out without them."""
    secure(response)


def _static_files() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("daemon.ui") / "static"
    found = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            found[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return found


async def _static(request: web.Request, statics: dict[str, tuple[bytes, str]]) -> web.Response:
    found = statics.get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    body, content_type = found
    response = web.Response(body=body, content_type=content_type)
    if content_type.startswith("text/"):
        response.charset = "utf-8"
    secure(response)
    response.headers["Cache-Control"] = "no-cache"
    return response


async def _to_console(request: web.Request) -> web.Response:
    return redirect("/ui/offers")


async def _sign_in_form(request: web.Request) -> web.Response:
    return _sign_in_page(request, request.query.get("next", "/ui/offers"), None, 200)


def _sign_in_page(
    request: web.Request, target: str, error: str | None, status: int
) -> web.Response:
    check = new_secret()
    response = render(
        request, "sign_in.html", status, next=safe_next(target), signin_check=check, error=error
    )
    response.set_cookie(
        SIGNIN_COOKIE,
        check,
        path="/ui/sign-in",
        max_age=3600,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


async def _sign_in(request: web.Request) -> web.Response:
    """The token from the form becomes a session cookie; the sign-in form's own CSRF check is
    a double-submit value (a cookie set with the form, echoed by it)."""
    try:
        form = await read_form(request)
    except InputError as err:
        return _sign_in_page(request, "/ui/offers", err.message, err.status)
    target = form.one("next", "/ui/offers")
    check = request.cookies.get(SIGNIN_COOKIE)
    if not same_origin(request) or check is None or not same(form.one("csrf"), check):
        log.warning("ui_csrf_refused", path=request.path)
        return _sign_in_page(request, target, "The form had expired. Please try again.", 403)
    bound, client = request.app[UI].sign_ins, request.remote or "?"
    wait = bound.wait(client)
    if wait > 0:  # the token is not looked at: the answer says nothing about it
        log.warning("ui_sign_in_throttled")
        response = _sign_in_page(request, target, THROTTLED, 429)
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    token = form.one("token").strip()
    try:
        if not token or len(token) > MAX_TOKEN:
            raise InputError("invalid token")
        viewer = request.config_dict[API].tokens.authenticate(f"Bearer {token}")
    except InputError:
        bound.failed(client)
        log.info("ui_sign_in_refused")
        return _sign_in_page(request, target, "That token is not valid.", 401)
    # A session this browser already had ends here: signing in never leaves a second one alive.
    request.app[UI].sessions.delete(request.cookies.get(COOKIE))
    session_id, _session = request.app[UI].sessions.create(viewer)
    log.info("ui_signed_in", role=viewer.role, affiliate=viewer.affiliate)
    response = redirect(safe_next(target))
    response.set_cookie(
        COOKIE,
        session_id,
        path="/ui/",
        max_age=int(request.app[UI].sessions.ttl),
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    response.del_cookie(SIGNIN_COOKIE, path="/ui/sign-in")
    return response


async def _no_such_page(ctx: Ctx) -> web.Response:
    raise PageNotFound()


async def _sign_out(ctx: Ctx) -> web.Response:
    ctx.ui.sessions.delete(ctx.request.cookies.get(COOKIE))
    log.info("ui_signed_out", role=ctx.viewer.role, affiliate=ctx.viewer.affiliate)
    response = redirect("/ui/sign-in")
    response.del_cookie(COOKIE, path="/ui/")
    return response
