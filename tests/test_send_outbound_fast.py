"""The send path's shortcuts (daemon.outbound): a rendered URL is parsed without the full parse,
a small body is read in one read, and the response is released as aiohttp's context manager
would."""

from __future__ import annotations

import asyncio

import pytest
from yarl import URL

from daemon import outbound
from daemon.errors import PermanentError
from daemon.outbound import Guard, OutboundHttp, _parse_url
from tests.test_outbound import RawServer


def test_a_rendered_url_is_parsed_without_the_full_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "http://127.0.0.1:8080/pb?k=generic:c1:1:1&cid=ck1#f"
    expected = _parse_url(text, "bad_url")
    monkeypatch.setattr(outbound, "_parse_url_in_full", _refused)
    assert _parse_url(text, "bad_url") == expected
    assert str(expected) == text
    assert (expected.raw_path, expected.raw_query_string, expected.raw_fragment) == (
        "/pb",
        "k=generic:c1:1:1&cid=ck1",
        "f",
    )


@pytest.mark.parametrize(
    "text",
    ["http://h?x=1://a/b", "http://h/p?", "http://h/p#a?#b", "ftp://h/x", "http://h/sp ace"],
)
def test_what_the_fast_match_leaves_takes_the_full_parse(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setattr(outbound, "_parse_url_in_full", _refused)
    with pytest.raises(AssertionError, match="full parse"):
        _parse_url(text, "bad_url")


def test_a_redirect_target_takes_the_full_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    base = URL("http://h/a")
    monkeypatch.setattr(outbound, "_parse_url_in_full", _refused)
    with pytest.raises(AssertionError, match="full parse"):
        _parse_url("http://h/b", "bad_redirect", base=base)


def _refused(text: str, reason: str, *, base: URL | None = None) -> URL:
    raise AssertionError(f"full parse of {text!r}")


def test_an_unusable_url_is_still_refused() -> None:
    with pytest.raises(PermanentError) as caught:
        _parse_url("ftp://h/x", "bad_url")
    assert caught.value.reason == "bad_url"


class _KeepAlive(RawServer):
    """A loopback HTTP/1.1 server that keeps connections open and counts them; /parts answers
    with a chunked body written in three pieces, a moment apart."""

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /parts "):
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for part in (b"one,", b"two,", b"three"):
                        writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                        await writer.drain()
                        await asyncio.sleep(0.02)
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def test_a_body_in_several_reads_is_read_whole_and_the_connection_reused() -> None:
    async with _KeepAlive() as server, OutboundHttp(guard=Guard(["127.0.0.1/32"])) as http:
        base = f"http://127.0.0.1:{server.port}"
        assert (await http.request("GET", f"{base}/ok")).body == b"OK"
        assert (await http.request("GET", f"{base}/parts")).body == b"one,two,three"
        assert (await http.request("GET", f"{base}/ok")).body == b"OK"
        assert server.accepted == 1  # each response released its connection to the pool


@pytest.mark.parametrize("reason", ["bad_url", "bad_redirect"])
def test_a_url_that_trips_the_parser_is_refused_not_raised(reason: str) -> None:
    # yarl raises IndexError (not ValueError) on this one; from a redirect's Location it
    # would otherwise end the attempt as an internal error, retried.
    base = URL("http://h/") if reason == "bad_redirect" else None
    with pytest.raises(PermanentError) as caught:
        _parse_url("http://[x]@/", reason, base=base)
    assert caught.value.reason == reason


def test_the_client_keeps_the_loop_it_was_started_in_and_a_restart_takes_the_new_one() -> None:
    # The deadline of every request is read on that loop's clock (without asking asyncio for
    # the running loop, a system call, on each request).
    http = OutboundHttp(guard=Guard(["127.0.0.1/32"]))
    loops = []

    async def run() -> None:
        async with _KeepAlive() as server:
            await http.start()
            try:
                loops.append((http._loop, asyncio.get_running_loop()))
                got = await http.request("GET", f"http://127.0.0.1:{server.port}/ok", timeout=5)
                assert got.body == b"OK"
            finally:
                await http.close()

    asyncio.run(run())
    asyncio.run(run())
    assert [kept is running for kept, running in loops] == [True, True]
    assert loops[0][1] is not loops[1][1]
