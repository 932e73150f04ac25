"""The registry of actions: one settings model per `type:` (a discriminated union) and one
builder per type. Adding an action is one module plus one line in each of the two below; a test
keeps them in sync."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from daemon.actions import (
    dnpl,
    edelivery_contact_list,
    edelivery_unsubscribe,
    facebook_conversion,
    five9_list,
    google_analytics,
    google_sheets,
    lms_post_lead,
    opt_intel,
    opt_intel_unsubscribe,
    ping_url,
    slack_message,
    smtp,
    trustedform_claim,
    twilio_sms,
)
from daemon.actions.base import Action, Resources

ActionSettingsUnion = Annotated[
    ping_url.Settings
    | facebook_conversion.Settings
    | google_analytics.Settings
    | google_sheets.Settings
    | trustedform_claim.Settings
    | dnpl.Settings
    | edelivery_contact_list.Settings
    | edelivery_unsubscribe.Settings
    | opt_intel.Settings
    | opt_intel_unsubscribe.Settings
    | slack_message.Settings
    | smtp.Settings
    | twilio_sms.Settings
    | lms_post_lead.Settings
    | five9_list.Settings,
    Field(discriminator="type"),
]

BUILDERS: dict[str, Callable[[Any, Resources], Action]] = {
    "ping_url": ping_url.build,
    "facebook_conversion": facebook_conversion.build,
    "google_analytics": google_analytics.build,
    "google_sheets": google_sheets.build,
    "trustedform_claim": trustedform_claim.build,
    "dnpl": dnpl.build,
    "edelivery_contact_list": edelivery_contact_list.build,
    "edelivery_unsubscribe": edelivery_unsubscribe.build,
    "opt_intel": opt_intel.build,
    "opt_intel_unsubscribe": opt_intel_unsubscribe.build,
    "slack_message": slack_message.build,
    "smtp": smtp.build,
    "twilio_sms": twilio_sms.build,
    "lms_post_lead": lms_post_lead.build,
    "five9_list": five9_list.build,
}


def build_action(settings: Any, resources: Resources) -> Action:
    return BUILDERS[settings.type](settings, resources)
