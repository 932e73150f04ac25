"""The machine a benchmark run reports: the interpreter is named by its file and build, since
two builds of one Python version cost differently (docs/benchmarks.md, "The interpreter")."""

from __future__ import annotations

import os
import platform
import sys

from bench.report import machine


def test_machine_names_the_interpreter_file_and_build() -> None:
    info = machine()
    assert info["python"] == platform.python_version()
    assert info["interpreter"] == os.path.realpath(sys.executable)
    assert os.path.isabs(info["interpreter"])
    name, built = platform.python_build()
    assert info["python_build"].startswith(name)
    assert built in info["python_build"]
