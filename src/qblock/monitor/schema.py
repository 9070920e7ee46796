"""QAPI types as data: validation of command arguments with QEMU's messages, and SchemaInfo.

qapi/qobject-input-visitor.c gives the messages: "Parameter 'X' is missing", "Parameter 'X' is
unexpected", "Invalid parameter type for 'X', expected: T", "Parameter 'X' does not accept value
'V'".  Nested names are dotted ("cache.direct").  A type here is declared once and serves both
validation and ``query-qmp-schema``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from qblock.errors import InvalidArgument


class QapiType:
    """Base of every QAPI type; ``visit`` checks a JSON value and returns it (maybe converted)."""

    name: str = ""
    json_type: str = ""  # the word after "expected:" in type errors

    def visit(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def type_error(self, path: str) -> InvalidArgument:
        return InvalidArgument(f"Invalid parameter type for '{path}', expected: {self.json_type}")

    def schema_info(self) -> dict[str, Any]:
        """The SchemaInfo of this type (qapi/introspect.json)."""
        return {"name": self.name, "meta-type": "builtin", "json-type": self.json_type}


class _Builtin(QapiType):
    def __init__(self, name: str, json_type: str, pytypes: tuple[type, ...],
                 lo: int | None = None, hi: int | None = None) -> None:
        self.name, self.json_type, self.pytypes, self.lo, self.hi = name, json_type, pytypes, lo, hi

    def visit(self, value: Any, path: str) -> Any:
        if isinstance(value, bool) and bool not in self.pytypes:
            raise self.type_error(path)
        if not isinstance(value, self.pytypes):
            raise self.type_error(path)
        if self.lo is not None and isinstance(value, int) and not self.lo <= value <= self.hi:
            raise InvalidArgument(f"Parameter '{path}' expects {self.name}")
        return value


STR = _Builtin("str", "string", (str,))
BOOL = _Builtin("bool", "boolean", (bool,))
INT = _Builtin("int", "integer", (int,), -(1 << 63), (1 << 63) - 1)
UINT32 = _Builtin("uint32", "integer", (int,), 0, (1 << 32) - 1)
UINT64 = _Builtin("uint64", "integer", (int,), 0, (1 << 64) - 1)
SIZE = _Builtin("size", "integer", (int,), 0, (1 << 64) - 1)
NUMBER = _Builtin("number", "number", (int, float))
NULL = _Builtin("null", "null", (type(None),))


class _Any(QapiType):
    name, json_type = "any", "value"

    def visit(self, value: Any, path: str) -> Any:
        return value


ANY = _Any()


class Enum(QapiType):
    json_type = "string"

    def __init__(self, name: str, values: list[str]) -> None:
        self.name, self.values = name, values

    def visit(self, value: Any, path: str) -> Any:
        if not isinstance(value, str):
            raise self.type_error(path)
        if value not in self.values:
            raise InvalidArgument(f"Parameter '{path}' does not accept value '{value}'")
        return value

    def schema_info(self) -> dict[str, Any]:
        return {"name": self.name, "meta-type": "enum", "values": list(self.values),
                "members": [{"name": v} for v in self.values]}


class ListOf(QapiType):
    json_type = "array"

    def __init__(self, element: QapiType) -> None:
        self.element = element
        self.name = f"[{element.name}]"

    def visit(self, value: Any, path: str) -> Any:
        if not isinstance(value, list):
            raise self.type_error(path)
        return [self.element.visit(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def schema_info(self) -> dict[str, Any]:
        return {"name": self.name, "meta-type": "array", "element-type": self.element.name}


@dataclasses.dataclass
class Member:
    """A struct member; ``optional`` is QAPI's ``*name``."""

    type: QapiType
    optional: bool = False


def opt(t: QapiType) -> Member:
    return Member(t, optional=True)


def req(t: QapiType) -> Member:
    return Member(t)


class Struct(QapiType):
    """A QAPI struct: every required member present, no unknown member."""

    json_type = "object"

    def __init__(self, name: str, members: dict[str, Member | QapiType], *,
                 open_ended: bool = False) -> None:
        self.name = name
        self.members = {k: v if isinstance(v, Member) else Member(v) for k, v in members.items()}
        self.open_ended = open_ended  # e.g. boxed BlockdevOptions: checked further by the opener

    def visit(self, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise self.type_error(path or "null")
        prefix = f"{path}." if path else ""
        out = {}
        for key, member in self.members.items():
            if key in value:
                out[key] = member.type.visit(value[key], prefix + key)
            elif not member.optional:
                raise InvalidArgument(f"Parameter '{prefix}{key}' is missing")
        for key in value:
            if key not in self.members:
                if not self.open_ended:
                    raise InvalidArgument(f"Parameter '{prefix}{key}' is unexpected")
                out[key] = value[key]
        return out

    def schema_info(self) -> dict[str, Any]:
        members = []
        for key, m in self.members.items():
            entry: dict[str, Any] = {"name": key, "type": m.type.name}
            if m.optional:
                entry["default"] = None
            members.append(entry)
        return {"name": self.name, "meta-type": "object", "members": members}


class Alternate(QapiType):
    """A QAPI alternate: the first branch whose JSON type matches (BlockdevRef: str | object)."""

    def __init__(self, name: str, branches: list[QapiType]) -> None:
        self.name, self.branches = name, branches
        self.json_type = self.name

    def visit(self, value: Any, path: str) -> Any:
        for branch in self.branches:
            if _json_type_of(value) == branch.json_type:
                return branch.visit(value, path)
        raise InvalidArgument(f"Invalid parameter type for '{path}', expected: {self.name}")

    def schema_info(self) -> dict[str, Any]:
        return {"name": self.name, "meta-type": "alternate",
                "members": [{"type": b.name} for b in self.branches]}


def _json_type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


EMPTY = Struct("q_empty", {})
