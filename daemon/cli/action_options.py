"""Every action addable without YAML (issue 18): `rules add --action TYPE` takes one option per
setting of the action's settings model (generated from the models, so `--help` lists each
type's fields), and `rules add --template TYPE` prints an annotated skeleton of that type."""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from daemon.actions import ActionSettingsUnion
from daemon.userjson import json_value

# Options `rules add` already has, that serve every type (--url, --method) or mean something
# else there (--from, --file...): a setting of that name is --action-NAME instead.
TAKEN = frozenset(
    {"offer", "trigger", "affiliate", "goal", "when", "status", "action", "method", "url",
     "header", "set", "from", "file", "comment", "author", "author-affiliate", "dry-run",
     "rules", "config", "template", "help"}
)  # fmt: skip
EXPLICIT = frozenset({"url", "method"})  # set through the existing options of `rules add`


def models() -> dict[str, type[BaseModel]]:
    """Action type -> its settings model."""
    union = typing.get_args(ActionSettingsUnion)[0]
    found: dict[str, type[BaseModel]] = {}
    for model in typing.get_args(union):
        tag = typing.get_args(model.model_fields["type"].annotation)[0]
        found[str(tag)] = model
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class Setting:
    key: str  # as written in the rule (the alias)
    option: str  # --option-name
    dest: str  # the click parameter name
    field: FieldInfo

    @property
    def required(self) -> bool:
        return self.field.is_required()

    @property
    def many(self) -> bool:
        return typing.get_origin(_bare(self.field.annotation)) is list


def _bare(annotation: Any) -> Any:
    """The annotation without Optional and Annotated wrappers."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def settings_of(model: type[BaseModel]) -> Iterator[Setting]:
    for name, field in model.model_fields.items():
        if name == "type":
            continue
        key = field.alias or name
        dash = key.replace("_", "-")
        option = f"--action-{dash}" if dash in TAKEN else f"--{dash}"
        yield Setting(key, option, "act_" + key.replace("-", "_"), field)


def all_settings() -> dict[str, Setting]:
    """Every setting of every type, by option (types share a setting of the same name)."""
    found: dict[str, Setting] = {}
    for model in models().values():
        for setting in settings_of(model):
            if setting.key not in EXPLICIT:
                found.setdefault(setting.option, setting)
    return found


def describe(field: FieldInfo) -> str:
    """A short, readable type of a setting: text, number, true|false, GET|POST, list, map."""
    bare = _bare(field.annotation)
    origin = typing.get_origin(bare)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(bare))
    if origin is list:
        return "list"
    if origin is dict:
        return "map"
    if bare is bool:
        return "true|false"
    if bare in (int, float):
        return "number"
    name = getattr(bare, "__name__", str(bare))
    if "Template" in name or bare is str:
        return "text"
    return "value"


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value is PydanticUndefined or value is None:
        return "optional"
    value = getattr(value, "source", value)  # a template: as written
    if isinstance(value, str):
        return f"default {value}"
    return f"default {json.dumps(value, default=str)}"


def epilog() -> str:
    lines = ["\b", "Settings of each action type (--action TYPE; JSON for lists and maps):"]
    for kind, model in models().items():
        fields = [
            f"{s.option}{'*' if s.required else ''}"
            for s in settings_of(model)
            if s.key not in EXPLICIT
        ]
        head = f"  {kind}:" + (" --url*" if "url" in model.model_fields else "")
        lines.append(head + " " + " ".join(fields))
    lines.append("  (* required; --template TYPE prints a commented skeleton)")
    return "\n".join(_wrap_lines(lines))


def _wrap_lines(lines: list[str]) -> Iterator[str]:
    for line in lines:
        while len(line) > 96:
            cut = line.rfind(" ", 0, 96)
            yield line[:cut]
            line = "      " + line[cut + 1 :]
        yield line


def options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate `rules add` with one option per setting (of any type)."""
    for setting in reversed(list(all_settings().values())):
        help_text = f"{describe(setting.field)} ({', '.join(_types_with(setting.key))})"
        command = click.option(
            setting.option,
            setting.dest,
            multiple=setting.many,
            metavar="VALUE",
            help=help_text,
        )(command)
    return command


def _types_with(key: str) -> list[str]:
    found = [
        kind for kind, model in models().items() if any(s.key == key for s in settings_of(model))
    ]
    return found if len(found) <= 3 else [*found[:3], f"+{len(found) - 3}"]


def chosen(opts: dict[str, Any], kind: str) -> list[tuple[str, Any]]:
    """(key, value) of every setting option given, checked against the type's model."""
    model = models().get(kind)
    order = [s.key for s in settings_of(model)] if model else []
    given = []
    # In the model's order, so the new rule reads like the documentation of its type.
    for setting in sorted(
        all_settings().values(),
        key=lambda s: order.index(s.key) if s.key in order else len(order),
    ):
        raw = opts.get(setting.dest)
        if raw is None or raw == ():
            continue
        if setting.key not in order:
            raise click.UsageError(
                f"{setting.option}: action {kind} has no setting {setting.key!r}"
            )
        value = [_value(v) for v in raw] if setting.many else _value(raw)
        if setting.many and len(value) == 1 and isinstance(value[0], list):
            value = value[0]
        given.append((setting.key, value))
    return given


def _value(text: str) -> Any:
    """JSON when it parses as JSON (5, true, {...}, [...]), else the text."""
    if re.fullmatch(r"\s*[\[{\d\-tfn\"].*", text, re.DOTALL):
        try:
            return json_value(text)
        except json.JSONDecodeError:
            pass  # not JSON: text
        except ValueError as err:  # JSON, but NaN or nested too deeply
            raise click.BadParameter(str(err)) from err
    return text


def template(kind: str) -> str:
    """An annotated skeleton of a postback with this action type, to fill in."""
    model = models()[kind]
    lines = [
        f"# A postback with a {kind} action: fill in, then `postbackd rules add --offer ID",
        "# --from FILE` (id, created_at and author are filled in).",
        "trigger: conversion_done        # conversion_pending|conversion_done|conversion_reject",
        'affiliate: "*"                  # one affiliate id, or "*" for all',
        "# goal: sale                    # only for this goal (when the offer has goals on)",
        '# when: {">=": [{"var": "payout"}, 5]}   # a JsonLogic condition',
        "status: active",
        "action:",
        f"  type: {kind}",
    ]
    for setting in settings_of(model):
        note = f"{describe(setting.field)}, {_default(setting.field)}"
        example = _example(setting)
        line = f"  {setting.key}: {example}"
        if not setting.required:
            line = "  # " + line[2:]
        lines.append(f"{line.ljust(40)}  # {note}")
    return "\n".join(lines) + "\n"


def _example(setting: Setting) -> str:
    kind = describe(setting.field)
    if kind == "list":
        return "[]"
    if kind == "map":
        return "{}"
    if kind == "true|false":
        default = setting.field.default
        return "true" if default is True else "false"
    if "|" in kind:
        default = setting.field.default
        return str(default) if isinstance(default, str) else kind.split("|")[0]
    if kind == "number":
        default = setting.field.default
        return str(default) if isinstance(default, int | float) else "0"
    secretish = re.search(r"token|secret|password|key|credential", setting.key)
    if secretish:
        return "${secret:NAME}"
    return '""'
