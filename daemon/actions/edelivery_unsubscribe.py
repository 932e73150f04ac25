"""edelivery_unsubscribe: add a conversion's email and/or phone to (or remove it from) an
E-Delivery unsubscribe list."""

from __future__ import annotations

from typing import Literal

from daemon.actions.base import Resources
from daemon.actions.list_settings import Operation, PathSettings, Text
from daemon.actions.listclient import ListClient


class Settings(PathSettings):
    """Unsubscribing is adding to the list; `operation: remove` takes a contact off it."""

    type: Literal["edelivery_unsubscribe"]
    list_id: Text
    operation: Operation = "add"

    def removes(self) -> bool:
        return self.operation != "add"


def build(settings: Settings, resources: Resources) -> ListClient:
    return ListClient(settings, resources)
