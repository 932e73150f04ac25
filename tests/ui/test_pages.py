"""The console over plain HTTP (no browser): sign-in, the pages render for both roles, and the
attack paths: forged cookies, CSRF missing or wrong, another tenant's ids, hostile forms."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.ui.session import COOKIE
from tests.harness import Daemon, FakeClock, Sink, start_daemon, wait_for
from tests.ui.kit import ADMIN, AFF42, ENV, SINK_SECRET, csrf_of, rules, settings, sign_in


def main_of(html: str) -> str:
    """The page's <main> (the navigation marks the current section)."""
    return html[html.index("<main") : html.index("</main>")]


@pytest.fixture
async def daemon(tmp_path: Path, sink: Sink) -> AsyncIterator[Daemon]:
    bad = await Sink().start()
    d = await start_daemon(tmp_path, rules(sink, bad), environ=ENV, settings=settings())
    yield d
    await d.client.close()
    await bad.close()


async def test_every_page_renders_for_an_admin(daemon: Daemon) -> None:
    await sign_in(daemon.client, ADMIN)
    await daemon.post(conversion_id="c1", offer=7, affiliate=42, status="approved", payout=9)
    for path in (
        "/ui/offers",
        "/ui/offers/7",
        "/ui/postbacks/101",
        "/ui/deliveries",
        "/ui/conversions?source=generic&id=c1",
        "/ui/health",
        "/ui/postbacks/101/send-test",
    ):
        resp = await daemon.client.get(path)
        assert resp.status == 200, (path, await resp.text())


async def test_offers_show_their_names_from_the_catalogue(daemon: Daemon) -> None:
    await sign_in(daemon.client, ADMIN)
    text = await (await daemon.client.get("/ui/offers")).text()
    assert '<td data-label="Name">Solar Leads</td>' in text
    assert '<td data-label="Name">Home Insurance</td>' in text


async def test_every_page_renders_for_an_affiliate(daemon: Daemon) -> None:
    await sign_in(daemon.client, AFF42)
    for path in ("/ui/offers", "/ui/offers/7", "/ui/postbacks/101", "/ui/deliveries"):
        resp = await daemon.client.get(path)
        assert resp.status == 200, (path, await resp.text())


async def test_pages_carry_a_strict_content_security_policy(daemon: Daemon) -> None:
    for path in ("/ui/sign-in", "/ui/static/console.css", "/ui/static/console.js"):
        resp = await daemon.client.get(path)
        assert resp.status == 200
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp
        assert "style-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "default-src 'none'" in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
    html = await (await daemon.client.get("/ui/sign-in")).text()
    assert "<script>" not in html
    assert " style=" not in html
    assert "<style" not in html


async def test_a_forged_or_unknown_session_cookie_signs_nobody_in(daemon: Daemon) -> None:
    await sign_in(daemon.client, ADMIN)
    real = next(c for c in daemon.client.session.cookie_jar if c.key == COOKIE).value
    for forged in (
        "",
        "x",
        real[:-1] + ("A" if real[-1] != "A" else "B"),
        real + "x",
        "a" * 5000,
        "\u00e9\u00e9",
    ):
        daemon.client.session.cookie_jar.clear()
        resp = await daemon.client.get(
            "/ui/offers", headers={"Cookie": f"{COOKIE}={forged}"}, allow_redirects=False
        )
        assert resp.status == 303, forged
        assert resp.headers["Location"].startswith("/ui/sign-in?next=")
    resp = await daemon.client.post(
        "/ui/deliveries/abc/retry",
        headers={"Cookie": f"{COOKIE}=x"},
        data={"csrf": "x"},
        allow_redirects=False,
    )
    assert resp.status == 401


async def test_posts_without_the_right_csrf_token_or_origin_are_refused(
    daemon: Daemon, sink: Sink
) -> None:
    csrf = await sign_in(daemon.client, ADMIN)
    path = "/ui/postbacks/101/explain"
    body = {
        "conversion": '{"conversion_id": "e1", "offer": 7, "affiliate": 42, "status": "approved", "payout": 9}'
    }
    for data in (
        body,
        {**body, "csrf": ""},
        {**body, "csrf": csrf[:-1]},
        {**body, "csrf": "x" * 300},
    ):
        resp = await daemon.client.post(path, data=data)
        assert resp.status == 403, data.get("csrf")
        assert "security token" in await resp.text()
    resp = await daemon.client.post(
        path, data={**body, "csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert resp.status == 403
    resp = await daemon.client.post(path, data={**body, "csrf": csrf})
    assert resp.status == 200
    text = await resp.text()
    assert "Fires" in text
    assert "/a42?tx=e1" in text
    assert SINK_SECRET not in text
    assert sink.received == []  # explain sends nothing


async def test_the_sign_in_form_has_its_own_csrf_check_and_no_open_redirect(daemon: Daemon) -> None:
    resp = await daemon.client.post("/ui/sign-in", data={"token": ADMIN, "csrf": "guess"})
    assert resp.status == 403
    assert COOKIE not in {c.key for c in daemon.client.session.cookie_jar}
    for target in ("https://evil.example/", "//evil.example/ui/", "/ui/\\evil", "/elsewhere"):
        page = await daemon.client.get("/ui/sign-in", params={"next": target})
        check = csrf_of(await page.text())
        resp = await daemon.client.post(
            "/ui/sign-in",
            data={"csrf": check, "token": ADMIN, "next": target},
            allow_redirects=False,
        )
        assert resp.status == 303
        assert resp.headers["Location"] == "/ui/", target
    cookie = next(c for c in daemon.client.session.cookie_jar if c.key == COOKIE)
    assert cookie["httponly"]
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/ui/"
    assert int(cookie["max-age"]) == int(daemon.settings.ui.session_ttl)


async def test_an_affiliate_gets_the_same_404_for_others_ids_and_403_for_admin_actions(
    daemon: Daemon, sink: Sink
) -> None:
    await daemon.post(conversion_id="t1", offer=7, affiliate=43, status="approved")
    await wait_for(lambda: len(sink.received) >= 1)
    rows = await daemon.deliveries()
    other = next(r.delivery_id for r in rows if r.postback_id == 102)
    csrf = await sign_in(daemon.client, AFF42)
    missing = await daemon.client.get("/ui/postbacks/987654")
    expected = main_of(await missing.text())
    assert missing.status == 404
    for path in (
        "/ui/postbacks/102",
        "/ui/postbacks/103",
        "/ui/postbacks/104",
        "/ui/no/such/page",
        "/ui/postbacks/1" + "0" * 30,
        f"/ui/deliveries/{other}",
        "/ui/deliveries/" + "z" * 65,
    ):
        resp = await daemon.client.get(path)
        assert (resp.status, main_of(await resp.text())) == (404, expected), path
    for path in ("/ui/postbacks/102/status", "/ui/postbacks/103/delete", "/ui/postbacks/102/edit"):
        resp = await daemon.client.post(
            path, data={"csrf": csrf, "status": "disabled", "confirm": "102"}
        )
        assert resp.status == 404, path
    resp = await daemon.client.post(f"/ui/deliveries/{other}/retry", data={"csrf": csrf})
    assert resp.status == 403
    for path in ("/ui/health", "/ui/conversions", "/ui/postbacks/101/send-test"):
        assert (await daemon.client.get(path)).status == 403, path
    listing = await (await daemon.client.get("/ui/deliveries")).text()
    assert other not in listing
    filtered = await (await daemon.client.get("/ui/deliveries?postback=102")).text()
    assert other not in filtered


async def test_hostile_form_bodies_get_a_clear_4xx(daemon: Daemon) -> None:
    csrf = await sign_in(daemon.client, ADMIN)
    path = "/ui/postbacks/101/explain"
    cases = [
        (
            b"csrf=" + csrf.encode() + b"&conversion=" + b"x" * 70_000,
            "application/x-www-form-urlencoded",
            413,
        ),
        (
            b"csrf=" + csrf.encode() + b"&conversion=%ff%fe",
            "application/x-www-form-urlencoded",
            400,
        ),
        (b"csrf=" + csrf.encode() + b"&conversion=%00", "application/x-www-form-urlencoded", 400),
        (
            b"csrf=" + csrf.encode() + b"&" + b"&".join(b"f%d=1" % i for i in range(600)),
            "application/x-www-form-urlencoded",
            400,
        ),
        (b'{"csrf": "x"}', "application/json", 400),
        (
            b"--b\r\nContent-Disposition: form-data; name=csrf\r\n\r\nx\r\n--b--",
            "multipart/form-data; boundary=b",
            400,
        ),
        (b"\xff\xfe\x00", "application/x-www-form-urlencoded", 400),
    ]
    for body, content_type, status in cases:
        resp = await daemon.client.post(path, data=body, headers={"Content-Type": content_type})
        assert resp.status == status, (body[:40], await resp.text())
        assert "<h1>" in await resp.text()
    for conversion in (
        "not json",
        "[1, 2]",
        '{"offer": 7}',
        '{"conversion_id": "a\\u0001", "offer": 7, "affiliate": 1, "status": "approved"}',
        "[" * 3000,  # deeper than the parser's recursion limit
        '{"payout": ' + "9" * 4400 + "}",  # past Python's integer digit limit
    ):
        resp = await daemon.client.post(path, data={"csrf": csrf, "conversion": conversion})
        assert resp.status == 200  # the page again, with the error by the form
        assert 'class="notice error"' in await resp.text(), conversion
    resp = await daemon.client.get("/ui/deliveries?since=yesterday")
    assert resp.status == 400
    resp = await daemon.client.get("/ui/deliveries?cursor=99999999999999999999_x")
    assert resp.status == 400
    resp = await daemon.client.get("/ui/offers/7?status=%01")
    assert resp.status == 400
    resp = await daemon.client.get("/ui/offers/7?after=" + "9" * 40)
    assert resp.status == 400
    resp = await daemon.client.post(
        "/ui/postbacks/101/send-test", data={"csrf": csrf, "conversion": "[" * 3000}
    )
    assert resp.status == 400
    assert "not usable JSON" in await resp.text()
    assert (await daemon.client.get("/ui/static/..%2Fbase.py")).status == 404
    assert (await daemon.client.get("/ui/static/nothing.css")).status == 404


async def test_hostile_json_in_an_affiliates_action_form_is_a_clear_400(daemon: Daemon) -> None:
    """The Add form's JSON fields (ping_url's headers) take what an affiliate types: nesting
    past the recursion limit and integers past the digit limit are refused by the field, never
    a 500, and nothing is created."""
    csrf = await sign_in(daemon.client, AFF42)
    before = await daemon.client.get("/ui/offers/7")
    for hostile in ("[" * 3000, '{"X-A": ' + "9" * 4400 + "}"):
        resp = await daemon.client.post(
            "/ui/offers/7/add",
            data={
                "csrf": csrf,
                "trigger": "conversion_done",
                "action": "ping_url",
                "a.url": "http://127.0.0.1:9/pb",
                "a.headers": hostile,
            },
        )
        text = await resp.text()
        assert resp.status == 400, text[:300]
        assert "not usable JSON" in text
    after = await daemon.client.get("/ui/offers/7")
    assert main_of(await after.text()) == main_of(await before.text())


async def test_narrow_delivery_lists_default_to_the_last_day(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon.ui import store_pages

    clock = FakeClock()
    d = await start_daemon(
        tmp_path, rules(sink, sink), environ=ENV, settings=settings(session_ttl="7d"), clock=clock
    )
    try:
        await d.post(conversion_id="old-1", offer=7, affiliate=42, status="approved", payout=9)
        await wait_for(lambda: len(sink.received) >= 1)
        rows = await d.deliveries(conversion_id="old-1")
        delivery = next(r.delivery_id for r in rows if r.postback_id == 101)
        await sign_in(d.client, AFF42)
        assert delivery in await (await d.client.get("/ui/deliveries")).text()
        clock.advance(2 * 86400)
        page = await (await d.client.get("/ui/deliveries")).text()
        assert delivery not in page
        assert "Showing the last 24 hours" in page
        # The all-time walk stops after WALK_BUDGET seconds of wall-clock time, with a short
        # page and an Older link: on a loaded machine its two windows took more than 50 ms
        # and the delivery was one page further (test_an_all_time_narrow_list_reads_windows_
        # going_back tests that cut).
        monkeypatch.setattr(store_pages, "WALK_BUDGET", 60.0)
        assert delivery in await (await d.client.get("/ui/deliveries?since=")).text()
        postback = await (await d.client.get("/ui/postbacks/101")).text()
        assert "No delivery in the last 24 hours." in postback
    finally:
        await d.client.close()


async def test_send_test_sends_one_real_request_after_confirmation(
    daemon: Daemon, sink: Sink
) -> None:
    csrf = await sign_in(daemon.client, ADMIN)
    form = await (await daemon.client.get("/ui/postbacks/101/send-test")).text()
    assert "Send for real" in form
    assert 'data-confirm="Send this postback for real now?"' in form
    assert sink.received == []  # the confirmation page sends nothing
    sample = '{"conversion_id": "st-1", "offer": "7", "affiliate": "42", "status": "approved", "payout": "9"}'
    resp = await daemon.client.post(
        "/ui/postbacks/101/send-test", data={"csrf": csrf, "conversion": sample}
    )
    text = await resp.text()
    assert resp.status == 200
    assert "Sent: HTTP 200" in text
    assert [r.path_qs for r in sink.received] == [f"/a42?tx=st-1&k={SINK_SECRET}"]
    assert SINK_SECRET not in text  # the page shows the request masked
    assert "/a42?tx=st-1&amp;k=****" in text
    assert await daemon.deliveries() == []  # recorded nowhere
    bad = await daemon.client.post(
        "/ui/postbacks/101/send-test", data={"csrf": csrf, "conversion": "{"}
    )
    assert bad.status == 400
    assert len(sink.received) == 1


async def test_a_conversion_shows_its_arrivals_and_what_each_fired(
    daemon: Daemon, sink: Sink
) -> None:
    await daemon.post(
        conversion_id="cv-1", offer=7, affiliate=42, status="pending", email="jane@example.com"
    )
    await daemon.post(conversion_id="cv-1", offer=7, affiliate=42, status="approved", payout=9)
    await wait_for(lambda: len(sink.received) >= 1)
    await sign_in(daemon.client, ADMIN)
    text = await (await daemon.client.get("/ui/conversions?source=generic&id=cv-1")).text()
    first, second = text.index("#1 New"), text.index("#2 Status Changed")
    assert first < second
    assert "Fired no delivery." in text[first:second]
    assert 'href="/ui/postbacks/101"' in text[second:]
    assert "jane@example.com" not in text
    assert "j***@e***.com" in text
    missing = await (await daemon.client.get("/ui/conversions?source=generic&id=nope")).text()
    assert "No conversion nope from source generic." in missing


async def test_an_action_with_too_many_postbacks_is_filtered_row_by_row(
    daemon: Daemon, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon.ui import store_pages

    monkeypatch.setattr(store_pages, "MAX_IDS", 1)  # every action "has too many postbacks"
    monkeypatch.setattr(store_pages, "SCAN_BATCH", 2)
    monkeypatch.setattr(store_pages, "SCAN_LIMIT", 4)
    for n in range(3):
        await daemon.post(
            conversion_id=f"act-{n}", offer=7, affiliate=42, status="approved", payout=9
        )
    await wait_for(lambda: len(sink.received) >= 3)
    every = {r.delivery_id for r in await daemon.deliveries()}
    assert len(every) == 6  # 101 and 103 for each
    await sign_in(daemon.client, ADMIN)
    shown: list[set[str]] = []
    path: str | None = "/ui/deliveries?action=ping_url"
    while path is not None:
        text = await (await daemon.client.get(path)).text()
        shown.append({d for d in every if f"/ui/deliveries/{d}" in text})
        older = re.search(r'href="(\?[^"]*cursor=[^"]*)" rel="next"', text)
        path = "/ui/deliveries" + html.unescape(older.group(1)) if older else None
    assert [len(page) for page in shown] == [4, 2]  # at most 4 rows read per page
    assert set().union(*shown) == every
    text = await (await daemon.client.get("/ui/deliveries?action=smtp")).text()
    assert "No deliveries." in text  # no postback has it: nothing to read at all
    assert 'rel="next"' not in text


async def test_an_all_time_narrow_list_reads_windows_going_back(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon.ui import store_pages

    clock = FakeClock()
    d = await start_daemon(
        tmp_path,
        rules(sink, sink),
        environ=ENV,
        settings={**settings(session_ttl="30d"), "retention": "10d"},
        clock=clock,
    )
    try:
        ids = []
        for n, days in enumerate((0, 3, 9)):  # deliveries of 101 at day 0, 3 and 12
            clock.advance(days * 86400)
            await d.post(conversion_id=f"w-{n}", offer=7, affiliate=42, status="approved", payout=9)
            await wait_for(lambda n=n: len(sink.received) >= 2 * (n + 1))
            rows = await d.deliveries(conversion_id=f"w-{n}")
            ids.append(next(r.delivery_id for r in rows if r.postback_id == 101))
        await sign_in(d.client, AFF42)

        def shown(text: str) -> list[str]:
            return [i for i in ids if f"/ui/deliveries/{i}" in text]

        # Time enough for every window (the budget is wall-clock time: under a loaded test run
        # four windows have taken more than the shipped 50 ms); the budget's cut is below.
        monkeypatch.setattr(store_pages, "WALK_BUDGET", 60.0)
        text = await (await d.client.get("/ui/deliveries?postback=101&since=")).text()
        assert shown(text) == ids  # windows of 1, 2, 4, 8 days reach day 0
        assert "Searched back to" not in text
        monkeypatch.setattr(store_pages, "WALK_BUDGET", -1.0)  # one window per page
        pages, hints = [], []
        path: str | None = "/ui/deliveries?postback=101&since="
        while path is not None and len(pages) < 15:  # a day per page: day 0 is 12 pages back
            text = await (await d.client.get(path)).text()
            pages.append(shown(text))
            hints.append("Searched back to" in text)
            older = re.search(r'href="(\?[^"]*cursor=[^"]*)" rel="next"', text)
            path = "/ui/deliveries" + html.unescape(older.group(1)) if older else None
        assert [i for page in pages for i in page] == ids[::-1]  # each once, newest first
        assert pages[0] == [ids[2]]  # the first window: the last day
        assert hints[0]  # a short page says how far back it searched
    finally:
        await d.client.close()
