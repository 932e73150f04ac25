"""An action's own fields as a form, derived from its settings model (no hand-kept list): what
input each field gets, and the form's values back as the `action` mapping of a postback."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from pydantic.fields import FieldInfo

from daemon.actions import ActionSettingsUnion
from daemon.actions.base import MASK
from daemon.errors import InputError
from daemon.listing import literal_credentials
from daemon.userjson import json_value

PREFIX = "a."  # form names of action fields: a.url, a.headers, ...


def _models() -> dict[str, Any]:
    found = {}
    for model in get_args(get_args(ActionSettingsUnion)[0]):
        found[get_args(model.model_fields["type"].annotation)[0]] = model
    return found


MODELS = _models()


@dataclass(frozen=True)
class FieldSpec:
    name: str  # as written in a rule file (the alias when there is one)
    kind: Literal["text", "number", "choice", "bool", "json"]
    required: bool
    options: tuple[str, ...] = ()
    default: str = ""  # the default, as a hint
    credential: bool = False  # a value that should be a secret reference

    @property
    def input(self) -> str:
        return PREFIX + self.name


def _unwrap(annotation: Any) -> Any:
    """X | None -> X; Annotated[X, ...] -> X."""
    while True:
        origin = get_origin(annotation)
        if origin is typing.Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _kind(annotation: Any) -> tuple[str, tuple[str, ...]]:
    inner = _unwrap(annotation)
    origin = get_origin(inner)
    if origin is Literal:
        return "choice", tuple(str(a) for a in get_args(inner))
    if inner is bool:
        return "bool", ()
    if inner is int:
        return "number", ()
    if origin in (dict, list) or inner in (dict, list) or inner is Any:
        return "json", ()
    return "text", ()


def _default(info: FieldInfo) -> str:
    if info.is_required() or info.default is None:
        return ""
    value = info.default
    source = getattr(value, "source", None)
    if isinstance(source, str):
        return source
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str | int | float):
        return str(value)
    return ""


def field_specs(action_type: str) -> list[FieldSpec]:
    """The fields of one action type, required ones first (InputError for an unknown type)."""
    model = MODELS.get(action_type)
    if model is None:
        raise InputError("unknown action type", "action")
    specs = []
    for name, info in model.model_fields.items():
        if name == "type":
            continue
        kind, options = _kind(info.annotation)
        written = info.alias or name
        credential = bool(literal_credentials({written: "x"}))
        specs.append(
            FieldSpec(written, kind, info.is_required(), options, _default(info), credential)  # type: ignore[arg-type]
        )
    return sorted(specs, key=lambda s: not s.required)


def prefill(specs: list[FieldSpec], settings: Mapping[str, Any]) -> dict[str, str]:
    """Form values of a postback's (masked) action settings."""
    values = {}
    for spec in specs:
        if spec.name not in settings:
            continue
        value = settings[spec.name]
        if spec.kind == "json":
            values[spec.input] = json.dumps(value, indent=2, ensure_ascii=False)
        elif spec.kind == "bool":
            values[spec.input] = "yes" if value else "no"
        else:
            values[spec.input] = "" if value is None else str(value)
    return values


def settings_from_form(action_type: str, values: Mapping[str, str]) -> dict[str, Any]:
    """The `action` mapping of the form's values (empty fields are left out, so defaults hold).
    InputError names the field of a value that cannot be read, or one still masked."""
    action: dict[str, Any] = {"type": action_type}
    for spec in field_specs(action_type):
        text = values.get(spec.input, "").strip()
        if not text:
            continue
        if MASK in text:
            raise InputError(
                "a hidden value (****) must be typed again, or referred to as "
                "${affiliate_secret:NAME}",
                f"action.{spec.name}",
            )
        action[spec.name] = _value(spec, text)
    return action


def _value(spec: FieldSpec, text: str) -> Any:
    where = f"action.{spec.name}"
    if spec.kind == "json":
        return json_input(text, where)
    if spec.kind == "bool":
        if text not in ("yes", "no"):
            raise InputError("must be yes or no", where)
        return text == "yes"
    if spec.kind == "number":
        if not (text.lstrip("-").isdigit() and len(text) < 19):
            raise InputError("must be a whole number", where)
        return int(text)
    if spec.kind == "choice" and text not in spec.options:
        raise InputError(f"must be one of {', '.join(spec.options)}", where)
    return text


def json_input(text: str, where: str) -> Any:
    """JSON typed into a form field (daemon.userjson's rules), or InputError naming `where`."""
    try:
        return json_value(text)
    except json.JSONDecodeError as err:
        raise InputError(f"not JSON ({err.msg}, line {err.lineno})", where) from err
    except ValueError as err:  # nested too deep, an integer past the digit limit
        raise InputError(f"not usable JSON ({err})", where) from err
