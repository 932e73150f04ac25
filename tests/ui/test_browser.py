"""The console in a real browser (Debian's chromium through Playwright): sign-in and sign-out,
the postback table, filters, what an affiliate may not reach, retry, CSRF, expiry, 390 px."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from daemon.listing import COLUMNS
from tests.ui.conftest import Live, screenshot
from tests.ui.kit import ADMIN

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
