"""The JsonLogic conditions of postback rules (SPEC 7.3): checked at load, run within a budget.

Evaluation runs on datalogic-py (a Rust engine), restricted to the operators of jsonlogic.com.
Everything that could hurt the process is checked here in Python *before* the engine sees a
value, because the engine recurses natively: logic and data are walked iteratively for depth and
JSON types. Each evaluation is bounded by an operation budget (the engine counts nodes and
iterated items), so CPU per condition is bounded whatever the rule and the data.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from math import isfinite
from types import MappingProxyType
from typing import Any, Final, final

import datalogic_py as dl
from ruamel.yaml.scalarbool import ScalarBoolean

from daemon.errors import ConditionError, ConditionEvalError
from daemon.log import get_logger

MAX_DEPTH: Final = 64  # containers (objects and arrays) nested in a condition
MAX_DATA_DEPTH: Final = 64  # containers nested in the data a condition reads
# Thousands of times what a typical rule charges (2 to a few dozen operations; `in` over a list
# of 1,000 ids: about 1,000) and a few milliseconds of CPU at most: fatal only to runaway loops.
OPS_BUDGET: Final = 100_000

# The operators of jsonlogic.com and the argument counts they accept: (min, max or None).
# Comparisons take exactly two arguments because chaining means different things in different
# implementations (json-logic-js ignores a third one); `<` and `<=` take three for "between".
OPERATORS: Final[Mapping[str, tuple[int, int | None]]] = MappingProxyType(
    {
        "var": (0, 2),
        "missing": (0, None),
        "missing_some": (2, 2),
        "if": (0, None),
        "?:": (0, None),
        "==": (2, 2),
        "===": (2, 2),
        "!=": (2, 2),
        "!==": (2, 2),
        ">": (2, 2),
        ">=": (2, 2),
        "<": (2, 3),
        "<=": (2, 3),
        "!": (1, 1),
        "!!": (1, 1),
        "and": (1, None),
        "or": (1, None),
        "+": (0, None),
        "*": (0, None),
        "-": (1, None),
        "/": (1, None),
        "%": (2, None),
        "max": (1, None),
        "min": (1, None),
        "cat": (0, None),
        "substr": (2, 3),
        "in": (2, 2),
        "merge": (0, None),
        "map": (2, 2),
        "filter": (2, 2),
        "reduce": (2, 3),
        "all": (2, 2),
        "some": (2, 2),
        "none": (2, 2),
    }
)

# The JsonLogic core only (families=[]): no date, string or tensor extensions. No custom
# operators are registered, so no name can shadow a built-in.
_ENGINE: Final = dl.Engine(families=[], config={"ops_budget": OPS_BUDGET})
_INT_RANGE: Final = range(-(2**63), 2**64)  # what the engine accepts (it refuses larger ones)
_log = get_logger(__name__)


def is_truthy(value: Any) -> bool:
    """JsonLogic truthiness as the engine applies it: false, null, 0, "", [] and {} are false."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str | list | dict):
        return len(value) > 0
    if isinstance(value, int | float):
        return value != 0 and not math.isnan(value)
    return True


@final
class Prepared:
    """Data checked and converted once, ready for every condition of one conversion."""

    __slots__ = ("_handle",)

    def __init__(self, handle: dl.DataHandle) -> None:
        self._handle = handle

    @property
    def handle(self) -> dl.DataHandle:
        """The engine's data, for Condition.evaluate."""
        return self._handle


def prepare_data(data: Any) -> Prepared:
    """Check `data` (JSON types, depth) and convert it once for the engine.

    Object members that are null are left out, so `missing` reports null fields as missing (as
    jsonlogic.com does) and `var` still reads them as null. Raises ConditionEvalError
    (`error_type` "DataNotJSON" or "DataTooDeep") for data the engine must not see.
    """
    plain = data if _copied_as_is(data) else _plain_data(data)
    try:
        # A str handed to the engine is JSON text, so a string datum goes in encoded.
        handle = dl.DataHandle(json.dumps(plain) if isinstance(plain, str) else plain)
    except dl.DataLogicError as err:
        raise ConditionEvalError("DataNotJSON") from err
    return Prepared(handle)


@final
class Condition:
    """A compiled `when`: call it for the JsonLogic result, or `truthy` for rule matching."""

    __slots__ = ("_key", "_rule", "evaluate", "logic", "text_test")

    def __init__(self, logic: Any, rule: dl.Rule | None) -> None:
        self.logic = logic  # the checked logic in plain JSON types
        self._rule = rule  # None for a literal
        # The engine's evaluation of prepared data (Prepared.handle), called directly by
        # matching, once per candidate postback; None for a literal. It raises what the engine
        # raises: `truthy` is the call that turns a failure into False and its log line.
        self.evaluate: Callable[[dl.DataHandle], Any] | None = (
            None if rule is None else rule.evaluate_data
        )
        # For a comparison of one field with a string (_text_test), what the engine decides
        # when that field is a string, without the engine; None for any other condition.
        self.text_test: TextTest | None = None if rule is None else _text_test(logic)
        # Canonical text: equality must tell `true` from `1`, which == on Python values does not.
        self._key = json.dumps(logic, sort_keys=True, separators=(",", ":"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Condition) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __copy__(self) -> Condition:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> Condition:
        return self

    def __reduce__(self) -> tuple[Callable[[Any], Condition], tuple[Any]]:
        return (compile_condition, (self.logic,))  # the engine's rule cannot be pickled

    def __call__(self, data: Any) -> Any:
        """The result for `data` (raw JSON value or Prepared). Raises ConditionEvalError."""
        if self._rule is None:
            return self.logic
        prepared = data if isinstance(data, Prepared) else prepare_data(data)
        try:
            return self._rule.evaluate_data(prepared._handle)
        except dl.DataLogicError as err:
            raise ConditionEvalError(err.error_type, err.operator) from err

    def truthy(self, data: Any) -> bool:
        """Whether the condition holds for `data`; any failure means False. Never raises."""
        try:
            rule = self._rule
            if rule is not None and type(data) is Prepared:  # matching's case: __call__ inlined
                try:
                    result = rule.evaluate_data(data._handle)
                except dl.DataLogicError as err:
                    raise ConditionEvalError(err.error_type, err.operator) from err
            else:
                result = self(data)
            if type(result) is bool:
                return result
            return is_truthy(result)
        except ConditionEvalError as err:
            _log.warning("condition_error", error_type=err.error_type, operator=err.operator)
        except Exception as err:  # the contract is "never raises": a bug must not stop matching
            _log.error("condition_error", error_type=type(err).__name__, operator=None)
        return False

    def __repr__(self) -> str:
        return f"Condition({self._key})"


# A condition's verdict on an object of members that are not null (rule data's `present`):
# True or False, or None when the engine must decide.
TextTest = Callable[[Mapping[str, Any]], bool | None]
_TEXT_COMPARISONS: Final = {"==": False, "===": False, "!=": True, "!==": True}  # negated?
_FIELD_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _field_of(operand: Any) -> str | None:
    """The field `{"var": "name"}` (or `{"var": ["name"]}`) reads, for a plain name (no dots,
    no index, no default); None for any other operand."""
    if type(operand) is not dict or len(operand) != 1 or "var" not in operand:
        return None
    name = operand["var"]
    if type(name) is list and len(name) == 1:
        name = name[0]
    if type(name) is str and _FIELD_NAME.fullmatch(name):
        return name
    return None


def _text_test(logic: Any) -> TextTest | None:
    """For `{"==": [{"var": "sub1"}, "x"]}` (also `===`, `!=`, `!==`, either order: the most
    common condition of postback rules), a test that decides it in Python when the field is a
    string: JsonLogic compares two strings exactly, whatever they look like (`"1"` is not
    `"1.0"`), with every one of these operators. Any other value (missing, a number, an
    object) is left to the engine, whose loose equality converts (`null == ""` holds there).
    tests/test_conditions_text.py checks it against the engine."""
    if type(logic) is not dict or len(logic) != 1:
        return None
    ((op, args),) = logic.items()
    negated = _TEXT_COMPARISONS.get(op)
    if negated is None or type(args) is not list or len(args) != 2:
        return None
    name, text = _field_of(args[0]), args[1]
    if name is None:
        name, text = _field_of(args[1]), args[0]
    if name is None or type(text) is not str:
        return None

    def test(members: Mapping[str, Any]) -> bool | None:
        value = members.get(name)
        if type(value) is not str:
            return None
        return (value == text) is not negated

    return test


# Compiled conditions by canonical text: a condition is immutable, so one text is compiled once
# and its object shared (a big rule set repeats the same few conditions many times).
_COMPILED: dict[str, Condition] = {}
_COMPILED_MAX = 1 << 16


def compile_condition(logic: Any) -> Condition:
    """Check and compile `logic`; raise ConditionError naming the problem and where it lies."""
    plain = _plain_logic(logic)
    key = json.dumps(plain, sort_keys=True, separators=(",", ":"))
    found = _COMPILED.get(key)
    if found is not None:
        return found
    condition = _compile_plain(plain)
    if len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.clear()
    _COMPILED[key] = condition
    return condition


def _compile_plain(plain: Any) -> Condition:
    if not isinstance(plain, dict | list):
        return Condition(plain, None)  # a scalar is a literal: JsonLogic passes it through
    try:
        rule = _ENGINE.compile_checked(plain)
    except dl.CompileError as err:  # defence in depth: our own walk catches these first
        first = err.diagnostics[0]
        where = f" (at {first['pointer']})" if first["pointer"] else ""
        raise ConditionError(f"{first['message']}{where}") from err
    except dl.DataLogicError as err:
        raise ConditionError(f"the engine refused the condition: {err}") from err
    return Condition(plain, rule)


# Where a value lies in the logic: None for the root, else (path of the parent, key or index).
# Kept as a linked tuple so the walk allocates no string; rendered only for an error message.
_Path = tuple[Any, str | int] | None


def _at(path: _Path) -> str:
    """` (at /and/1)`: the RFC 6901 pointer of `path`, or nothing for the root."""
    parts: list[str] = []
    while path is not None:
        path, key = path
        parts.append(str(key).replace("~", "~0").replace("/", "~1"))
    return f" (at /{'/'.join(reversed(parts))})" if parts else ""


def _arity(low: int, high: int | None) -> str:
    noun = "argument" if (high if high is not None else low) == 1 else "arguments"
    if high is None:
        return f"at least {low} {noun}"
    if low == high:
        return f"exactly {low} {noun}"
    return f"{low} to {high} {noun}"


def _check_operator(op: str, args: Any, path: _Path) -> None:
    bounds = OPERATORS.get(op)
    if bounds is None:
        raise ConditionError(f"unknown operator {json.dumps(op)}{_at(path)}")
    count = len(args) if isinstance(args, list) else 1
    low, high = bounds
    if count < low or (high is not None and count > high):
        raise ConditionError(f"{json.dumps(op)} takes {_arity(low, high)}, not {count}{_at(path)}")


def _plain_scalar(value: Any, path: _Path) -> Any:
    """`value` as a plain JSON scalar (YAML loaders hand over subclasses); raise if not JSON."""
    kind = type(value)
    if value is None or kind is bool:
        return value
    if isinstance(value, ScalarBoolean):  # ruamel's anchored booleans are ints underneath
        return bool(value)
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ConditionError(f"string with a lone surrogate{_at(path)}") from err
        return value if kind is str else str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        # int() first: `in range(...)` is O(1) only for exact ints, linear for subclasses
        # (YAML loaders hand over int subclasses).
        number = int(value)
        if number not in _INT_RANGE:
            raise ConditionError(f"number out of range{_at(path)}")
        return number
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConditionError(f"not a finite number: {value}{_at(path)}")
        return value if kind is float else float(value)
    raise ConditionError(f"not a JSON value: {kind.__name__}{_at(path)}")


def _plain_logic(logic: Any) -> Any:
    """Walk `logic` iteratively (never recursively: it may be nested 100,000 deep), checking
    depth, JSON types, operators and argument counts; return a copy in plain JSON types."""
    root: list[Any] = [None]
    # (value, container to store it into, key in that container, nesting level, path)
    stack: list[tuple[Any, Any, Any, int, _Path]] = [(logic, root, 0, 1, None)]
    while stack:
        value, parent, key, level, path = stack.pop()
        if not isinstance(value, _CONTAINERS):
            parent[key] = _plain_scalar(value, path)
            continue
        if level > MAX_DEPTH:
            raise ConditionError(f"nesting deeper than {MAX_DEPTH} levels{_at(path)}")
        if isinstance(value, list):
            items: list[Any] = [None] * len(value)
            parent[key] = items
            for index in range(len(value) - 1, -1, -1):  # reversed: report the first problem
                stack.append((value[index], items, index, level + 1, (path, index)))
            continue
        if len(value) > 1:
            raise ConditionError(
                f"an object with {len(value)} keys is not an operator call: write one operator "
                f"per object{_at(path)}"
            )
        members: dict[str, Any] = {}
        parent[key] = members
        for op, args in value.items():
            if not isinstance(op, str):
                raise ConditionError(f"object key is not a string: {op!r}{_at(path)}")
            op = _plain_scalar(op, path)
            _check_operator(op, args, path)
            stack.append((args, members, op, level + 1, (path, op)))
    return root[0]


_SIMPLE: Final = frozenset({str, int, bool, type(None)})
_STR: Final = frozenset({str})
_FLAT: Final = frozenset({str, int, bool})
_SHALLOW: Final = frozenset({str, int, bool, float, dict})
_CONTAINERS: Final = (dict, list)  # (not `dict | list`: that builds a union at each test)


def _copied_as_is(data: Any) -> bool:
    """Whether _plain_data would return a copy equal to `data` in every member and type, so the
    engine may take `data` itself: an object with string keys and no null member whose values
    are strings, ints, bools, finite floats, or objects of strings by string keys (rule data as
    matching prepares it, daemon.models.RuleData.present). Decided in C but for the floats and
    objects, without the walk."""
    if type(data) is not dict or not _STR.issuperset(map(type, data)):
        return False
    kinds = set(map(type, data.values()))
    if kinds <= _FLAT:
        return True
    if not kinds <= _SHALLOW:
        return False
    for value in data.values():
        kind = type(value)
        if kind is float:
            if not isfinite(value):
                return False
        elif kind is dict and not (
            _STR.issuperset(map(type, value)) and _STR.issuperset(map(type, value.values()))
        ):
            return False
    return True


def prepare_plain(members: Mapping[str, Any]) -> Prepared:
    """prepare_data for members known to be what the engine takes as they are (rule data's
    `present` when RuleData.plain): converted without the walk and its checks."""
    try:
        return Prepared(dl.DataHandle(members))
    except dl.DataLogicError as err:  # (not expected: RuleData.plain said it takes them)
        raise ConditionEvalError("DataNotJSON") from err


def _plain_data(data: Any) -> Any:
    """Walk `data` iteratively: check depth and JSON types, drop null object members. Scalars
    of the common types are copied as they are (the engine checks int range and Unicode)."""
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any, int]] = [(data, root, 0, 1)]
    while stack:
        value, parent, key, level = stack.pop()
        if not isinstance(value, _CONTAINERS):
            parent[key] = _data_scalar(value)
            continue
        if level > MAX_DATA_DEPTH:
            raise ConditionEvalError("DataTooDeep")
        if isinstance(value, dict):
            members = {name: item for name, item in value.items() if item is not None}
            parent[key] = members
            if not _STR.issuperset(map(type, members)):  # the key types, checked in C
                raise ConditionEvalError("DataNotJSON")
            stack += [
                (item, members, name, level + 1)
                for name, item in members.items()
                if type(item) not in _SIMPLE
            ]
        else:
            items = list(value)
            parent[key] = items
            stack += [
                (item, items, index, level + 1)
                for index, item in enumerate(items)
                if type(item) not in _SIMPLE
            ]
    return root[0]


def _data_scalar(value: Any) -> Any:
    try:
        return _plain_scalar(value, None)
    except ConditionError as err:
        raise ConditionEvalError("DataNotJSON") from err


__all__ = [
    "MAX_DATA_DEPTH",
    "MAX_DEPTH",
    "OPERATORS",
    "OPS_BUDGET",
    "Condition",
    "Prepared",
    "compile_condition",
    "is_truthy",
    "prepare_data",
    "prepare_plain",
]
