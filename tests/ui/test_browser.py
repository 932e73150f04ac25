"""The console in a real browser (Debian's chromium through Playwright): sign-in and sign-out,
the postback table, filters, what an affiliate may not reach, retry, CSRF, expiry, 390 px."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from daemon.listing import COLUMNS
from tests.harness import wait_for
from tests.ui.conftest import Live, screenshot
from tests.ui.kit import ADMIN, AFF42

pytestmark = pytest.mark.slow


@pytest.fixture
def context(browser: Any, live: Live) -> Iterator[Any]:
    ctx = browser.new_context(base_url=live.url, viewport={"width": 1280, "height": 860})
    yield ctx
    ctx.close()


def sign_in(page: Any, token: str, then: str = "/ui/offers") -> None:
    page.goto(then)
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**{then}")


def test_sign_in_and_sign_out(context: Any, live: Live) -> None:
    page = context.new_page()
    page.goto("/ui/offers")
    assert "/ui/sign-in" in page.url
    screenshot(page, "sign-in")
    page.get_by_label("API token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text() == "That token is not valid."
    page.get_by_label("API token").fill(ADMIN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/offers")
    assert page.get_by_role("heading", level=1).inner_text() == "Offers"
    cookie = next(c for c in context.cookies() if c["name"] == "postbackd_session")
    assert cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/ui/"
    assert cookie["expires"] > 0
    screenshot(page, "offers")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/ui/sign-in")
    page.goto("/ui/offers")
    assert "/ui/sign-in" in page.url


def test_the_postback_table_has_the_products_columns_and_labels(context: Any, live: Live) -> None:
    page = context.new_page()
    sign_in(page, ADMIN, "/ui/offers/7")
    headers = page.locator("table.postbacks thead th").all_inner_texts()
    assert [h.strip() for h in headers] == [c.upper() for c in COLUMNS] + ["WHERE"] or [
        h.strip() for h in headers
    ] == [*COLUMNS, "Where"]
    row = page.locator("tr[data-id='101']")
    cells = row.locator("td").all_inner_texts()
    assert cells[1] == "Conversion Done"
    assert cells[3] == "Ping Url"
    assert "****" in cells[4]
    assert "s3cr3t" not in page.content()
    assert "Affiliate 42" in cells[0]
    assert page.locator("tr[data-id='103'] .badge.aff").count() == 0
    assert cells[8].startswith("offer-7.yaml:")
    screenshot(page, "postbacks")


def test_filters_narrow_the_table(context: Any, live: Live) -> None:
    page = context.new_page()
    sign_in(page, ADMIN, "/ui/offers/7")

    def ids() -> list[str]:
        return page.locator("table.postbacks tbody tr[data-id]").evaluate_all(
            "rows => rows.map(r => r.dataset.id)"
        )

    assert ids() == ["101", "102", "103", "104"]
    page.get_by_label("Trigger").select_option("conversion_reject")  # applies at once (JS)
    page.wait_for_url("**trigger=conversion_reject**")
    assert ids() == ["104"]
    page.get_by_role("link", name="Clear").click()
    page.get_by_label("Affiliate").fill("42")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**affiliate=42**")
    assert ids() == ["101"]
    page.goto("/ui/offers/8?status=disabled")
    assert ids() == ["105"]
    page.goto("/ui/offers/8?status=active")
    assert ids() == []
    page.goto("/ui/offers/7?action=smtp")
    assert ids() == []
    page.goto("/ui/offers/7?action=ping_url&status=active")
    assert ids() == ["101", "102", "103", "104"]


def _not_found_text(page: Any) -> tuple[str, str]:
    return page.locator("h1").inner_text(), page.locator("main p.notice").inner_text()


def test_an_affiliate_cannot_reach_others_postbacks_or_deliveries(context: Any, live: Live) -> None:
    live.call(
        lambda: live.daemon.post(conversion_id="reach-1", offer=7, affiliate=43, status="approved")
    )
    live.call(lambda: wait_for(lambda: live.sink_paths("/a43")))
    rows = live.call(lambda: live.daemon.deliveries())
    other = next(r.delivery_id for r in rows if r.postback_id == 102)
    admins = next(r.delivery_id for r in rows if r.postback_id == 103)
    page = context.new_page()
    sign_in(page, AFF42)
    missing = page.goto("/ui/postbacks/999999")
    assert missing is not None
    assert missing.status == 404
    expected = _not_found_text(page)
    assert expected[0] == "Not found"
    screenshot(page, "not-found")
    for path in (
        "/ui/postbacks/102",  # affiliate 43's
        "/ui/postbacks/103",  # an admin's
        "/ui/postbacks/104",  # no author
        "/ui/postbacks/abc",
        f"/ui/deliveries/{other}",
        f"/ui/deliveries/{admins}",
        "/ui/deliveries/00000000000000000000000000000000",
        "/ui/postbacks/102/edit",
        "/ui/postbacks/103/delete",
    ):
        response = page.goto(path)
        assert response is not None
        assert response.status == 404, path
        assert _not_found_text(page) == expected, path
    page.goto("/ui/deliveries")
    assert page.locator("a[href^='/ui/deliveries/']").count() == 0
    assert page.goto("/ui/postbacks/101") is not None
    assert page.locator("h1").inner_text().startswith("Postback 101")


def test_an_admin_retries_a_dead_delivery(context: Any, live: Live) -> None:
    live.bad.script = [(400, "unknown offer", {})]  # the first attempt dies, the retry succeeds
    live.call(
        lambda: live.daemon.post(conversion_id="dead-1", offer=7, affiliate=9, status="approved")
    )

    async def dead() -> Any:
        rows = await live.daemon.deliveries(conversion_id="dead-1")
        return next((r for r in rows if r.postback_id == 103 and r.state.value == "dead"), None)

    row = live.call(lambda: wait_for(dead))
    page = context.new_page()
    sign_in(page, ADMIN, "/ui/deliveries?postback=103&state=dead")
    screenshot(page, "deliveries")
    page.get_by_role("link", name=f"{row.delivery_id[:12]}…").click()
    page.wait_for_url(f"**/ui/deliveries/{row.delivery_id}")
    assert "HTTP 400" in page.locator("section.attempt").first.inner_text()
    assert "s3cr3t" not in page.content()
    screenshot(page, "delivery-dead")
    page.get_by_role("button", name="Retry").click()
    page.wait_for_url("**notice=queued")
    assert page.get_by_role("status").inner_text().startswith("Queued again")

    async def succeeded() -> bool:
        detail = await live.daemon.services.store.get_delivery(row.delivery_id)
        return detail is not None and detail.delivery.state.value == "succeeded"

    live.call(lambda: wait_for(succeeded))
    page.reload()
    assert page.locator("h1 .state").inner_text() == "Succeeded"
    assert page.get_by_role("button", name="Retry").count() == 0
    screenshot(page, "delivery")


def test_a_form_without_its_csrf_token_is_refused(context: Any, live: Live) -> None:
    page = context.new_page()
    sign_in(page, ADMIN, "/ui/offers")
    page.evaluate(
        "document.querySelector('form[action=\"/ui/sign-out\"] input[name=csrf]').value = 'forged'"
    )
    with page.expect_response("**/ui/sign-out") as answer:
        page.get_by_role("button", name="Sign out").click()
    assert answer.value.status == 403
    assert "security token" in page.get_by_role("alert").inner_text()
    page.goto("/ui/offers")  # still signed in: the forged sign-out did nothing
    assert page.locator("h1").inner_text() == "Offers"
    page.evaluate(
        "document.querySelector('form[action=\"/ui/sign-out\"] input[name=csrf]').remove()"
    )
    with page.expect_response("**/ui/sign-out") as answer:
        page.get_by_role("button", name="Sign out").click()
    assert answer.value.status == 403


def test_a_session_expires(browser: Any, live: Live) -> None:
    ctx = browser.new_context(base_url=live.url)
    page = ctx.new_page()
    sign_in(page, ADMIN, "/ui/health")
    screenshot(page, "health")
    ttl = live.daemon.services.settings.ui.session_ttl
    live.clock.advance(ttl - 5)
    page.goto("/ui/offers")
    assert page.locator("h1").inner_text() == "Offers"
    live.clock.advance(10)
    page.goto("/ui/offers")
    assert "/ui/sign-in" in page.url
    ctx.close()


def test_the_390_px_layout_is_usable(browser: Any, live: Live) -> None:
    ctx = browser.new_context(
        base_url=live.url, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    page = ctx.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    sign_in(page, ADMIN, "/ui/offers/7")
    for path in (
        "/ui/offers",
        "/ui/offers/7",
        "/ui/postbacks/101",
        "/ui/deliveries",
        "/ui/health",
        "/ui/conversions?source=generic&id=dead-1",
    ):
        page.goto(path)
        scroll, width = page.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert scroll <= width, (path, scroll, width)
        for name in ("Offers", "Deliveries", "Health"):
            link = page.get_by_role("navigation", name="Main").get_by_role("link", name=name)
            box = link.bounding_box()
            assert box is not None
            assert 0 <= box["x"] <= box["x"] + box["width"] <= width, (path, name)
        sign_out = page.get_by_role("button", name="Sign out").bounding_box()
        assert sign_out is not None
        assert sign_out["x"] + sign_out["width"] <= width
    page.goto("/ui/offers/7")
    screenshot(page, "postbacks-390")
    page.keyboard.press("Tab")  # the skip link comes first, then the navigation
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    assert requested
    assert [u for u in requested if not u.startswith(live.url + "/ui/")] == []
    ctx.close()


def test_explain_shows_whether_a_postback_fires_and_the_exact_request(
    context: Any, live: Live
) -> None:
    page = context.new_page()
    sign_in(page, ADMIN, "/ui/postbacks/101")
    conversion = page.get_by_label("Conversion (JSON)")
    conversion.fill(
        '{"conversion_id": "x-1", "offer": 7, "affiliate": 42, "status": "approved", "payout": 3}'
    )
    page.get_by_role("button", name="Explain").click()
    result = page.locator("#explain .result")
    assert result.inner_text().startswith("Does not fire (arrival: New): when is false")
    page.get_by_label("Conversion (JSON)").fill(
        '{"conversion_id": "x-1", "offer": 7, "affiliate": 42, "status": "approved", "payout": 9}'
    )
    page.get_by_role("button", name="Explain").click()
    result = page.locator("#explain .result")
    assert result.inner_text().startswith("Fires (arrival: New)")
    assert f"GET {live.sink.url}/a42?tx=x-1&k=****" in result.inner_text()
    assert "Authorization: ****" in result.inner_text()
    assert "s3cr3t" not in page.content()
    assert live.sink_paths("/a42?tx=x-1") == []  # nothing was sent
    screenshot(page, "postback-explain")
