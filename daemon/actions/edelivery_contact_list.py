"""edelivery_contact_list: add a conversion's email and/or phone to an E-Delivery contact list."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from daemon.actions.base import Resources
from daemon.actions.list_settings import PathSettings, Text
from daemon.actions.listclient import ListClient
from daemon.macros import Template


class Settings(PathSettings):
    """E-Delivery publishes no API: base_url (and add_path) come from the account's docs."""

    type: Literal["edelivery_contact_list"]
    list_id: Text
    fields: dict[str, Text] = Field(
        default_factory=lambda: {
            "email": Template("{email}"),
            "phone": Template("{phone}"),
            "first_name": Template("{first_name}"),
            "last_name": Template("{last_name}"),
        }
    )


def build(settings: Settings, resources: Resources) -> ListClient:
    return ListClient(settings, resources)
