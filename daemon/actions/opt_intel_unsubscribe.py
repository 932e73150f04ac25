"""opt_intel_unsubscribe: add a conversion's email and/or phone to (or remove it from) an
Opt-Intel unsubscribe list, plain or MD5-hashed."""

from __future__ import annotations

from typing import Literal

from daemon.actions.base import Resources
from daemon.actions.list_settings import Kind, Operation
from daemon.actions.listclient import ListClient
from daemon.actions.opt_intel import OptIntelSettings


class Settings(OptIntelSettings):
    """The remove paths have no default: the platform does not publish them."""

    type: Literal["opt_intel_unsubscribe"]
    operation: Operation = "add"
    email_remove_path: str | None = None
    phone_remove_path: str | None = None

    def removes(self) -> bool:
        return self.operation != "add"

    def remove_path(self, kind: Kind) -> str | None:
        return self.email_remove_path if kind == "email" else self.phone_remove_path


def build(settings: Settings, resources: Resources) -> ListClient:
    return ListClient(settings, resources)
