"""An affiliate manages its postbacks in the browser, through the affiliate service: add
(trigger, then action, then the action's fields), configure, a conversion firing it, disable,
duplicate into another offer, delete by typing the id."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import wait_for
from tests.ui.conftest import Live, screenshot
from tests.ui.kit import AFF42

pytestmark = pytest.mark.slow


@pytest.fixture
def page(browser: Any, live: Live) -> Iterator[Any]:
    ctx = browser.new_context(base_url=live.url, viewport={"width": 1280, "height": 860})
    page = ctx.new_page()
    page.goto("/ui/offers")
    page.get_by_label("API token").fill(AFF42)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/offers")
    yield page
    ctx.close()


def _row_ids(page: Any) -> list[str]:
    return page.locator("table.postbacks tbody tr[data-id]").evaluate_all(
        "rows => rows.map(r => r.dataset.id)"
    )


def test_an_affiliate_adds_configures_fires_disables_duplicates_and_deletes(
    page: Any, live: Live
) -> None:
    screenshot(page, "affiliate-offers")
    page.goto("/ui/offers/7")
    assert _row_ids(page) == ["101"]  # only its own
    page.get_by_role("link", name="Add postback").click()
    page.get_by_label("Trigger", exact=True).select_option("conversion_done")
    page.get_by_label("Action", exact=True).select_option("ping_url")
    page.get_by_role("button", name="Next: the action's settings").click()
    assert page.get_by_role("heading", name="Action: Ping Url").is_visible()
    page.get_by_label("url", exact=False).fill(f"{live.sink.url}/created?tx={{conversion_id}}")
    screenshot(page, "affiliate-add")
    page.get_by_role("button", name="Create postback").click()
    page.wait_for_url(re.compile(r".*/ui/postbacks/\d+\?notice=created"))
    pid = re.search(r"/ui/postbacks/(\d+)", page.url).group(1)  # type: ignore[union-attr]
    assert int(pid) >= 1_000_000_000
    assert page.get_by_role("status").inner_text() == "Postback created."

    page.get_by_role("link", name="Configure").click()
    assert page.get_by_role("heading", name="Action: Ping Url").is_visible()
    assert page.locator("select[name=action], input[name=action][type=text]").count() == 0
    page.get_by_label("url", exact=False).fill(f"{live.sink.url}/configured?tx={{conversion_id}}")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url("**notice=updated")
    assert "/configured" in page.locator("pre.code").first.inner_text()

    live.call(
        lambda: live.daemon.post(conversion_id="aff-1", offer=7, affiliate=42, status="approved")
    )
    live.call(lambda: wait_for(lambda: live.sink_paths("/configured?tx=aff-1")))
    assert live.sink_paths("/created") == []

    page.get_by_role("button", name="Disable").click()
    page.wait_for_url("**notice=disabled")
    assert page.locator("h1 .status").inner_text() == "Disabled"
    screenshot(page, "affiliate-postback")

    page.goto("/ui/offers/8")
    page.get_by_role("link", name="Duplicate from another offer").click()
    page.get_by_label("1. Copy from offer").select_option("7")
    page.get_by_role("button", name="Show its postbacks").click()
    page.get_by_label(re.compile(rf"^{pid} ")).check()
    screenshot(page, "affiliate-duplicate")
    page.get_by_role("button", name="3. Copy into offer 8").click()
    page.get_by_role("button", name="Yes, go ahead").click()  # the confirmation dialog
    page.wait_for_url("**/ui/offers/8?notice=duplicated")
    copies = [i for i in _row_ids(page) if int(i) >= 1_000_000_000]
    assert len(copies) == 1
    assert copies[0] != pid

    page.goto(f"/ui/postbacks/{pid}")
    page.get_by_role("link", name="Delete").click()
    button = page.get_by_role("button", name="Delete postback")
    from playwright.sync_api import expect  # (as conftest: imported where a browser runs)

    # The page's script disables it once it has run (waited for: under load it runs later).
    expect(button).to_be_disabled()
    page.get_by_label(re.compile("Type the postback id")).fill(str(int(pid) + 1))
    assert button.is_disabled()
    page.get_by_label(re.compile("Type the postback id")).fill(pid)
    screenshot(page, "affiliate-delete")
    button.click()
    page.wait_for_url("**/ui/offers/7?notice=deleted")
    assert pid not in _row_ids(page)
    assert page.goto(f"/ui/postbacks/{pid}").status == 404  # type: ignore[union-attr]
