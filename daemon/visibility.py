"""Who may see which postback (SPEC 1 and 12): admins see all; a user of an affiliate sees only
the postbacks whose author belongs to that affiliate, never another affiliate's or an admin's.

Shared by the HTTP API (the caller's bearer token) and `postbackd rules list --as`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from daemon.rules import Postback


@dataclass(frozen=True)
class Viewer:
    """The one looking: an admin, or a user of affiliate `affiliate`."""

    role: Literal["admin", "affiliate"]
    affiliate: str | None = None
    # The token's name, as the author of store postbacks and of their audit rows (issue 15).
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if (self.role == "affiliate") != (self.affiliate is not None):
            raise ValueError("an affiliate viewer needs an affiliate id, an admin has none")

    @classmethod
    def admin(cls) -> Viewer:
        return cls("admin")

    @classmethod
    def of_affiliate(cls, affiliate: str | int) -> Viewer:
        """Ids compare as strings (SPEC 7.1): 42 and "42" are the same affiliate."""
        return cls("affiliate", str(affiliate).strip())

    @classmethod
    def parse(cls, text: str) -> Viewer:
        """`admin` or `affiliate:ID` (the CLI's --as); ValueError for anything else."""
        if text == "admin":
            return cls.admin()
        kind, sep, affiliate = text.partition(":")
        if kind == "affiliate" and sep and affiliate.strip():
            return cls.of_affiliate(affiliate)
        raise ValueError(f"{text!r} is not admin or affiliate:ID")

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def visible_to(postback: Postback, viewer: Viewer) -> bool:
    """True when `viewer` may see `postback` (and its deliveries)."""
    if viewer.is_admin:
        return True
    owner = postback.owner_affiliate
    return owner is not None and owner == viewer.affiliate
