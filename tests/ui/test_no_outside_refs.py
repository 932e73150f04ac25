"""No page or asset of the console refers to anything outside the daemon: every page reachable
by following links (as an admin and as an affiliate) and every asset they load is parsed for
absolute URLs. The one exception is the configured repository link, a plain <a>."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

from tests.harness import Daemon, Sink, start_daemon, wait_for
from tests.ui.kit import ADMIN, AFF42, ENV, rules, settings, sign_in

REPO = "https://git.example.com/ops/rules/blob/main"
URL_ATTRS = {
    "href",
    "src",
    "action",
    "formaction",
    "srcset",
    "poster",
    "data",
    "background",
    "cite",
    "manifest",
    "xlink:href",
    "ping",
    "content",
}
_ABSOLUTE = re.compile(r"^\s*([a-zA-Z][a-zA-Z0-9+.-]*:|//|\\\\)")
_CSS_URL = re.compile(r"url\(|@import", re.IGNORECASE)
_ANY_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://|//[a-z0-9]", re.IGNORECASE)


class Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.inline: list[str] = []  # inline scripts or styles: the CSP would block them

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in URL_ATTRS and value is not None:
                if tag == "meta" and name == "content" and "url=" not in value.lower():
                    continue
                self.refs.append((tag, name, value))
            if name == "style" or name.startswith("on"):
                self.inline.append(f"{tag} {name}")
        if tag == "style":
            self.inline.append("style")

    def handle_data(self, data: str) -> None:
        if self.lasttag == "script" and data.strip():
            self.inline.append("script")


@pytest.fixture
async def daemon(tmp_path: Path, sink: Sink) -> AsyncIterator[Daemon]:
    bad = await Sink().start()
    d = await start_daemon(
        tmp_path, rules(sink, bad), environ=ENV, settings=settings(repository_url=REPO)
    )
    yield d
    await d.client.close()
    await bad.close()


async def crawl(d: Daemon, start: list[str], limit: int = 80) -> dict[str, str]:
    """Every /ui/ page and asset reachable from `start` by GET (bounded), by path."""
    seen: dict[str, str] = {}
    todo = list(start)
    while todo and len(seen) < limit:
        path = todo.pop(0)
        if path in seen:
            continue
        resp = await d.client.get(path)
        assert resp.status in (200, 400, 403, 404), (path, resp.status)
        seen[path] = await resp.text()
        if resp.content_type != "text/html":
            continue
        parser = Refs()
        parser.feed(seen[path])
        assert parser.inline == [], (path, parser.inline)
        for tag, _, value in parser.refs:
            if _ABSOLUTE.match(value):
                continue  # judged below
            target = urljoin(path, value)
            parts = urlsplit(target)
            if parts.path.startswith("/ui/") and "sign-out" not in parts.path and tag != "form":
                todo.append(parts.path + (f"?{parts.query}" if parts.query else ""))
    return seen


def outside_refs(seen: dict[str, str]) -> list[tuple[str, str]]:
    found = []
    for path, body in seen.items():
        if path.endswith((".css", ".js", ".svg")):
            if _CSS_URL.search(body) or _ANY_URL.search(
                body.replace("http://www.w3.org/2000/svg", "")
            ):
                found.append((path, "asset refers to a URL"))
            continue
        parser = Refs()
        parser.feed(body)
        for tag, attr, value in parser.refs:
            if not _ABSOLUTE.match(value):
                continue
            if tag == "a" and attr == "href" and value.startswith(REPO + "/"):
                continue  # the configured repository link
            found.append((path, f"<{tag} {attr}={value!r}>"))
    return found


async def test_no_page_or_asset_refers_outside_the_daemon(daemon: Daemon, sink: Sink) -> None:
    await daemon.post(conversion_id="r1", offer=7, affiliate=42, status="approved", payout=9)
    await wait_for(lambda: len(sink.received) >= 1)
    anonymous = await crawl(daemon, ["/ui/sign-in"])
    await sign_in(daemon.client, ADMIN)
    admin = await crawl(
        daemon,
        ["/ui/offers", "/ui/deliveries", "/ui/health", "/ui/conversions?source=generic&id=r1"],
    )
    daemon.client.session.cookie_jar.clear()
    await sign_in(daemon.client, AFF42)
    affiliate = await crawl(daemon, ["/ui/offers", "/ui/deliveries"])
    for pages in (anonymous, admin, affiliate):
        assert outside_refs(pages) == []
    # The crawl did reach the pages and assets that matter.
    for path in (
        "/ui/static/console.css",
        "/ui/static/console.js",
        "/ui/static/icon.svg",
        "/ui/offers/7",
        "/ui/postbacks/101",
        "/ui/postbacks/101/send-test",
    ):
        assert path in admin, path
    assert any(p.startswith("/ui/deliveries/") for p in admin)
    assert f'href="{REPO}/offer-7.yaml#L3"' in admin["/ui/offers/7"]
    assert "/ui/postbacks/102" not in affiliate


def test_the_checker_sees_outside_references() -> None:
    pages = {
        "/ui/x": '<img src="https://cdn.example/a.png"><a href="//evil.example/">x</a>'
        '<form action="http://evil.example/"></form><link href="data:text/css,">',
        "/ui/static/a.css": "body { background: url(/x.png) }",
        "/ui/static/a.js": 'fetch("https://evil.example/")',
        "/ui/y": f'<a href="{REPO}/f.yaml#L1">ok</a><a href="/ui/z">ok</a>',
    }
    found = outside_refs(pages)
    assert [f[0] for f in found] == ["/ui/x"] * 4 + ["/ui/static/a.css", "/ui/static/a.js"]
