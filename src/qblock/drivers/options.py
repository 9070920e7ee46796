"""Typed access to driver options that may arrive as QMP JSON values or keyval strings."""
from __future__ import annotations

from typing import Any

from qblock.errors import InvalidArgument

_TRUE = {"on", "yes", "true", "y"}
_FALSE = {"off", "no", "false", "n"}


def to_bool(value: Any, name: str) -> bool:
    """A QAPI bool: JSON true/false or keyval on/off (qapi/qapi-util.c qapi_bool_parse)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise InvalidArgument(f"Parameter '{name}' expects 'on' or 'off'")
    raise InvalidArgument(f"Invalid parameter type for '{name}', expected: boolean")


def to_int(value: Any, name: str) -> int:
    """A QAPI integer (or size, with keyval's K/M/G suffixes)."""
    if isinstance(value, bool):
        raise InvalidArgument(f"Invalid parameter type for '{name}', expected: integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        from qblock.keyval import to_size

        try:
            return to_size(value, name)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
    raise InvalidArgument(f"Invalid parameter type for '{name}', expected: integer")


def pop_bool(options: dict[str, Any], name: str, default: bool) -> bool:
    return to_bool(options.pop(name), name) if name in options else default


def pop_int(options: dict[str, Any], name: str, default: int) -> int:
    return to_int(options.pop(name), name) if name in options else default


def pop_str(options: dict[str, Any], name: str, default: str | None = None,
            choices: tuple[str, ...] | None = None) -> str | None:
    if name not in options:
        return default
    value = options.pop(name)
    if not isinstance(value, str):
        raise InvalidArgument(f"Invalid parameter type for '{name}', expected: string")
    if choices is not None and value not in choices:
        raise InvalidArgument(f"Parameter '{name}' does not accept value '{value}'")
    return value
