"""CPU quotas for processes of the benchmark (Linux cgroups): a machine with more cores than this
one, simulated. Each capped node gets `fraction` of one core, as if it ran alone on a small
machine of its own, while PostgreSQL, wrk and the sink share what is left. N capped nodes
against one then show how the cluster scales with its nodes' cores when the cores are there,
which 3 uncapped nodes on 2 cores cannot (they only share the same 2 cores).

cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`), whichever this machine mounts with the cpu
controller; it needs root. The quota is enforced per period (PERIOD_US): a capped process
that used its share waits for the next period, so latency figures of capped nodes are not
those of a machine with that many cores, only rates and CPU per conversion are."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

PERIOD_US = 20_000  # 20 ms: a capped node waits at most this long for its next share


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(type, mount point, options) of the cgroup file systems."""
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                found.append((parts[2], parts[1], set(parts[3].split(","))))
    return found


def _cpu_root() -> tuple[Path, int] | None:
    """The cgroup root that can cap CPU and its version (2 or 1), or None."""
    for kind, point, options in _mounts():
        root = Path(point)
        if kind == "cgroup2":
            with contextlib.suppress(OSError):
                if "cpu" in (root / "cgroup.controllers").read_text().split():
                    return root, 2
        elif "cpu" in options:
            return root, 1
    return None


def unavailable() -> str | None:
    """Why CPU quotas cannot be set here, or None when they can."""
    if os.geteuid() != 0:
        return "CPU quotas need root (cgroups)"
    if _cpu_root() is None:
        return "no cgroup file system with the cpu controller is mounted"
    return None


class CpuQuota:
    """One cgroup capped at `fraction` of a core; processes are added by pid (each with all of
    its threads). Closing moves any that are left back to the root and removes the group."""

    def __init__(self, fraction: float) -> None:
        found = _cpu_root()
        if found is None:
            raise RuntimeError("no cgroup with the cpu controller")
        self._root, version = found
        self.path = self._root / f"postbackd-bench-{uuid.uuid4().hex[:8]}"
        quota = max(1000, int(PERIOD_US * fraction))
        if version == 2:
            with contextlib.suppress(OSError):  # already enabled, or not needed at the root
                (self._root / "cgroup.subtree_control").write_text("+cpu")
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (self._root / "cgroup.procs").write_text(pid)
        for _ in range(50):  # a process that just exited may still count for a moment
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)


@contextlib.contextmanager
def each_capped(pids: Iterable[int], fraction: float | None) -> Iterator[None]:
    """Each of `pids` in a CpuQuota of its own (a core each, simulated) while the block runs;
    nothing is capped when `fraction` is None. The groups are removed at the end."""
    caps: list[CpuQuota] = []
    try:
        if fraction is not None:
            for pid in pids:
                caps.append(CpuQuota(fraction))
                caps[-1].add(pid)
        yield
    finally:
        for cap in caps:
            cap.close()
