"""Resolution of ${secret:NAME} references (SPEC 7.4): credentials dir, secrets dir, environment.

A value is read at the moment it is asked for (so a rotated file takes effect at the next
attempt) and never appears in an error message: errors name the secret and where we looked.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from daemon.errors import SecretError

SECRET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
ENV_PREFIX = "POSTBACKD_SECRET_"
# An affiliate's `${affiliate_secret:NAME}` is built into the rule set as
# `${secret:affiliate_secret.NAME}` (daemon.affiliates.records) and resolved from that
# affiliate's secrets only. Ops secrets never answer such a name, so nothing that builds a store
# postback with ops secrets (send-test) can send an ops secret to an affiliate (issue 15).
AFFILIATE_PREFIX = "affiliate_secret."
# A secret is a token or a password; anything bigger is a wrong file, not a secret.
MAX_SECRET_BYTES = 64 * 1024

CREDENTIALS = "credentials"
SECRETS_DIR = "secrets_dir"
ENVIRONMENT = "environment"


def valid_secret_name(name: str) -> bool:
    """Letters, digits, `_ . -`; never `.` or a name with `..` (it becomes a file name)."""
    return bool(SECRET_NAME.fullmatch(name)) and name != "." and ".." not in name


def env_var_name(name: str) -> str:
    """The environment variable that may hold secret `name`: `tf.api-key` -> ..._TF_API_KEY."""
    return ENV_PREFIX + name.upper().replace(".", "_").replace("-", "_")


def _strip_newline(text: str) -> str:
    # `echo token > file` and most editors add one newline that is not part of the secret.
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


class SecretResolver:
    """Looks a secret up in $CREDENTIALS_DIRECTORY, then `secrets_dir`, then the environment.

    An empty value (an empty file, `POSTBACKD_SECRET_X=`) counts as not set in that place, so an
    accidentally blank credential is reported instead of sent.
    """

    def __init__(
        self,
        *,
        credentials_dir: str | Path | None,
        secrets_dir: str | Path | None,
        environ: Mapping[str, str],
    ) -> None:
        self._credentials_dir = Path(credentials_dir) if credentials_dir else None
        self._secrets_dir = Path(secrets_dir) if secrets_dir else None
        self._environ = environ

    def __call__(self, name: str) -> str:
        """The secret's value; SecretError (naming the secret, never a value) if it has none."""
        found = self._find(name)
        if found is None:
            raise SecretError(f"secret {name} is not set (looked in {self._places(name)})")
        return found[1]

    def missing(self, names: Iterable[str]) -> list[str]:
        """The names, sorted and without repeats, that do not resolve (or cannot be read)."""
        return sorted(name for name in set(names) if self.where(name) is None)

    def where(self, name: str) -> str | None:
        """Which place holds the secret: "credentials", "secrets_dir" or "environment"."""
        try:
            found = self._find(name)
        except SecretError:
            return None
        return found[0] if found else None

    def _find(self, name: str) -> tuple[str, str] | None:
        if name.startswith(AFFILIATE_PREFIX):
            raise SecretError(f"secret {name} is an affiliate's: ops secrets never resolve it")
        if not valid_secret_name(name):
            raise SecretError(
                f"secret name {name!r} is not valid: use letters, digits, _ . - (and never ..)"
            )
        for place, folder in (
            (CREDENTIALS, self._credentials_dir),
            (SECRETS_DIR, self._secrets_dir),
        ):
            if folder is not None:
                value = _read_file(name, folder / name)
                if value:
                    return place, value
        value = self._environ.get(env_var_name(name), "")
        return (ENVIRONMENT, value) if value else None

    def _places(self, name: str) -> str:
        places = [
            str(folder / name) for folder in (self._credentials_dir, self._secrets_dir) if folder
        ]
        places.append(f"${env_var_name(name)}")
        return ", ".join(places)


def _special(mode: int) -> bool:
    """A FIFO, socket or device (a directory fails to read on its own, with its own error)."""
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _read_file(name: str, path: Path) -> str | None:
    """The file's text without its trailing newline; None when there is no such file. Only a
    regular file is read: a FIFO would block the request that asks for the secret (stat first,
    then a non-blocking open checked with fstat, as the rule loader does)."""
    try:
        if _special(os.stat(path).st_mode):
            raise SecretError(f"secret {name} in {path} is not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        with os.fdopen(fd, "rb") as handle:
            if _special(os.fstat(fd).st_mode):
                raise SecretError(f"secret {name} in {path} is not a regular file")
            data = handle.read(MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else type(err).__name__
        raise SecretError(f"secret {name} cannot be read from {path}: {reason}") from err
    if len(data) > MAX_SECRET_BYTES:
        raise SecretError(f"secret {name} in {path} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        return _strip_newline(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise SecretError(f"secret {name} in {path} is not UTF-8 text") from err
