"""dnpl: add a conversion's value to (or delete it from) a Do-Not-Present list."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from daemon.actions.base import Resources
from daemon.actions.list_settings import Operation, PathSettings, Text
from daemon.actions.listclient import ListClient
from daemon.macros import Template


class Settings(PathSettings):
    """A DNPL holds values of one product field; by default the phone, sent as `value`."""

    type: Literal["dnpl"]
    list_id: Text
    operation: Operation = "add"  # the platform says add | delete; remove means delete
    fields: dict[str, Text] = Field(default_factory=lambda: {"value": Template("{phone}")})

    def removes(self) -> bool:
        return self.operation != "add"


def build(settings: Settings, resources: Resources) -> ListClient:
    return ListClient(settings, resources)
