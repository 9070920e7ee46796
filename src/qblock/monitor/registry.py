"""One command registry: each QMP command declared once, with its argument schema.

Dispatch validation, ``query-commands`` and ``query-qmp-schema`` all come from these
declarations (DESIGN.md: "One command registry").
"""
from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from qblock.monitor.schema import EMPTY, Member, QapiType, Struct

if TYPE_CHECKING:
    from qblock.monitor.context import CommandContext

Handler = Callable[["CommandContext", dict[str, Any]], Awaitable[Any]]


@dataclasses.dataclass
class Command:
    name: str
    args: Struct
    handler: Handler
    allow_oob: bool = False
    boxed: bool = False  # the arguments are one struct passed whole (blockdev-add)


COMMANDS: dict[str, Command] = {}


def command(name: str, args: dict[str, Member | QapiType] | Struct | None = None, *,
            allow_oob: bool = False, boxed: bool = False) -> Callable[[Handler], Handler]:
    """Declare a QMP command; the handler gets (context, validated arguments)."""
    if args is None:
        schema = EMPTY
    elif isinstance(args, Struct):
        schema = args
    else:
        schema = Struct(f"q_obj_{name}-arg", args)

    def register(handler: Handler) -> Handler:
        if name in COMMANDS:
            raise ValueError(f"QMP command {name} declared twice")
        COMMANDS[name] = Command(name, schema, handler, allow_oob, boxed)
        return handler

    return register


def lookup(name: str) -> Command | None:
    return COMMANDS.get(name)


def schema_infos() -> list[dict[str, Any]]:
    """SchemaInfo entries for ``query-qmp-schema``: commands and the types they use."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add_type(t: QapiType) -> None:
        if t.name in seen:
            return
        seen.add(t.name)
        out.append(t.schema_info())
        for child in _children(t):
            add_type(child)

    for cmd in COMMANDS.values():
        out.append({"name": cmd.name, "meta-type": "command", "arg-type": cmd.args.name,
                    "ret-type": "any", "allow-oob": cmd.allow_oob})
        add_type(cmd.args)
    return out


def _children(t: QapiType) -> list[QapiType]:
    if isinstance(t, Struct):
        return [m.type for m in t.members.values()]
    for attr in ("element", "branches"):
        value = getattr(t, attr, None)
        if isinstance(value, QapiType):
            return [value]
        if isinstance(value, list):
            return value
    return []
