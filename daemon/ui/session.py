"""Console sign-in sessions: an API token exchanged for a random session id kept server-side.

The table lives in the daemon's memory, keyed by the SHA-256 of the session id (the cookie's
value is never stored). A session carries the viewer its token stood for, its CSRF token and an
absolute expiry (`ui.session_ttl`, read against the daemon's clock). Sign-out deletes the row;
a restart or another node behind the same balancer means signing in again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from daemon.visibility import Viewer

COOKIE = "postbackd_session"
SIGNIN_COOKIE = "postbackd_signin"  # the sign-in form's double-submit CSRF value
MAX_SESSIONS = 10_000  # the oldest sessions go first beyond this
# Sessions of one token at most (its oldest go first): a tenant signing in over and over
# pushes out only its own sessions, never everyone else's.
MAX_PER_TOKEN = 50
_ID_BYTES = 32


def new_secret() -> str:
    return secrets.token_urlsafe(_ID_BYTES)


def same(given: str | None, expected: str) -> bool:
    """Constant-time comparison of two short secrets (False for a missing one)."""
    if not given or len(given) > 200:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


def _token_of(viewer: Viewer) -> tuple[str, str | None, str | None]:
    return viewer.role, viewer.affiliate, viewer.name


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).digest()


@dataclass(frozen=True)
class Session:
    viewer: Viewer
    csrf: str
    expires: float


class Sessions:
    """The signed-in sessions; `now` is the daemon's clock (tests inject a fake one)."""

    def __init__(
        self,
        ttl: float,
        now: Callable[[], float],
        *,
        most: int = MAX_SESSIONS,
        per_token: int = MAX_PER_TOKEN,
    ) -> None:
        self.ttl = ttl
        self._now = now
        self._most = most
        self._per_token = per_token
        self._rows: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def create(self, viewer: Viewer) -> tuple[str, Session]:
        """A new session; returns the id that goes into the cookie, and the session."""
        self._drop_expired()
        who = _token_of(viewer)
        same_token = [k for k, s in self._rows.items() if _token_of(s.viewer) == who]
        for key in same_token[: max(0, len(same_token) - self._per_token + 1)]:
            del self._rows[key]  # dicts keep insertion order: that token's oldest
        while len(self._rows) >= self._most:
            del self._rows[next(iter(self._rows))]  # the oldest of all
        session_id = new_secret()
        session = Session(viewer, new_secret(), self._now() + self.ttl)
        self._rows[_key(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of a cookie value; None when unknown or expired."""
        if not session_id or len(session_id) > 200:
            return None
        key = _key(session_id)
        session = self._rows.get(key)
        if session is None:
            return None
        if session.expires <= self._now():
            del self._rows[key]
            return None
        return session

    def delete(self, session_id: str | None) -> None:
        if session_id:
            self._rows.pop(_key(session_id), None)

    def _drop_expired(self) -> None:
        now = self._now()
        for key in [k for k, s in self._rows.items() if s.expires <= now]:
            del self._rows[key]


MAX_FAILURES = 20  # wrong tokens one client may try per FAILURE_WINDOW
FAILURE_WINDOW = 300.0
MAX_CLIENTS = 10_000  # clients remembered at most; the oldest go first


class SignInBound:
    """Wrong sign-in tokens per client address: past MAX_FAILURES in FAILURE_WINDOW seconds the
    client is refused (429) until the window, counted from its first failure, has passed. The
    token is then not even looked at, so the answer says nothing about it."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._rows: dict[str, tuple[float, int]] = {}  # client -> (first failure, failures)

    def wait(self, client: str) -> float:
        """Seconds until `client` may try again (0: now)."""
        row = self._rows.get(client)
        if row is None:
            return 0.0
        left = row[0] + FAILURE_WINDOW - self._now()
        if left <= 0:
            del self._rows[client]
            return 0.0
        return left if row[1] >= MAX_FAILURES else 0.0

    def failed(self, client: str) -> None:
        now = self._now()
        first, count = self._rows.pop(client, (now, 0))
        if first + FAILURE_WINDOW <= now:
            first, count = now, 0
        while len(self._rows) >= MAX_CLIENTS:
            del self._rows[next(iter(self._rows))]
        self._rows[client] = (first, count + 1)
