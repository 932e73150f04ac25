"""Reads one YAML file (rules, sources, settings) with YAML 1.2 semantics and line numbers.

We compose with ruamel.yaml and build plain Python values ourselves, so that we decide what is an
error rather than inheriting a constructor's choices: duplicate keys, merge keys, custom tags and
alias expansion past a bound are refused, every mapping and sequence remembers the line of each
entry (for ``file:line`` messages), and numbers keep the text they were written as (``1.10``
stays ``1.10`` when it is used as an id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.resolver import VersionedResolver

MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 100_000  # after alias expansion; a real rule file has a few thousand
MAX_DEPTH = 100

_CORE = "tag:yaml.org,2002:"


class _Yaml12Resolver(VersionedResolver):
    """YAML 1.2 tag resolution, always: `no` is a string, `1.10` a float spelled `1.10`.
    (Fixed rather than looked up per scalar: ruamel's lookup raises and catches an
    AttributeError for every scalar under the C parser, a third of the load time.)"""

    @property
    def processing_version(self) -> Any:
        return (1, 2)


class YamlError(ValueError):
    """A file that is not acceptable YAML; `line` is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(f"line {line}: {message}")


class YMap(dict[Any, Any]):
    """A mapping that knows its own line and the line of each key."""

    line: int = 0
    lines: dict[Any, int]


class YList(list[Any]):
    """A sequence that knows its own line and the line of each item."""

    line: int = 0
    lines: list[int]


class RawInt(int):
    raw: str


class RawFloat(float):
    raw: str


def raw_text(value: Any) -> str:
    """The text a scalar was written as (numbers keep their spelling)."""
    if isinstance(value, RawInt | RawFloat):
        return value.raw
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_yaml(text: str | bytes) -> Any:
    """Parse one YAML document into plain values; raise YamlError for anything we refuse."""
    if isinstance(text, bytes):
        if len(text) > MAX_FILE_BYTES:
            raise YamlError(1, f"file is larger than {MAX_FILE_BYTES // 1024} KiB")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise YamlError(1, "file is not valid UTF-8") from err
    elif len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise YamlError(1, f"file is larger than {MAX_FILE_BYTES // 1024} KiB")
    yaml = YAML(typ="safe", pure=False)  # libyaml's C parser (ruamel.yaml.clib)
    yaml.Resolver = _Yaml12Resolver
    try:
        node = yaml.compose(text)
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise YamlError(line, _describe(err)) from err
    except YAMLError as err:
        raise YamlError(1, str(err).splitlines()[0] if str(err) else "invalid YAML") from err
    except RecursionError as err:
        raise YamlError(1, "nesting is too deep") from err
    if node is None:
        return None
    return _Builder().build(node, 0)


def _describe(err: MarkedYAMLError) -> str:
    parts = [p for p in (err.context, err.problem) if p]
    return "; ".join(parts) if parts else "invalid YAML"


def line_of(root: Any, path: Sequence[Any]) -> int:
    """The line of the deepest node along `path` (keys and indexes) that exists."""
    node, line = root, getattr(root, "line", 1) or 1
    for step in path:
        if isinstance(node, YMap):
            key = _find_key(node, step)
            if key is _MISSING:
                continue  # e.g. a pydantic union tag in the path: skip it, keep descending
            line, node = node.lines.get(key, line), node[key]
        elif isinstance(node, YList) and isinstance(step, int) and 0 <= step < len(node):
            line, node = node.lines[step], node[step]
        else:
            continue
    return line


_MISSING = object()


def _find_key(node: YMap, step: Any) -> Any:
    if step in node:
        return step
    for key in node:
        if str(key) == str(step):
            return key
    return _MISSING


class _Builder:
    def __init__(self) -> None:
        self.count = 0

    def build(self, node: Node, depth: int) -> Any:
        self.count += 1
        line = node.start_mark.line + 1
        if self.count > MAX_NODES:
            raise YamlError(line, f"document expands to more than {MAX_NODES} nodes (alias bomb?)")
        if depth > MAX_DEPTH:
            raise YamlError(line, f"nesting deeper than {MAX_DEPTH} levels")
        if isinstance(node, ScalarNode):
            return _scalar(node, line)
        if node.tag not in (f"{_CORE}map", f"{_CORE}seq", f"{_CORE}omap", f"{_CORE}set"):
            raise YamlError(line, f"tag {node.tag!r} is not allowed")
        if isinstance(node, SequenceNode):
            seq = YList()
            seq.line, seq.lines = line, []
            for item in node.value:
                seq.append(self.build(item, depth + 1))
                seq.lines.append(item.start_mark.line + 1)
            return seq
        if isinstance(node, MappingNode):
            return self._mapping(node, line, depth)
        raise YamlError(line, "unsupported YAML node")

    def _mapping(self, node: MappingNode, line: int, depth: int) -> YMap:
        out = YMap()
        out.line, out.lines = line, {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == f"{_CORE}merge":
                raise YamlError(key_line, "merge keys (<<) are not supported")
            if not isinstance(key_node, ScalarNode):
                raise YamlError(key_line, "mapping keys must be plain scalars")
            key = _scalar(key_node, key_line)
            if isinstance(key, RawInt | RawFloat):
                key = key.raw
            if key in out:
                raise YamlError(key_line, f"duplicate key {key!r}")
            out[key] = self.build(value_node, depth + 1)
            out.lines[key] = key_line
        return out


def _scalar(node: ScalarNode, line: int) -> Any:
    tag, text = node.tag, node.value
    if tag in (f"{_CORE}str", f"{_CORE}timestamp", f"{_CORE}binary"):
        return text  # timestamps stay text; the models parse what they expect
    if tag == f"{_CORE}null":
        return None
    if tag == f"{_CORE}bool":
        return text.lower() == "true"
    if tag == f"{_CORE}int":
        try:
            value = RawInt(int(text.replace("_", ""), 0))
        except ValueError:
            value = RawInt(int(text.replace("_", "").lstrip("0") or "0"))
        value.raw = text
        return value
    if tag == f"{_CORE}float":
        number = RawFloat(
            text.replace("_", "").lower().replace(".inf", "inf").replace(".nan", "nan")
        )
        number.raw = text
        return number
    raise YamlError(line, f"tag {tag!r} is not allowed")
