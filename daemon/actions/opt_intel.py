"""opt_intel: add a conversion's email and/or phone to an Opt-Intel opt-out list (one request
per identifier, to the list API link's documented /emails-add and /phones-add)."""

from __future__ import annotations

from typing import Literal

from daemon.actions.base import Resources
from daemon.actions.list_settings import Auth, Call, Kind, ListSettings, join_url
from daemon.actions.listclient import ListClient

KINDS: tuple[Kind, ...] = ("email", "phone")


class OptIntelSettings(ListSettings):
    """Shared by opt_intel and opt_intel_unsubscribe. base_url is the list's "API link"."""

    auth: Auth  # the list API key (where it goes is shown in the list's API Doc)
    email_add_path: str = "/emails-add"
    phone_add_path: str = "/phones-add"

    def remove_path(self, kind: Kind) -> str | None:
        """The remove path for `kind`; None where the action has none configured."""
        return None

    def plan(self) -> tuple[Call, ...]:
        kinds = [k for k in KINDS if k in self.identifier_kinds.values()]
        if not self.removes():
            paths = {"email": self.email_add_path, "phone": self.phone_add_path}
            return tuple(
                Call(join_url(self.base_url, paths[k], f"{k}_add_path"), frozenset({k}))
                for k in kinds
            )
        missing = [f"{k}_remove_path" for k in kinds if self.remove_path(k) is None]
        if missing:
            raise ValueError(
                f"removing needs {' and '.join(missing)}: Opt-Intel's remove endpoint is not"
                " public; copy it from the list's API Doc (/emails-delete and /phones-delete"
                " are unverified guesses)"
            )
        return tuple(
            Call(
                join_url(self.base_url, self.remove_path(k) or "", f"{k}_remove_path"),
                frozenset({k}),
            )
            for k in kinds
        )


class Settings(OptIntelSettings):
    type: Literal["opt_intel"]


def build(settings: OptIntelSettings, resources: Resources) -> ListClient:
    return ListClient(settings, resources)
