"""The rule file format of SPEC 7.1: an offer and its postbacks, as pydantic models."""

from __future__ import annotations

import copyreg
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    InstanceOf,
    PlainSerializer,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from daemon.actions import ActionSettingsUnion
from daemon.conditions import Condition, compile_condition
from daemon.durations import Duration
from daemon.models import Trigger
from daemon.yamlfile import raw_text

_ID_TEXT = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")
ANY_AFFILIATE = "*"


def _id(value: Any) -> str:
    """Ids may be written as numbers or strings; they compare as strings."""
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        raise ValueError("must be an id: a number or a string")
    text = raw_text(value).strip()
    if not _ID_TEXT.match(text):
        raise ValueError("must be an id of 1 to 128 printable characters")
    return text


Id = Annotated[str, BeforeValidator(_id)]


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\d[T ][\d:.]+", value.strip()):
        return value.strip() + "Z"  # a time without zone is UTC, as in the examples
    return value


def _condition(value: Any) -> Condition | None:
    """`when:` is compiled at load, so a bad condition fails the load, not a conversion."""
    if value is None or isinstance(value, Condition):
        return value
    if isinstance(value, str):  # a literal string is truthy: the postback would always fire
        raise ValueError(
            f"must be a JsonLogic rule, not the text {value[:60]!r}: write it as an object, "
            'e.g. {">": [{"var": "payout"}, 5]} (see docs/conditions.md)'
        )
    return compile_condition(value)


def _logic(value: Condition | None) -> Any:
    return None if value is None else value.logic


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Author(_Model):
    id: Id
    name: str = Field(min_length=1, max_length=200)
    affiliate: Id | None = None  # set for a user of that affiliate; absent for admins


class RetryOverride(_Model):
    max_attempts: StrictInt | None = Field(default=None, ge=1, le=100)
    max_age: Duration | None = None


class Postback(_Model):
    id: StrictInt = Field(gt=0)
    trigger: Trigger
    affiliate: Id
    goal: Id | None = None
    when: Annotated[
        InstanceOf[Condition] | None, BeforeValidator(_condition), PlainSerializer(_logic)
    ] = None
    status: Literal["active", "disabled"] = "active"
    created_at: Annotated[datetime | None, BeforeValidator(_aware)] = None
    author: Author | None = None
    retry: RetryOverride | None = None
    action: ActionSettingsUnion

    @model_validator(mode="after")
    def _own_affiliate_only(self) -> Postback:
        # Visibility follows data: the author's users see this postback's deliveries and the
        # requests it rendered, so it may only ever carry their own affiliate's conversions.
        owner = self.owner_affiliate
        if owner is not None and self.affiliate != owner:
            raise ValueError(
                f"affiliate: a postback authored for affiliate {owner} may only match affiliate "
                f"{owner}'s conversions, not {self.affiliate!r}"
            )
        return self

    @property
    def condition(self) -> Condition | None:
        return self.when

    @property
    def active(self) -> bool:
        return self.status == "active"

    @property
    def owner_affiliate(self) -> str | None:
        """The affiliate whose users may see this postback (None: admins only)."""
        return self.author.affiliate if self.author else None


class RuleFile(_Model):
    offer: Id
    goals_enabled: StrictBool = False
    postbacks: list[Postback] = Field(default_factory=list)

    @field_validator("postbacks", mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        return [] if value is None else value

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled compactly (the parsed-rules cache, daemon.rulecache): the file's postbacks
        as one flat tuple of their field values, instead of a state dict per model. pickle
        keeps every object it built until the end of a load, so each per-model temporary was
        a hole left in memory afterwards (about 20 MiB with 100,000 postbacks)."""
        models = [self, *self.postbacks]
        if any(m.__pydantic_extra__ is not None or m.__pydantic_private__ for m in models):
            # not a model of a rule file as the loader makes it: pickled as pydantic does
            return (_NEWOBJ, (type(self),), self.__getstate__())
        flat: list[Any] = []
        for postback in self.postbacks:
            fields = postback.__dict__
            flat.extend(fields[name] for name in _POSTBACK_FIELDS)
            flat.append(postback.__pydantic_fields_set__)
        mine = self.__dict__
        head = (mine["offer"], mine["goals_enabled"], self.__pydantic_fields_set__)
        return (_rule_file, (*head, tuple(flat)))


_POSTBACK_FIELDS = tuple(Postback.model_fields)
_NEWOBJ: Any = vars(copyreg)["__newobj__"]  # what object.__reduce_ex__ names (not in stubs)
_set = object.__setattr__


def _model(cls: type[_Model], fields: dict[str, Any], fields_set: set[str]) -> Any:
    """A model from values it was validated with before (what pydantic's own unpickling does)."""
    model = cls.__new__(cls)
    _set(model, "__dict__", fields)
    _set(model, "__pydantic_fields_set__", fields_set)
    _set(model, "__pydantic_extra__", None)
    _set(model, "__pydantic_private__", None)
    return model


def _rule_file(
    offer: str, goals_enabled: bool, fields_set: set[str], flat: tuple[Any, ...]
) -> RuleFile:
    """RuleFile.__reduce__ undone."""
    width = len(_POSTBACK_FIELDS)
    postbacks = [
        _model(
            Postback, dict(zip(_POSTBACK_FIELDS, flat[i : i + width], strict=True)), flat[i + width]
        )
        for i in range(0, len(flat), width + 1)
    ]
    fields = {"offer": offer, "goals_enabled": goals_enabled, "postbacks": postbacks}
    rule_file: RuleFile = _model(RuleFile, fields, fields_set)
    return rule_file
