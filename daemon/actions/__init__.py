"""The registry of actions: one settings model per `type:` (a discriminated union) and one
builder per type. Adding an action is one module plus one line in each of the two below; a test
keeps them in sync."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from daemon.actions import facebook_conversion, ping_url, trustedform_claim
from daemon.actions.base import Action, Resources

ActionSettingsUnion = Annotated[
    ping_url.Settings | facebook_conversion.Settings | trustedform_claim.Settings,
    Field(discriminator="type"),
]

BUILDERS: dict[str, Callable[[Any, Resources], Action]] = {
    "ping_url": ping_url.build,
    "facebook_conversion": facebook_conversion.build,
    "trustedform_claim": trustedform_claim.build,
}


def build_action(settings: Any, resources: Resources) -> Action:
    return BUILDERS[settings.type](settings, resources)
