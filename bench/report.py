"""The benchmark's output: each figure with its unit as it is measured, ratios measured in the
same run, notes, the machine, and a JSON copy for docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    section: str
    name: str
    value: float
    unit: str
    note: str = ""


@dataclass
class Ratio:
    name: str
    value: float
    how: str  # "a / b" in words


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    section: str = ""

    def start(self, section: str, title: str) -> None:
        self.section = section
        print(f"\n== {section}: {title}  (load average {loadavg()})", flush=True)

    def add(self, name: str, value: float, unit: str, note: str = "") -> float:
        self.figures.append(Figure(self.section, name, value, unit, note))
        shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"
        tail = f"  ({note})" if note else ""
        print(f"  {name:<52} {shown:>12} {unit}{tail}", flush=True)
        return value

    def ratio(self, name: str, num: float, den: float, how: str) -> None:
        value = num / den if den else float("nan")
        self.ratios.append(Ratio(name, value, how))
        tail = f"  ({how})" if how else ""
        print(f"  ratio {name:<46} {value:>12.3f}{tail}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(f"{self.section}: {text}")
        print(f"  note: {text}", flush=True)

    def summary(self) -> None:
        print("\n== ratios (measured in this run)")
        for r in self.ratios:
            print(f"  {r.name:<52} {r.value:>8.3f}" + (f"  ({r.how})" if r.how else ""))

    def save(self, path: Path, machine: dict[str, Any], options: dict[str, Any]) -> None:
        data = {
            "machine": machine,
            "options": options,
            "figures": [asdict(f) for f in self.figures],
            "ratios": [asdict(r) for r in self.ratios],
            "notes": self.notes,
        }
        path.write_text(json.dumps(data, indent=2) + "\n")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> dict[str, Any]:
    """Where the figures come from: cores, CPU, memory, Python, kernel, date, load.

    The interpreter is named by its file and build: the same Python version built two ways
    costs differently (docs/benchmarks.md, "The interpreter": Debian's python3.11 ran the hello
    and postbackd about 11 % cheaper than a pyenv build of 3.11.7 on the same machine), so the
    figures of runs on different interpreters compare only in hellos."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "interpreter": os.path.realpath(sys.executable),
        "python_build": ", ".join(filter(None, platform.python_build())),
        "kernel": platform.release(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": loadavg(),
    }


def filesystem_of(path: Path) -> str:
    """The filesystem type holding `path` (tmpfs would make synchronous=FULL free)."""
    best, kind = "", "?"
    target = str(path.resolve())
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mount = parts[1]
            inside = target.startswith(mount.rstrip("/") + "/") or target == mount
            if inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
    except OSError:
        pass
    return kind
