"""systemd/postbackd-rules-sync against real git repositories: it only ever fast-forwards."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "systemd" / "postbackd-rules-sync"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    # Nothing from the machine's or the user's git configuration, as under systemd.
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "ops",
        "GIT_AUTHOR_EMAIL": "ops@example.com",
        "GIT_COMMITTER_NAME": "ops",
        "GIT_COMMITTER_EMAIL": "ops@example.com",
        **extra,
    }


class Rules:
    """An upstream rules repository, an author's clone of it, and the server's checkout."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.upstream = tmp / "upstream.git"
        self.author = tmp / "author"
        self.checkout = tmp / "var/lib/postbackd-rules/repo"
        self.git(tmp, "init", "--quiet", "--bare", "--initial-branch=main", str(self.upstream))
        self.git(tmp, "clone", "--quiet", str(self.upstream), str(self.author))
        self.commit("offer: 1\n", "first")
        self.checkout.parent.mkdir(parents=True)
        self.git(tmp, "clone", "--quiet", str(self.upstream), str(self.checkout))

    def git(self, cwd: Path, *args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(cwd), *args],
            capture_output=True,
            text=True,
            env=_env(self.tmp),
            check=True,
            timeout=30,
        )
        return done.stdout.strip()

    def commit(self, text: str, message: str) -> str:
        (self.author / "rules.d").mkdir(exist_ok=True)
        (self.author / "rules.d/offer.yaml").write_text(text)
        self.git(self.author, "add", "-A")
        self.git(self.author, "commit", "--quiet", "-m", message)
        self.git(self.author, "push", "--quiet", "origin", "HEAD:main")
        return self.git(self.author, "rev-parse", "HEAD")

    def head(self) -> str:
        return self.git(self.checkout, "rev-parse", "HEAD")

    def rules_text(self) -> str:
        return (self.checkout / "rules.d/offer.yaml").read_text()

    def sync(self, target: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), str(target or self.checkout)],
            capture_output=True,
            text=True,
            env=_env(self.tmp, **env),
            check=False,
            timeout=60,
        )


@pytest.fixture
def rules(tmp_path: Path) -> Rules:
    return Rules(tmp_path)


def test_fast_forwards_to_the_upstream(rules: Rules) -> None:
    old = rules.head()
    new = rules.commit("offer: 2\n", "second")
    done = rules.sync()
    assert done.returncode == 0, done.stderr
    assert rules.head() == new
    assert rules.rules_text() == "offer: 2\n"
    assert done.stderr == f"postbackd-rules-sync: rules moved from {old[:7]} to {new[:7]}\n"
    assert rules.git(rules.checkout, "status", "--porcelain") == ""


def test_up_to_date_is_quiet(rules: Rules) -> None:
    done = rules.sync()
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_rewritten_history_changes_nothing(rules: Rules) -> None:
    before = rules.head()
    rules.git(rules.author, "reset", "--quiet", "--hard", "HEAD")
    rules.git(rules.author, "commit", "--quiet", "--amend", "-m", "rewritten")
    rules.git(rules.author, "push", "--quiet", "--force", "origin", "HEAD:main")
    done = rules.sync()
    assert done.returncode == 1
    assert "history rewritten?" in done.stderr
    assert "nothing was changed" in done.stderr
    assert rules.head() == before
    assert rules.rules_text() == "offer: 1\n"


def test_a_failed_fetch_changes_nothing(rules: Rules) -> None:
    before = rules.head()
    rules.commit("offer: 2\n", "second")
    rules.git(rules.checkout, "remote", "set-url", "origin", str(rules.tmp / "gone.git"))
    done = rules.sync()
    assert done.returncode == 1
    assert done.stderr.endswith("postbackd-rules-sync: fetch failed; nothing was changed\n")
    assert rules.head() == before
    assert rules.rules_text() == "offer: 1\n"


@pytest.mark.parametrize("change", ["edit", "untracked"])
def test_local_changes_are_never_overwritten(rules: Rules, change: str) -> None:
    before = rules.head()
    rules.commit("offer: 2\n", "second")
    if change == "edit":
        (rules.checkout / "rules.d/offer.yaml").write_text("offer: 99\n")
    else:
        (rules.checkout / "rules.d/extra.yaml").write_text("offer: 3\n")
    done = rules.sync()
    assert done.returncode == 1
    assert "has local changes" in done.stderr
    assert rules.head() == before
    assert rules.rules_text() == ("offer: 99\n" if change == "edit" else "offer: 1\n")


def test_a_held_index_lock_is_left_alone(rules: Rules) -> None:
    before = rules.head()
    rules.commit("offer: 2\n", "second")
    lock = rules.checkout / ".git/index.lock"
    lock.write_text("")
    done = rules.sync()
    assert done.returncode == 1
    assert "index.lock exists" in done.stderr
    assert lock.exists()
    assert rules.head() == before


def test_detached_head_is_refused(rules: Rules) -> None:
    rules.git(rules.checkout, "checkout", "--quiet", "--detach")
    rules.commit("offer: 2\n", "second")
    done = rules.sync()
    assert done.returncode == 1
    assert "HEAD is detached" in done.stderr


def test_clones_when_there_is_no_checkout_yet(rules: Rules) -> None:
    target = rules.tmp / "fresh/repo"
    target.parent.mkdir()
    head = rules.commit("offer: 2\n", "second")
    done = rules.sync(target, RULES_REPO_URL=str(rules.upstream), RULES_BRANCH="main")
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"postbackd-rules-sync: cloned the rules at {head[:7]}\n"
    assert rules.git(target, "rev-parse", "HEAD") == head
    assert rules.git(target, "rev-parse", "--abbrev-ref", "@{upstream}") == "origin/main"
    assert sorted(p.name for p in target.parent.iterdir()) == ["repo"]
    # The next run is an ordinary fast-forward.
    newer = rules.commit("offer: 3\n", "third")
    assert rules.sync(target).returncode == 0
    assert rules.git(target, "rev-parse", "HEAD") == newer


def test_a_failed_clone_leaves_nothing_behind(rules: Rules) -> None:
    target = rules.tmp / "fresh/repo"
    target.parent.mkdir()
    done = rules.sync(target, RULES_REPO_URL=str(rules.tmp / "gone.git"))
    assert done.returncode == 1
    assert done.stderr.endswith("clone failed; nothing was changed\n")
    assert list(target.parent.iterdir()) == []


def test_no_checkout_and_no_url_is_an_error(rules: Rules) -> None:
    done = rules.sync(rules.tmp / "nothing")
    assert done.returncode == 1
    assert "is not a git checkout and RULES_REPO_URL is not set" in done.stderr


def test_a_non_empty_folder_is_not_replaced(rules: Rules) -> None:
    target = rules.tmp / "occupied"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    done = rules.sync(target, RULES_REPO_URL=str(rules.upstream))
    assert done.returncode == 1
    assert (target / "keep.txt").read_text() == "mine"


class _Recorder(SimpleHTTPRequestHandler):
    """Serves a bare repository over git's dumb HTTP protocol, only with the right header."""

    expected = ""
    seen: list[str | None]

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="rules"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_rules(rules: Rules) -> Iterator[tuple[str, list[str | None]]]:
    rules.git(rules.upstream, "update-server-info")
    seen: list[str | None] = []
    token = base64.b64encode(b"x-access-token:s3cr3t-rules").decode()
    handler = type("Handler", (_Recorder,), {"expected": f"Basic {token}", "seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(rules.tmp)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/upstream.git", seen
    server.shutdown()
    server.server_close()


def test_https_authorization_comes_from_the_credential(
    rules: Rules, http_rules: tuple[str, list[str | None]]
) -> None:
    url, seen = http_rules
    creds = rules.tmp / "credentials"
    creds.mkdir()
    token = base64.b64encode(b"x-access-token:s3cr3t-rules").decode()
    (creds / "rules_http_authorization").write_text(f"Basic {token}\n")
    target = rules.tmp / "via-http"

    refused = rules.sync(target, RULES_REPO_URL=url)
    assert refused.returncode == 1  # no credential: a 401, and no prompt that would hang
    assert not target.exists()

    done = rules.sync(target, RULES_REPO_URL=url, CREDENTIALS_DIRECTORY=str(creds))
    assert done.returncode == 0, done.stderr
    assert rules.git(target, "rev-parse", "HEAD") == rules.head()
    assert f"Basic {token}" in seen
    assert "s3cr3t" not in done.stdout + done.stderr + refused.stdout + refused.stderr
