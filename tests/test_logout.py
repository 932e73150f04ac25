"""daemon.logout.TurnFlushed: the log lines of one event-loop turn written together, whole
lines only, at most PIPE_BUF bytes per write; at once off the loop; none lost at exit."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import pytest

from daemon.logout import CHUNK, TurnFlushed, _chunks


@contextmanager
def pipe() -> Iterator[tuple[TextIO, int]]:
    """A text stream over a pipe's write end, and its non-blocking read end."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    out = os.fdopen(write_fd, "w", encoding="utf-8")
    try:
        yield out, read_fd
    finally:
        out.close()
        os.close(read_fd)


def drain(fd: int) -> bytes:
    got = b""
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return got
        if not data:
            return got
        got += data


def log(stream: TurnFlushed, line: str) -> None:
    """What structlog's WriteLogger does for one line."""
    stream.write(line + "\n")
    stream.flush()


async def test_lines_of_one_turn_are_written_when_the_turn_ends() -> None:
    with pipe() as (out, read_fd):
        stream = TurnFlushed(out)
        log(stream, '{"event":"a"}')
        log(stream, '{"event":"b"}')
        assert drain(read_fd) == b""  # kept: the turn is not over
        await asyncio.sleep(0)  # the loop runs its next callbacks
        await asyncio.sleep(0)
        assert drain(read_fd) == b'{"event":"a"}\n{"event":"b"}\n'
        log(stream, '{"event":"c"}')
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert drain(read_fd) == b'{"event":"c"}\n'


def test_off_a_loop_a_line_is_written_at_once() -> None:
    with pipe() as (out, read_fd):
        stream = TurnFlushed(out)
        log(stream, "one")
        assert drain(read_fd) == b"one\n"


async def test_a_line_from_another_thread_is_written_at_once_after_those_kept() -> None:
    with pipe() as (out, read_fd):
        stream = TurnFlushed(out)
        log(stream, "kept on the loop")
        thread = threading.Thread(target=log, args=(stream, "from a thread"))
        thread.start()
        thread.join()
        assert drain(read_fd) == b"kept on the loop\nfrom a thread\n"


def test_a_loop_that_stopped_before_its_turn_ended_does_not_keep_the_next_loops_lines() -> None:
    with pipe() as (out, read_fd):
        stream = TurnFlushed(out)

        async def log_and_stop() -> None:
            log(stream, "first")
            asyncio.get_running_loop().stop()

        loop = asyncio.new_event_loop()
        task = loop.create_task(log_and_stop())
        loop.run_forever()  # stops before the write's callback runs
        loop.close()
        assert task.done()
        stream.flush_now()  # as run_loop does when its loop ends
        assert drain(read_fd) == b"first\n"

        async def second() -> None:
            log(stream, "second")
            await asyncio.sleep(0)
            await asyncio.sleep(0)

        asyncio.run(second())
        assert drain(read_fd) == b"second\n"


def test_pieces_are_whole_lines_of_at_most_pipe_buf_bytes() -> None:
    lines = [f'{{"n":{i},"pad":"{"x" * (i % 700)}"}}\n' for i in range(200)]
    pieces = _chunks(lines)
    assert b"".join(pieces) == "".join(lines).encode()
    for piece in pieces:
        assert len(piece) <= CHUNK
        assert piece.endswith(b"\n")
    long_line = "y" * (CHUNK * 2) + "\n"
    pieces = _chunks(["a\n", long_line, "b\n"])
    assert pieces == [b"a\n", long_line.encode(), b"b\n"]  # a longer line alone, whole


def test_non_ascii_and_unencodable_text_never_raise() -> None:
    with pipe() as (out, read_fd):
        stream = TurnFlushed(out)
        log(stream, "caf\u00e9 \ud800")  # a lone surrogate
        assert drain(read_fd) == "caf\u00e9 ".encode() + b"\\ud800\n"


def test_a_closed_stdout_loses_the_lines_and_raises_nothing() -> None:
    read_fd, write_fd = os.pipe()
    out = os.fdopen(write_fd, "w")
    stream = TurnFlushed(out)
    os.close(read_fd)  # the reader is gone: EPIPE (SIGPIPE is ignored by Python)
    log(stream, "nobody reads this")
    out.close()
    log(stream, "closed")


def test_a_stream_without_a_file_descriptor_gets_the_lines_too() -> None:
    import io

    buffer = io.StringIO()
    stream = TurnFlushed(buffer)
    log(stream, "in memory")
    assert buffer.getvalue() == "in memory\n"


SCRIPT = """
import asyncio, os, sys
sys.path.insert(0, {root!r})
from daemon.logout import TurnFlushed
stream = TurnFlushed(sys.stdout)
async def main():
    stream.write("kept at the end\\n")
    stream.flush()
    {ending}
asyncio.run(main())
"""


@pytest.mark.parametrize(
    "ending",
    [
        "asyncio.get_running_loop().stop()",  # the loop ends before the turn does; exit
        "raise SystemExit(3)",
    ],
)
def test_lines_kept_when_the_process_ends_are_written(ending: str) -> None:
    root = str(Path(__file__).resolve().parent.parent)
    code = SCRIPT.format(root=root, ending=ending)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert "kept at the end\n" in done.stdout, done.stderr


def test_lines_kept_by_a_loop_left_unclosed_are_written_at_exit() -> None:
    """The loop stops before its turn ends and is never run or closed again (no Runner to run
    the last callbacks): the process's exit writes what it kept."""
    root = str(Path(__file__).resolve().parent.parent)
    code = f"""
import asyncio, sys
sys.path.insert(0, {root!r})
from daemon.logout import TurnFlushed
stream = TurnFlushed(sys.stdout)
loop = asyncio.new_event_loop()
async def main():
    stream.write("kept at exit\\n")
    stream.flush()
    loop.stop()
task = loop.create_task(main())
loop.run_forever()
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout == "kept at exit\n", (done.stdout, done.stderr)


def test_lines_kept_before_a_fork_are_written_once() -> None:
    root = str(Path(__file__).resolve().parent.parent)
    code = f"""
import asyncio, os, sys
sys.path.insert(0, {root!r})
from daemon.logout import TurnFlushed
stream = TurnFlushed(sys.stdout)
async def main():
    stream.write("before the fork\\n")
    stream.flush()
    pid = os.fork()
    if pid == 0:  # a worker: it writes what it kept when its loop ends (run_loop)
        stream.flush_now()
        os._exit(0)
    os.waitpid(pid, 0)
asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.count("before the fork\n") == 1, (done.stdout, done.stderr)


def test_run_loop_writes_what_its_last_turn_kept() -> None:
    """A worker ends with os._exit (no atexit): run_loop writes the lines itself."""
    root = str(Path(__file__).resolve().parent.parent)
    code = f"""
import asyncio, os, sys
sys.path.insert(0, {root!r})
from daemon.logout import TurnFlushed
from daemon.workers import run_loop
stream = TurnFlushed(sys.stdout)
async def main():
    stream.write("the last line\\n")
    stream.flush()
try:
    run_loop(main, None)
finally:
    os._exit(0)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout == "the last line\n", (done.stdout, done.stderr)


async def test_lines_kept_are_written_before_systemd_hears_of_a_change(tmp_path: Path) -> None:
    """READY=1 (or RELOADING, STOPPING) never reaches systemd before the lines logged before
    it: the notifier writes what the log keeps first."""
    import socket

    from daemon.notify import Notifier

    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd, pipe() as (out, read_fd):
        systemd.bind(address)
        stream = TurnFlushed(out)
        log(stream, '{"event":"rules_reloaded"}')
        assert drain(read_fd) == b""  # kept until the turn ends
        Notifier(address).ready("listening")
        assert drain(read_fd) == b'{"event":"rules_reloaded"}\n'  # written before the send
        assert systemd.recv(4096).startswith(b"READY=1")


async def test_the_daemons_logger_writes_what_write_logger_wrote() -> None:
    """configure_logging over a TurnFlushed stream logs through LineLogger: every level's line
    is the one structlog's WriteLogger wrote to a plain stream (masked, stamped, one JSON object
    and its newline), kept for the turn on the loop and written at once from a thread."""
    import io
    import json

    import structlog

    from daemon.log import configure_logging, get_logger
    from daemon.logout import LineLogger

    def log_every_level(stream: TextIO) -> None:
        configure_logging("json", "debug", stream=stream)
        log = get_logger("t")
        for level in ("debug", "info", "warning", "error", "critical", "msg"):
            getattr(log, level)("event_" + level, email="ann@example.com", n=1)

    try:
        reference = io.StringIO()  # not a TurnFlushed: structlog's WriteLogger
        log_every_level(reference)
        with pipe() as (out, read_fd):
            stream = TurnFlushed(out)
            log_every_level(stream)
            assert isinstance(structlog.get_logger("t").bind()._logger, LineLogger)
            assert drain(read_fd) == b""  # kept for the turn
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            got = drain(read_fd).decode()
            thread = threading.Thread(target=get_logger("t").info, args=("from_thread",))
            thread.start()
            thread.join()
            assert json.loads(drain(read_fd))["event"] == "from_thread"  # written at once
    finally:
        configure_logging("json", "info", stream=io.StringIO())

    def without_time(text: str) -> list[dict[str, object]]:
        events = [json.loads(line) for line in text.splitlines()]
        assert all(e.pop("timestamp") for e in events)
        return events

    assert got.endswith("\n")
    assert without_time(got) == without_time(reference.getvalue())
    assert [e["level"] for e in without_time(got)] == [
        "debug", "info", "warning", "error", "critical", "info"
    ]  # fmt: skip
    assert all(e["email"] == "a***@e***.com" for e in without_time(got))
