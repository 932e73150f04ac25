"""The units of systemd/ (SPEC 14): systemd-analyze verify and security, and what they promise.

`systemd-analyze verify` checks that every Exec*= command exists. Rather than edit the units,
the tests lay out an install root the way docs/operations.md installs (units in
/etc/systemd/system, the sync script in /usr/local/lib/postbackd, an executable at the
ExecStart path of the daemon), add the host's own system units so targets resolve, and run
verify with --root on the unchanged unit files.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
DAEMON = "postbackd.service"
SYNC = "postbackd-rules-sync.service"
TIMER = "postbackd-rules-sync.timer"
OURS = {  # install path -> file of this repository (None: the daemon's entry point)
    "/opt/postbackd/current/bin/postbackd": None,
    "/usr/local/lib/postbackd/postbackd-rules-sync": SYSTEMD / "postbackd-rules-sync",
}
MAX_EXPOSURE = 1.5


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is not None:
        return exe
    reason = "systemd-analyze is not installed (apt-get install systemd provides it)"
    if os.environ.get("CI") == "true" or os.environ.get("POSTBACKD_REQUIRE_SYSTEMD") == "1":
        pytest.fail(f"{reason}; CI=true or POSTBACKD_REQUIRE_SYSTEMD=1 requires it")
    pytest.skip(reason)


@pytest.mark.parametrize(
    ("environ", "outcome"),
    [({}, pytest.skip.Exception), ({"CI": "true"}, pytest.fail.Exception),
     ({"POSTBACKD_REQUIRE_SYSTEMD": "1"}, pytest.fail.Exception)],
)  # fmt: skip
def test_missing_systemd_analyze_skips_or_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, environ: dict[str, str], outcome: type
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("POSTBACKD_REQUIRE_SYSTEMD", raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(outcome):
        _systemd_analyze()


def directives(unit: str) -> list[tuple[str, str]]:
    """(key, value) of every assignment in a unit file of systemd/, in order."""
    pairs = []
    for line in (SYSTEMD / unit).read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


def first(unit: str, key: str) -> str:
    return next(value for k, value in directives(unit) if k == key)


def exec_paths(unit: str) -> set[str]:
    """The executables that a unit's Exec*= lines run (prefixes such as - and + dropped)."""
    return {
        value.lstrip("-@:+!").split()[0]
        for key, value in directives(unit)
        if key.startswith("Exec") and value
    }


@pytest.fixture(scope="module")
def install_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _systemd_analyze()  # skip (or fail under CI) before needing the host's systemd units
    root = tmp_path_factory.mktemp("root")
    for host_units in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if host_units.is_dir():  # the targets our units name (multi-user, network-online...)
            shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
            break
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in (DAEMON, SYNC, TIMER):
        shutil.copy(SYSTEMD / unit, root / "etc/systemd/system" / unit)
    for path in set().union(*(exec_paths(u) for u in (DAEMON, SYNC))):
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if path in OURS:
            source = OURS[path]
            if source is None:
                target.write_text(f'#!/bin/sh\nexec {sys.executable} -m daemon "$@"\n')
                target.chmod(0o755)
            else:
                shutil.copy2(source, target)  # keeps the mode the repository gives it
        else:
            shutil.copy2(path, target)  # a host tool such as /bin/kill
    return root


def verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_systemd_analyze(), "verify", f"--root={root}", unit],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("unit", [DAEMON, SYNC, TIMER])
def test_systemd_analyze_verify_prints_nothing(install_root: Path, unit: str) -> None:
    done = verify(install_root, unit)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_verify_would_notice_a_broken_unit(install_root: Path) -> None:
    # The check above is only worth something if verify speaks up in this set-up.
    broken = (SYSTEMD / DAEMON).read_text().replace("ProtectSystem=", "ProtectSytem=")
    (install_root / "etc/systemd/system/broken.service").write_text(broken)
    done = verify(install_root, "broken.service")
    assert "ProtectSytem" in done.stdout + done.stderr


@pytest.mark.parametrize("unit", [DAEMON, SYNC])
def test_security_exposure_is_at_most_1_5(unit: str) -> None:
    done = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", str(SYSTEMD / unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    score = float(found.group(1))
    print(f"{unit}: exposure {score}")
    assert score <= MAX_EXPOSURE


def test_daemon_unit_has_what_spec_14_requires() -> None:
    found = dict(directives(DAEMON))
    assert found["Type"] == "notify"
    assert found["NotifyAccess"] == "main"
    assert found["WatchdogSec"] == "30s"
    assert found["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert found["TimeoutStopSec"] == "30s"
    assert found["KillSignal"] == "SIGTERM"
    assert found["Restart"] == "on-failure"
    assert found["StateDirectory"] == "postbackd"
    assert found["ConfigurationDirectory"] == "postbackd"
    assert found["ExecStart"].endswith(" run -c /etc/postbackd/postbackd.yaml")
    assert "LoadCredential=everflow_token:" in (SYSTEMD / DAEMON).read_text()


def test_units_agree_on_the_rules_checkout() -> None:
    checkout = first(SYNC, "ExecStart").split()[1]
    assert checkout == f"/var/lib/{first(SYNC, 'StateDirectory')}/repo"
    # The daemon (another user) reads that checkout's commit: git must be told to trust it.
    env = " ".join(v for k, v in directives(DAEMON) if k == "Environment").split()
    assert "GIT_CONFIG_KEY_0=safe.directory" in env
    assert f"GIT_CONFIG_VALUE_0={checkout}" in env
    # ...and the daemon's group must be able to read what the sync service writes.
    assert first(SYNC, "Group") == first(DAEMON, "Group")
    assert first(SYNC, "UMask") == "0027"
    assert first(TIMER, "OnCalendar") == "*:0/2"


# --- MemoryDenyWriteExecute= and RestrictAddressFamilies= against the code we load ----------

# The child installs a seccomp filter that refuses what systemd's MemoryDenyWriteExecute=yes
# refuses (mmap writable+executable, mprotect/pkey_mprotect adding exec, shmat SHM_EXEC) and what
# RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 refuses, then exercises our runtime.
CHILD = r"""
import ctypes, importlib, json, mmap, pkgutil, socket, sys
if sys.argv[1] != "-":
    prog = ctypes.create_string_buffer(bytes.fromhex(sys.argv[1]))
    class FProg(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    fprog = FProg(len(prog.raw) // 8, ctypes.addressof(prog))
    assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()
refused = []
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    refused.append("wx-mmap")
try:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
except OSError:
    refused.append("netlink")

import asyncio, pathlib, sqlite3, tempfile
import aiohttp, datalogic_py, jwt, pydantic, watchfiles
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from ruamel.yaml import YAML

async def exercise():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwt.decode(jwt.encode({"a": 1}, key, "RS256"), key.public_key(), ["RS256"])
    assert datalogic_py.apply({">=": [{"var": "p"}, 5]}, {"p": 7}) is True
    assert pydantic.TypeAdapter(int).validate_python("3") == 3
    assert YAML(typ="rt").load("a: [1, 2]")["a"] == [1, 2]
    app = web.Application()
    app.router.add_get("/", lambda request: web.Response(text="hi"))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:  # "localhost": getaddrinfo without netlink
        async with session.get(f"http://localhost:{port}/") as response:
            assert await response.text() == "hi"
    await runner.cleanup()
    folder = pathlib.Path(tempfile.mkdtemp())
    db = sqlite3.connect(folder / "t.db")
    db.execute("pragma journal_mode=wal")
    db.execute("create table t(x)")
    db.commit()
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, (folder / "r.yaml").write_text, "a: 1")
    async for changes in watchfiles.awatch(folder, rust_timeout=5000, yield_on_timeout=True):
        assert changes, "watchfiles saw nothing"
        break

asyncio.run(exercise())
import daemon
modules = {}
for info in pkgutil.walk_packages(daemon.__path__, "daemon."):
    if info.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(info.name)
        modules[info.name] = None
    except Exception as err:
        modules[info.name] = type(err).__name__
print(json.dumps({"refused": refused, "modules": modules}))
"""


def _seccomp_program() -> bytes:
    """A classic-BPF seccomp filter (x86_64) for CHILD; jumps are resolved from labels."""
    ld, jeq, jset, and_, ret = 0x20, 0x15, 0x45, 0x54, 0x06
    allow, eperm, eafnosupport = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 97
    prot = 16 + 8 * 2  # seccomp_data.args[2], low 32 bits
    code: list[tuple[int, str | None, str | None, int]] = []
    labels: dict[str, int] = {}
    for item in [
        (ld, None, None, 4), (jeq, None, "allow", 0xC000003E),  # AUDIT_ARCH_X86_64
        (ld, None, None, 0),  # the syscall number
        (jeq, "mmap", None, 9), (jeq, "exec", None, 10), (jeq, "exec", None, 329),
        (jeq, "shm", None, 30), (jeq, "family", None, 41), (ret, None, None, allow),
        "mmap", (ld, None, None, prot), (and_, None, None, 6), (jeq, "deny", "allow", 6),
        "exec", (ld, None, None, prot), (jset, "deny", "allow", 4),
        "shm", (ld, None, None, prot), (jset, "deny", "allow", 0o100000),
        "family", (ld, None, None, 16),  # args[0] of socket(): the address family
        (jeq, "allow", None, 1), (jeq, "allow", None, 2), (jeq, "allow", None, 10),
        (ret, None, None, eafnosupport),
        "deny", (ret, None, None, eperm),
        "allow", (ret, None, None, allow),
    ]:  # fmt: skip
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)
    out = b""
    for index, (op, on_true, on_false, k) in enumerate(code):
        jt = labels[on_true] - index - 1 if on_true else 0
        jf = labels[on_false] - index - 1 if on_false else 0
        out += struct.pack("=HBBI", op, jt, jf, k)
    return out


def _run_child(program: str) -> tuple[list[str], dict[str, str | None]]:
    """What the child saw refused, and each daemon module's import error (None: imported)."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, program],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=SYSTEMD.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    return result["refused"], result["modules"]


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="the seccomp filter of this test is written for x86_64 Linux",
)
def test_runtime_needs_no_write_execute_memory_nor_other_socket_families() -> None:
    free_refused, free_modules = _run_child("-")
    refused, modules = _run_child(_seccomp_program().hex())
    assert free_refused == []
    assert refused == ["wx-mmap", "netlink"]  # the filter is really in force
    # Every module of the package imports as well under the filter as without it.
    assert modules == free_modules
    assert modules["daemon.notify"] is None
