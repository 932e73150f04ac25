"""bench/quota.py: the CPU quota the benchmark caps nodes with (a machine with more cores,
simulated). Checked on what the kernel reads back, never by timing: the cap's effect on rates is
what `make bench` measures."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import quota


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _cap_of(path: Path) -> tuple[int, int]:
    """(quota, period) in µs as the kernel reads them back, v2 or v1."""
    if (path / "cpu.max").exists():
        limit, period = (path / "cpu.max").read_text().split()
        return int(limit), int(period)
    limit = int((path / "cpu.cfs_quota_us").read_text())
    return limit, int((path / "cpu.cfs_period_us").read_text())


def test_a_process_is_capped_then_the_group_is_removed(sleeper: subprocess.Popen[bytes]) -> None:
    problem = quota.unavailable()
    if problem is not None:
        pytest.skip(problem)
    cap = quota.CpuQuota(0.25)
    try:
        assert _cap_of(cap.path) == (quota.PERIOD_US // 4, quota.PERIOD_US)
        cap.add(sleeper.pid)
        assert str(sleeper.pid) in (cap.path / "cgroup.procs").read_text().split()
    finally:
        cap.close()
    assert not cap.path.exists()  # the sleeper still runs: it was moved out, not left behind
    assert sleeper.poll() is None


def test_a_tiny_share_is_still_a_valid_quota() -> None:
    if quota.unavailable() is not None:
        pytest.skip("no CPU quotas here")
    cap = quota.CpuQuota(0.001)  # the kernel refuses a quota under 1 ms
    try:
        assert _cap_of(cap.path)[0] == 1000
    finally:
        cap.close()


def test_each_pid_is_capped_in_a_group_of_its_own_while_the_block_runs(
    sleeper: subprocess.Popen[bytes],
) -> None:
    if quota.unavailable() is not None:
        pytest.skip("no CPU quotas here")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with quota.each_capped([sleeper.pid, other.pid], 0.25):
            groups = {_group_of(sleeper.pid), _group_of(other.pid)}
            assert len(groups) == 2  # one group each
            assert all("postbackd-bench-" in g for g in groups)
        assert not any("postbackd-bench-" in _group_of(p) for p in (sleeper.pid, other.pid))
        with quota.each_capped([sleeper.pid], None):  # no share: nothing capped
            assert "postbackd-bench-" not in _group_of(sleeper.pid)
    finally:
        other.kill()
        other.wait()


def _group_of(pid: int) -> str:
    """The pid's cgroup path for the cpu controller (v1) or the unified one (v2)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    return next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))


def test_without_root_quotas_are_said_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quota.os, "geteuid", lambda: 1000)
    assert quota.unavailable() == "CPU quotas need root (cgroups)"
