"""Inbound sources: how one tracker's parameters map onto canonical conversion fields.

The built-in `generic` source takes canonical names as they are; `webhooks/*.yaml` define the
others (SPEC 6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from daemon.errors import InputError
from daemon.models import CANONICAL_FIELDS, Conversion

GENERIC = "generic"


@dataclass(frozen=True)
class Source:
    name: str
    fields: Mapping[str, str] = field(default_factory=dict)  # canonical field -> inbound param
    status_map: Mapping[str, str] = field(default_factory=dict)  # inbound value -> status
    defaults: Mapping[str, str] = field(default_factory=dict)
    response: Literal["json", "text"] = "json"

    def to_conversion(self, params: Mapping[str, str]) -> Conversion:
        """Canonical conversion from inbound parameters; InputError names the inbound field."""
        canonical: dict[str, str] = dict(self.defaults)
        used: set[str] = set()
        inbound_name: dict[str, str] = {}
        for name in CANONICAL_FIELDS:
            param = self.fields.get(name, name)
            value = params.get(param, "")
            if value != "":
                canonical[name] = value
                used.add(param)
                inbound_name[name] = param
        status = canonical.get("status")
        if status is not None and self.status_map:
            mapped = self.status_map.get(status, self.status_map.get(status.lower()))
            if mapped is None:
                raise InputError("unknown status value", inbound_name.get("status", "status"))
            canonical["status"] = mapped
        extra = {k: v for k, v in params.items() if k not in used}
        try:
            return Conversion.parse(canonical, extra)
        except InputError as err:
            field_name = err.field or ""
            raise InputError(err.message, inbound_name.get(field_name, field_name)) from err


GENERIC_SOURCE = Source(GENERIC)
