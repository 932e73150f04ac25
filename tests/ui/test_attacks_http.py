"""Attacks on the console over plain HTTP, each written as the attack: sessions (a second
sign-in, sign-out, fixation), CSRF edges, brute force of the sign-in form, headers on every
answer, open redirects, hostile hidden fields, and times past what a datetime holds."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient

from daemon.store.common import decode_cursor
from daemon.ui.session import COOKIE, FAILURE_WINDOW, MAX_FAILURES, Sessions
from daemon.visibility import Viewer
from tests.harness import Daemon, FakeClock, Sink, start_daemon, wait_for
from tests.ui.kit import ADMIN, AFF42, ENV, csrf_of, rules, settings, sign_in


@pytest.fixture
async def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def daemon(tmp_path: Path, sink: Sink, clock: FakeClock) -> AsyncIterator[Daemon]:
    bad = await Sink().start()
    d = await start_daemon(
        tmp_path, rules(sink, bad), environ=ENV, settings=settings(), clock=clock
    )
    yield d
    await d.client.close()
    await bad.close()


def _cookie(client: TestClient) -> str:
    return next(c.value for c in client.session.cookie_jar if c.key == COOKIE)


async def _as(daemon: Daemon, cookie: str, path: str = "/ui/offers") -> int:
    """The status of `path` for a browser holding only `cookie` (no redirect followed)."""
    url = daemon.client.make_url(path)
    async with (
        ClientSession(cookies={COOKIE: cookie}) as other,
        other.get(url, allow_redirects=False) as resp,
    ):
        return resp.status


async def _try_token(client: TestClient, token: str) -> tuple[int, str]:
    page = await client.get("/ui/sign-in")
    check = csrf_of(await page.text())
    resp = await client.post(
        "/ui/sign-in", data={"csrf": check, "token": token}, allow_redirects=False
    )
    return resp.status, resp.headers.get("Retry-After", "")


# --- sessions ------------------------------------------------------------------------------


async def test_signing_in_again_ends_the_session_the_browser_had(daemon: Daemon) -> None:
    """Found: a second sign-in in the same browser left the first session alive server-side
    (a copied cookie kept working until its expiry)."""
    await sign_in(daemon.client, AFF42)
    first = _cookie(daemon.client)
    await sign_in(daemon.client, ADMIN)
    assert _cookie(daemon.client) != first
    assert await _as(daemon, _cookie(daemon.client)) == 200
    assert await _as(daemon, first) == 303  # to the sign-in page


async def test_sign_out_ends_the_session_on_the_server_and_needs_its_csrf(
    daemon: Daemon,
) -> None:
    """Held: a planted cookie is never adopted; sign-out needs the CSRF token (403 without,
    session alive) and then the old cookie opens nothing."""
    daemon.client.session.cookie_jar.update_cookies({COOKIE: "planted-by-attacker"})
    csrf = await sign_in(daemon.client, ADMIN)
    cookie = next(
        c.value
        for c in daemon.client.session.cookie_jar
        if c.key == COOKIE and c.value != "planted-by-attacker"
    )
    assert await _as(daemon, "planted-by-attacker") == 303
    resp = await daemon.client.post("/ui/sign-out", data={}, allow_redirects=False)
    assert resp.status == 403
    assert (await daemon.client.get("/ui/sign-out", allow_redirects=False)).status == 404
    assert await _as(daemon, cookie) == 200
    resp = await daemon.client.post("/ui/sign-out", data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 303
    assert await _as(daemon, cookie) == 303


async def test_csrf_origin_edges_and_get_never_changes_state(daemon: Daemon) -> None:
    """Held: the right CSRF token with an `Origin: null`, another port or another scheme is
    refused; a GET (with a method-override header or field) never disables a postback."""
    csrf = await sign_in(daemon.client, ADMIN)
    here = str(daemon.client.make_url("/")).rstrip("/")
    port = urlsplit(here).port or 80
    path = "/ui/postbacks/101/explain"
    body = {"csrf": csrf, "conversion": '{"conversion_id": "c", "offer": 7}'}
    for origin in ("null", f"http://127.0.0.1:{port + 1}", here.replace("http:", "https:")):
        resp = await daemon.client.post(path, data=body, headers={"Origin": origin})
        assert resp.status == 403, origin
    for method in ("PUT", "DELETE", "PATCH"):
        resp = await daemon.client.request(method, "/ui/postbacks/101/status", data=body)
        assert resp.status == 405, method
    resp = await daemon.client.get(
        "/ui/postbacks/101/status?status=disabled&_method=POST&csrf=" + csrf,
        headers={"X-HTTP-Method-Override": "POST"},
    )
    assert resp.status == 404
    assert "Active" in await (await daemon.client.get("/ui/postbacks/101")).text()


async def test_wrong_tokens_are_bounded_per_client(daemon: Daemon, clock: FakeClock) -> None:
    """Found: the sign-in form took any number of wrong tokens. Now a client gets
    MAX_FAILURES tries a window; then 429 (the token is not looked at, the right one
    included: no oracle) until the window has passed."""
    for n in range(MAX_FAILURES):
        assert (await _try_token(daemon.client, f"guess-{n}"))[0] == 401
    status, retry_after = await _try_token(daemon.client, ADMIN)
    assert status == 429
    assert 0 < int(retry_after) <= FAILURE_WINDOW + 1
    assert COOKIE not in {c.key for c in daemon.client.session.cookie_jar}
    clock.advance(FAILURE_WINDOW)
    assert (await _try_token(daemon.client, ADMIN))[0] == 303


# --- headers -------------------------------------------------------------------------------


async def test_every_console_answer_carries_the_security_headers(daemon: Daemon) -> None:
    """Found: the router's own answers under /ui/ (405 for PUT, a static file's 404) went
    out without CSP, X-Frame-Options, nosniff or no-store."""
    await sign_in(daemon.client, ADMIN)
    cases = [
        ("PUT", "/ui/offers", 405),
        ("DELETE", "/ui/postbacks/101", 405),
        ("OPTIONS", "/ui/sign-in", 405),
        ("GET", "/ui/static/..%2f__init__.py", 404),
        ("GET", "/ui/static/..%255c__init__.py", 404),
        ("GET", "/ui/static/console.js%00", 404),
        ("GET", "/ui/static/icon.svg", 200),
        ("GET", "/ui/offers", 200),
        ("GET", "/ui/sign-in", 200),
    ]
    for method, path, status in cases:
        resp = await daemon.client.request(method, path, allow_redirects=False)
        assert resp.status == status, path
        headers = resp.headers
        assert "frame-ancestors 'none'" in headers.get("Content-Security-Policy", ""), path
        assert "'unsafe-inline'" not in headers["Content-Security-Policy"]
        assert headers.get("X-Frame-Options") == "DENY", path
        assert headers.get("X-Content-Type-Options") == "nosniff", path
        assert headers.get("Cache-Control") in ("no-store", "no-cache"), path
    page = await daemon.client.get("/ui/offers")
    assert page.headers["Cache-Control"] == "no-store"  # a shared computer's back button


# --- redirects and hidden fields -----------------------------------------------------------


async def test_no_next_leads_off_the_console(daemon: Daemon) -> None:
    """Held: every encoding of another site in `next` lands on /ui/."""
    for target in (
        "/%2F%2Fevil.example",
        "/ui/%0d%0aLocation:%20//evil.example",
        "/ui/\r\nSet-Cookie: x=1",
        "\\\\evil.example",
        "/\\evil.example",
        " //evil.example",
        "JaVaScRiPt:alert(1)",
        "https:evil.example",
        "/ui/\u2028//evil.example",
    ):
        page = await daemon.client.get("/ui/sign-in")
        check = csrf_of(await page.text())
        resp = await daemon.client.post(
            "/ui/sign-in",
            data={"csrf": check, "token": ADMIN, "next": target},
            allow_redirects=False,
        )
        location = resp.headers.get("Location", "")
        assert resp.status in (303, 400), target
        assert resp.status == 400 or location.startswith("/ui/"), (target, location)
        assert "\r" not in location
        assert "\n" not in location
        assert not location.startswith("//")


async def test_hidden_fields_cannot_reach_another_affiliates_postbacks(daemon: Daemon) -> None:
    """Held: an affiliate editing the duplicate form's `from` and `postback` fields to name
    another affiliate's (or an admin's) postback gets the 404 page and nothing is copied."""
    csrf = await sign_in(daemon.client, AFF42)
    before = await (await daemon.client.get("/ui/offers/8")).text()
    for ids in (["102"], ["103"], ["101", "102"], ["1" + "0" * 30], ["-1"], ["\u0663"]):
        resp = await daemon.client.post(
            "/ui/offers/8/duplicate", data={"csrf": csrf, "from": "7", "postback": ids}
        )
        assert 400 <= resp.status < 500, ids
        assert resp.status in (400, 404), ids
    for field in ("from", "offer", "id"):
        resp = await daemon.client.post(
            "/ui/postbacks/102/status", data={"csrf": csrf, "status": "disabled", field: "7"}
        )
        assert resp.status == 404, field
    after = await (await daemon.client.get("/ui/offers/8")).text()
    assert re.findall(r'data-id="(\d+)"', after) == re.findall(r'data-id="(\d+)"', before)


# --- expensive or malformed input ----------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "since=0001-01-01T00:00%2B23:59",
        "until=0001-01-01T00:00%2B23:59",
        "since=9999-12-31T23:59-23:59",
        "until=9999-12-31T23:59-23:59",
        "postback=101&since=0001-01-01T00:00%2B23:59",
        "postback=101&since=&until=9999-12-31T23:59-23:59",
        "since=0001-01-01",
        "until=9999-12-31T23:59",
    ],
)
async def test_times_past_what_a_datetime_holds_are_a_400(daemon: Daemon, query: str) -> None:
    """Found: a zone offset carried year 1 or 9999 out of datetime's range: a 500."""
    await sign_in(daemon.client, ADMIN)
    resp = await daemon.client.get("/ui/deliveries?" + query)
    assert resp.status == 400, await resp.text()
    assert "between 1970 and 9000" in await resp.text() or "not a date" in await resp.text()


async def test_an_all_time_walk_from_the_far_future_starts_at_tomorrow(
    daemon: Daemon, clock: FakeClock
) -> None:
    """Found: `until` in year 8999 with an empty From walked back through millennia of empty
    windows, one 50 ms budget per Older click. Now the walk starts from tomorrow."""
    await sign_in(daemon.client, ADMIN)
    resp = await daemon.client.get("/ui/deliveries?postback=101&since=&until=8999-01-01")
    assert resp.status == 200
    text = await resp.text()
    found = re.search(r'href="\?([^"]*)" rel="next"', text)
    if found is not None:  # a short page: its Older link goes on from near now
        cursor = parse_qs(found.group(1).replace("&amp;", "&"))["cursor"][0]
        tomorrow = datetime.fromtimestamp(clock.now(), UTC) + timedelta(days=1)
        assert decode_cursor(cursor)[0] <= tomorrow


def test_one_tenant_signing_in_over_and_over_evicts_only_its_own_sessions() -> None:
    """Found: the session table dropped the oldest sessions of anyone past its bound, so an
    affiliate signing in in a loop signed every admin out. Now one token keeps at most
    `per_token` sessions (its own oldest go first); the global bound stays as a last resort."""
    clock = FakeClock()
    table = Sessions(3600, clock.now, most=100, per_token=5)
    admin, _ = table.create(Viewer("admin", name="ops"))
    hostile = [table.create(Viewer("affiliate", "43", name="aff43"))[0] for _ in range(500)]
    assert table.get(admin) is not None
    assert len(table) == 6
    assert [table.get(s) is not None for s in hostile[-6:]] == [False] + [True] * 5


async def test_a_from_centuries_back_is_walked_in_windows(
    daemon: Daemon, sink: Sink, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found: a narrow list with an explicit From of 1970 (`?postback=N&since=1970-01-01`) was
    one read down the store's whole newest-first index, past the walk's time budget (a
    postback with no deliveries: 154 ms at 300,000 deliveries, growing with the store; the
    budgeted walk: 60 ms). Now a From older than the widest window is the floor of the walk:
    with no budget left, the first page is the first window and says how far it searched."""
    from daemon.ui import store_pages

    for n, days in enumerate((0, 3)):  # deliveries of 101 at day 0 and day 3
        clock.advance(days * 86400)
        await daemon.post(
            conversion_id=f"f-{n}", offer=7, affiliate=42, status="approved", payout=9
        )
        await wait_for(lambda n=n: len(sink.received) >= n + 1)
    ids = [
        next(
            r.delivery_id
            for r in await daemon.deliveries(conversion_id=f"f-{n}")
            if r.postback_id == 101
        )
        for n in range(2)
    ]
    await sign_in(daemon.client, ADMIN)
    monkeypatch.setattr(store_pages, "WALK_BUDGET", -1.0)  # one window per page
    text = await (await daemon.client.get("/ui/deliveries?postback=101&since=1970-01-01")).text()
    assert f"/ui/deliveries/{ids[1]}" in text
    assert f"/ui/deliveries/{ids[0]}" not in text  # three days back: a later window
    assert "Searched back to" in text
    older = re.search(r'href="(\?[^"]*cursor=[^"]*)" rel="next"', text)
    assert older is not None
    assert "since=1970-01-01" in older.group(1)  # the floor goes along
