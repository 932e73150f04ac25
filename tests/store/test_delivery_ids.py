"""Delivery ids (daemon.store.common.new_delivery_id): 32 hex digits, the creation millisecond
then 80 random bits read from the OS in blocks. The id is the delivery's primary key, so two
threads, or a worker forked from a process that already made some, must never get the same
random part."""

from __future__ import annotations

import os
import re
import threading
from datetime import UTC, datetime, timedelta

from daemon.store import common
from daemon.store.common import new_delivery_id

AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
ID = re.compile(r"[0-9a-f]{32}")


def test_an_id_is_the_millisecond_then_80_random_bits() -> None:
    ids = [new_delivery_id(AT) for _ in range(3 * common._RANDOM_BLOCK)]  # several refills
    assert all(ID.fullmatch(i) for i in ids)
    millis = int((AT - common.EPOCH) / timedelta(milliseconds=1))
    assert {i[:12] for i in ids} == {f"{millis:012x}"}
    assert len(set(ids)) == len(ids)
    # the random parts are not a counter or a repeated block: as many distinct digits as chance
    parts = "".join(i[12:] for i in ids)
    assert set(parts) == set("0123456789abcdef")


def test_ids_sort_by_creation() -> None:
    first = new_delivery_id(AT)
    later = new_delivery_id(AT + timedelta(milliseconds=1))
    assert first < later


def test_threads_never_share_a_random_part() -> None:
    got: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(len(got))

    def make(out: list[str]) -> None:
        start.wait()
        out.extend(new_delivery_id(AT) for _ in range(5_000))

    threads = [threading.Thread(target=make, args=(out,)) for out in got]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for out in got for i in out]
    assert len(every) == 40_000
    assert len(set(every)) == len(every)


def test_a_forked_worker_does_not_reuse_the_parents_random_parts() -> None:
    new_delivery_id(AT)  # this process now keeps unused parts
    assert common._RANDOM_PARTS
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, as a worker forked by daemon.workers makes them
        try:
            os.write(write, ",".join(new_delivery_id(AT) for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode().split(",")
    os.waitpid(pid, 0)
    parent = [new_delivery_id(AT) for _ in range(10)]
    assert len(child) == 10
    assert not set(child) & set(parent)
