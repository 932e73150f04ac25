"""XSS through every value the console renders that an outsider, a tenant or a rule file
controls, proven in the real browser: the hostile values reach the page as text, and no script
of theirs runs (a `window.__pwned` flag never set, no dialog opened). Held: jinja2 autoescape,
no `|safe`, a CSP without inline script, console.js writes text only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.harness import Daemon, Sink, start_daemon, wait_for
from tests.ui.conftest import Live
from tests.ui.kit import ADMIN, AFF42, ENV, TOKENS, rules

pytestmark = pytest.mark.slow

# Every way out of text, an attribute (either quote), a URL and a script block.
P = (
    "\"'></textarea></script><script>window.__pwned=1</script>"
    '<img src=x onerror="window.__pwned=2"><svg onload=alert(3)>'
)
MARK = "<script>window.__pwned=1</script>"  # how a page shows P as text (JSON escapes quotes)
JS_URL = "javascript:window.__pwned=4"
REPO = "http://127.0.0.1:9/\"'><script>window.__pwned=5</script><img/src=x/onerror=alert(6)>"


class HostileLive(Live):
    """The console's daemon with hostile values in the catalogue, a postback's header and the
    repository link; a destination answering HTML with script."""

    async def _start(self, tmp: Path) -> tuple[Sink, Sink, Daemon]:
        sink = await Sink().start()
        bad = await Sink().start()
        files = rules(sink, bad)
        files["catalogue.yaml"] = (
            f"offers:\n  7: {{name: {json.dumps(P)}}}\n  8: {{name: {json.dumps(JS_URL)}}}\n"
        )
        files["offer-7.yaml"] = files["offer-7.yaml"].replace(
            '"Bearer ${secret:sink_tok}"', json.dumps(P)
        )
        daemon = await start_daemon(
            tmp,
            files,
            environ=ENV,
            settings={
                "api": {"tokens": TOKENS},
                "ui": {"repository_url": REPO},
            },
            clock=self.clock,
        )
        return sink, bad, daemon


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileLive]:
    from tests.ui.conftest import need_chromium

    need_chromium()
    server = HostileLive(tmp_path_factory.mktemp("hostile"))
    yield server
    server.close()


def _seed(live: HostileLive) -> None:
    """A conversion whose extra keys and values are hostile, fired to a destination that
    answers 500 with an HTML page of script (the delivery page shows that excerpt)."""
    live.bad.script = [(500, P, {"Content-Type": "text/html"})] * 20
    live.sink.script = [(200, P, {"Content-Type": "text/html"})] * 20

    async def post() -> None:
        await live.daemon.post(
            conversion_id="x1", offer=7, affiliate=42, status="approved", payout=9, **{P: P}
        )
        await wait_for(lambda: len(live.bad.received) >= 1 and len(live.sink.received) >= 1)

    live.call(post)


def _visit_all(page: Any, paths: list[str]) -> None:
    dialogs: list[str] = []

    def opened(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", opened)
    for path in paths:
        page.goto(path)
        assert page.evaluate("window.__pwned") is None, path
        assert dialogs == [], path
        assert page.locator("img[src=x], svg[onload]").count() == 0, path


def _sign_in(page: Any, token: str) -> None:
    page.goto("/ui/sign-in")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/offers")


def test_no_hostile_value_runs_script_in_any_page(browser: Any, hostile: HostileLive) -> None:
    _seed(hostile)
    # A reload that fails on a rule file full of hostile text: Health shows its errors.
    (hostile.daemon.rules_dir / "offer-9.yaml").write_text(
        f"offer: 9\npostbacks:\n  - id: {json.dumps(P)}\n    {json.dumps(P)}: {json.dumps(P)}\n"
    )
    assert hostile.call(lambda: hostile.daemon.services.reloader.reload("test")) is False
    ctx = browser.new_context(base_url=hostile.url)
    page = ctx.new_page()
    # Reflected before sign-in: the next= of the sign-in form.
    _visit_all(page, ["/ui/sign-in?next=" + quote("/ui/" + P)])
    _sign_in(page, ADMIN)
    rows = hostile.call(hostile.daemon.deliveries)
    assert rows, "the conversion fired nothing"
    q = quote(P, safe="")
    paths = [
        "/ui/offers",
        "/ui/offers/7",
        "/ui/postbacks/101",
        "/ui/postbacks/103",
        "/ui/postbacks/101/send-test",
        "/ui/deliveries",
        *(f"/ui/deliveries/{r.delivery_id}" for r in rows),
        "/ui/conversions?source=generic&id=x1",
        f"/ui/conversions?source={q}&id={q}",
        f"/ui/deliveries?offer={q}&affiliate={q}",
        f"/ui/deliveries?since={q}",
        f"/ui/offers/{q}",
        f"/ui/offers/{q}/duplicate",
        f"/ui/offers/{q}/add",
        "/ui/health",
    ]
    _visit_all(page, paths)
    # The hostile values did reach the pages, as text.
    page.goto("/ui/offers")
    assert MARK in page.locator("main").inner_text()
    page.goto("/ui/conversions?source=generic&id=x1")
    assert MARK in page.locator("main").inner_text()
    page.goto("/ui/health")
    assert "offer-9.yaml" in page.locator("main").inner_text()
    dead = next(r for r in rows if r.postback_id == 103)
    page.goto(f"/ui/deliveries/{dead.delivery_id}")
    assert MARK in page.locator("main").inner_text()
    # Links built from a value never take a script: URL (the repository link keeps its host).
    hrefs = page.evaluate("[...document.links].map(a => a.href)")
    page.goto("/ui/postbacks/101")
    hrefs += page.evaluate("[...document.links].map(a => a.href)")
    assert not [h for h in hrefs if not h.startswith(("http://127.0.0.1", hostile.url))], hrefs
    ctx.close()


def test_an_affiliate_sees_hostile_values_as_text(browser: Any, hostile: HostileLive) -> None:
    """Its own store postback made through the API with hostile headers and body: shown on its
    page and prefilled in Configure's inputs and textareas, as text."""

    async def create() -> tuple[int, str]:
        resp = await hostile.daemon.client.post(
            "/api/v1/postbacks",
            json={
                "offer": 7,
                "trigger": "conversion_done",
                "action": {
                    "type": "ping_url",
                    "url": f"{hostile.sink.url}/h?n={quote(P, safe='')}",
                    "method": "POST",
                    "headers": {"X-Note": P.replace('"', "'")},
                    "json": {P: P},
                },
            },
            headers={"Authorization": f"Bearer {AFF42}"},
        )
        return resp.status, await resp.text()

    status, text = hostile.call(create)
    assert status == 201, text
    pid = json.loads(text)["id"]
    ctx = browser.new_context(base_url=hostile.url)
    page = ctx.new_page()
    _sign_in(page, AFF42)
    _visit_all(
        page,
        [
            "/ui/offers",
            "/ui/offers/7",
            "/ui/postbacks/101",
            "/ui/deliveries",
            f"/ui/postbacks/{pid}",
            f"/ui/postbacks/{pid}/edit",
            f"/ui/postbacks/{pid}/delete",
        ],
    )
    page.goto(f"/ui/postbacks/{pid}/edit")
    values = page.evaluate(
        "[...document.querySelectorAll('main input, main textarea')].map(e => e.value)"
    )
    assert any(MARK in v for v in values), values
    ctx.close()


def test_another_origin_cannot_frame_a_confirmation(browser: Any, hostile: HostileLive) -> None:
    """Held (clickjacking): a page of another origin (a loopback server on another port,
    same-site, so the session cookie would go along) frames Send test; the browser refuses
    to show it (frame-ancestors 'none', X-Frame-Options DENY): no button to trick a click on."""
    framer = hostile.call(lambda: Sink().start())
    target = f"{hostile.url}/ui/postbacks/103/send-test"
    framer.script = [(200, f'<iframe src="{target}"></iframe>', {"Content-Type": "text/html"})]
    ctx = browser.new_context(base_url=hostile.url)
    page = ctx.new_page()
    _sign_in(page, ADMIN)
    page.goto("/ui/postbacks/103/send-test")
    assert page.locator("main button[type=submit]").count() == 1  # unframed, it is there
    page.goto(f"{framer.url}/clickjack")
    page.wait_for_load_state("load")
    frames = page.frames[1:]
    assert frames, "the framing page has no frame"
    for frame in frames:
        assert frame.locator("button").count() == 0, frame.url
    ctx.close()
    hostile.call(framer.close)
