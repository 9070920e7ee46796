"""QEMU's option-argument syntaxes, as pure functions.

* ``parse_keyval``: the KEY=VALUE,... syntax of QEMU util/keyval.c (keyval_parse), used by
  qemu-storage-daemon --blockdev, --export, --monitor, --nbd-server and --object.
* ``parse_option_arg``: qobject_input_visitor_new_str() - JSON when the argument starts
  with '{', keyval otherwise.
* ``parse_qemu_opts``: the flat QemuOpts syntax of util/qemu-option.c (qemu_opts_parse),
  used by --chardev.
* ``to_bool``/``to_int``/``to_size``/``coerce``: the string conversions of the keyval input
  visitor (qapi/qobject-input-visitor.c, *_keyval functions).
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Union

from qblock.errors import InvalidArgument

__all__ = [
    "KeyvalError", "Schema", "coerce", "format_keyval", "parse_keyval", "parse_option_arg",
    "parse_qemu_opts", "to_bool", "to_int", "to_size",
]

# keyval.c key_in_cur[128]: a key fragment is 1..127 characters.
_MAX_FRAGMENT = 127
# keyval.c key_to_index() caps list indexes at INT_MAX.
_INT_MAX = 2**31 - 1
# qapi/qapi-util.c parse_qapi_name(): optional downstream prefix __RFQDN_, then a letter
# followed by letters, digits, '-' and '_'.  ASCII only (qemu_isalpha/qemu_isalnum).
_QAPI_NAME = re.compile(r"(?:__[A-Za-z0-9.-]*_)?[A-Za-z][A-Za-z0-9_-]*")
_INDEX = re.compile(r"[0-9]+")
# strcspn(params, "=,"): the text before the first '=' or ','.
_UNTIL_SEP = re.compile(r"[^=,]*")
# keyval.c / qemu-option.c get_opt_value(): a value ends at a single ','; ',,' is a comma.
_VALUE = re.compile(r"(?:[^,]|,,)*")
# qemu/help_option.h is_help_option().
_HELP = ("help", "?")
# qemu-option.c id_wellformed() (util/id.c): a letter, then letters, digits, '-', '.', '_'.
_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
# qapi/qapi-util.c qapi_bool_parse().
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")
# C isspace() in the "C" locale, skipped by strtoll()/strtoull()/strtod().
_CSPACE = " \t\n\v\f\r"
# strtoll()/strtoull() with base 0: hex, octal or decimal digits after an optional sign.
_C_INT = re.compile(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
# util/cutils.c do_strtosz(): decimal integer part, optional '.' fraction, then the rest.
_SIZE = re.compile(r"([0-9]*)(?:\.([0-9]*))?(.*)", re.S)
_SIZE_SUFFIXES = "bBkKmMgGtTpPeE"  # suffix_mul(): case-insensitive, 1024-based
# One JSON string token; QEMU's lexer also accepts single-quoted strings (json-lexer.c).
_JSON_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'", re.S)
_JSON_STRING_PART = re.compile(r"\\.|\"", re.S)

Schema = Union[str, "dict[str, Schema]", "list[Schema]"]


class KeyvalError(InvalidArgument, ValueError):
    """An option argument QEMU would reject; the message is QEMU's."""


def _read_value(text: str, pos: int) -> tuple[str, int]:
    """Read a value at ``pos`` up to a single ',' (consumed); ',,' is an escaped comma."""
    match = _VALUE.match(text, pos)
    return match.group().replace(",,", ","), match.end() + 1


def _split_key(key: str) -> list[str]:
    """Split a dotted key into fragments as keyval_parse_one() does, or raise."""
    fragments = []
    start = 0
    while True:
        # First fragment: a QAPI name; later fragments: a list index or a QAPI name.
        match = (start and _INDEX.match(key, start)) or _QAPI_NAME.match(key, start)
        end = match.end() if match else start
        if end == start or (end < len(key) and key[end] != "."):
            raise KeyvalError(f"Invalid parameter '{key}'")
        if end - start > _MAX_FRAGMENT:
            kind = "" if start == 0 and end == len(key) else " fragment"
            raise KeyvalError(f"Parameter{kind} '{key[start:end]}' is too long")
        fragments.append(key[start:end])
        if end == len(key):
            return fragments
        start = end + 1


def _put(root: dict, fragments: list[str], value: str) -> None:
    """Store ``value`` at the key path ``fragments``, creating inner objects.

    Mirrors keyval_parse_put(): a path used both as a value and an object is an error.
    """
    cur = root
    for depth, fragment in enumerate(fragments[:-1], 1):
        cur = cur.setdefault(fragment, {})
        if not isinstance(cur, dict):
            raise KeyvalError(
                f"Parameters '{'.'.join(fragments[:depth])}.*' used inconsistently")
    if isinstance(cur.get(fragments[-1]), dict):
        raise KeyvalError(f"Parameters '{'.'.join(fragments)}.*' used inconsistently")
    cur[fragments[-1]] = value


def _listify(node: dict, path: str) -> dict | list:
    """Turn objects whose keys are all list indexes into lists (keyval_listify)."""
    for key, value in node.items():
        if isinstance(value, dict):
            node[key] = _listify(value, f"{path}{key}.")
    kinds = {key[0].isdigit() for key in node}
    if kinds == {True, False}:
        raise KeyvalError(f"Parameters '{path}*' used inconsistently")
    if kinds != {True}:
        return node
    # Indexes may come in any order and spell the same number twice ("1", "01"); the
    # later key wins.  Indexes must cover 0..n-1; report the first one missing.
    items = {min(int(key), _INT_MAX): value for key, value in node.items()}
    for index in range(len(items)):
        if index not in items:
            raise KeyvalError(f"Parameter '{path}{index}' missing")
    return [items[index] for index in range(len(items))]


def parse_keyval(text: str, implied_key: str | None = None) -> dict:
    """Parse QEMU KEY=VALUE,... syntax into nested dicts/lists of strings (keyval_parse).

    Dotted keys nest, numeric fragments make lists, ',,' escapes a comma in a value, the
    last of duplicate keys wins.  With ``implied_key``, a first element without '=' is
    the value of that key (it cannot contain ',' or '=').
    """
    root: dict = {}
    help_wanted = False
    pos = 0
    while pos < len(text):
        end = _UNTIL_SEP.match(text, pos).end()
        element = text[pos:end]
        at_eq = text.startswith("=", end)
        bare = bool(element) and not at_eq
        if bare and element in _HELP:
            help_wanted = True
            pos = end + 1
        elif bare and implied_key is not None:
            _put(root, _split_key(implied_key), element)
            pos = end + 1
        else:
            fragments = _split_key(element)
            if not at_eq:
                raise KeyvalError(f"Expected '=' after parameter '{element}'")
            value, pos = _read_value(text, end + 1)
            _put(root, fragments, value)
        implied_key = None
    # keyval_parse_into() without a help pointer, as qemu-storage-daemon calls it.
    if help_wanted:
        raise KeyvalError("Help is not available for this option")
    result = _listify(root, "")
    assert isinstance(result, dict)
    return result


def _requote(match: re.Match[str]) -> str:
    """Rewrite one QEMU JSON string token as a standard double-quoted JSON string."""
    body = _JSON_STRING_PART.sub(
        lambda part: {"\\'": "'", '"': '\\"'}.get(part.group(), part.group()),
        match.group()[1:-1])
    return f'"{body}"'


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """Build a JSON object, rejecting duplicate keys (json-parser.c parse_pair)."""
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise KeyvalError("JSON parse error, duplicate key")
        result[key] = value
    return result


def _json_int(text: str) -> int | float:
    """JSON integers beyond int64/uint64 become doubles (json-parser.c parse_literal)."""
    value = int(text)
    return value if -2**63 <= value < 2**64 else float(text)


def _json_constant(name: str) -> Any:
    """Reject NaN and Infinity, which QEMU's JSON lexer does not know."""
    raise KeyvalError(f"JSON parse error, invalid keyword '{name}'")


def parse_option_arg(text: str, implied_key: str | None = None) -> dict:
    """Parse an option argument: JSON if it starts with '{', else keyval.

    Mirrors qobject_input_visitor_new_str(): only a first character '{' selects JSON, so
    JSON arrays or scalars are rejected by the keyval parser.  JSON values keep their JSON
    types; QEMU's extension of single-quoted strings is accepted.
    """
    if not text.startswith("{"):
        return parse_keyval(text, implied_key)
    try:
        return json.loads(_JSON_STRING.sub(_requote, text), object_pairs_hook=_json_pairs,
                          parse_int=_json_int, parse_constant=_json_constant)
    except json.JSONDecodeError as exc:
        raise KeyvalError(f"JSON parse error, {exc}") from None


def format_keyval(options: dict) -> str:
    """Format nested dicts/lists of strings as keyval text that parse_keyval() reads back.

    Empty objects and lists have no keyval spelling (a keyval.c design flaw) and are
    rejected, as are keys that are not QAPI names.
    """
    def walk(value: Any, key: str) -> list[str]:
        if isinstance(value, str):
            return [f"{key}={value.replace(',', ',,')}"]
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, list):
            items = [(str(index), item) for index, item in enumerate(value)]
        else:
            raise TypeError(f"Parameter '{key}' is not a string, object or list")
        if not items:
            raise KeyvalError(f"Parameter '{key}' is empty and cannot be expressed")
        parts = []
        for name, item in items:
            if isinstance(value, dict) and (not _QAPI_NAME.fullmatch(name)
                                            or len(name) > _MAX_FRAGMENT):
                raise KeyvalError(f"Invalid parameter '{name}'")
            parts += walk(item, f"{key}.{name}" if key else name)
        return parts

    return ",".join(walk(options, "")) if options else ""


def _qemu_opt(text: str, pos: int, implied_key: str | None) -> tuple[str, str, int]:
    """Read one NAME=VALUE element (qemu-option.c get_opt_name_value)."""
    end = _UNTIL_SEP.match(text, pos).end()
    if text.startswith("=", end):
        value, next_pos = _read_value(text, end + 1)
        return text[pos:end], value, next_pos
    if implied_key is not None:
        value, next_pos = _read_value(text, pos)
        return implied_key, value, next_pos
    # A bare flag: "name" means name=on, "noname" name=off (deprecated since QEMU 6.0,
    # still accepted with a warning).
    name = text[pos:end]
    if name.startswith("no"):
        return name[2:], "off", end + 1
    return name, "on", end + 1


def parse_qemu_opts(text: str, implied_key: str | None = None) -> dict[str, str]:
    """Parse flat QemuOpts syntax into a dict of strings (qemu_opts_parse).

    ``implied_key`` names a first element without '=' (e.g. "backend" for --chardev);
    its value may contain ',,'-escaped commas.  Dots stay part of names, the last of
    duplicate names wins, except "id": the first "id" wins and must be an identifier.
    """
    options: dict[str, str] = {}
    # opts_parse_id() scans for the first "id", without implied key.
    pos = 0
    while pos < len(text):
        name, value, pos = _qemu_opt(text, pos, None)
        if name == "id":
            if not _ID.fullmatch(value):
                raise KeyvalError("Parameter 'id' expects an identifier")
            options["id"] = value
            break
    pos = 0
    while pos < len(text):
        name, value, pos = _qemu_opt(text, pos, implied_key)
        implied_key = None
        if name != "id":
            options[name] = value
    return options


def to_bool(s: str, name: str) -> bool:
    """Convert a keyval string to bool (qapi_bool_parse)."""
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise KeyvalError(f"Parameter '{name}' expects 'on' or 'off'")


def to_int(s: str, name: str, *, unsigned: bool = False) -> int:
    """Convert a keyval string to int64, or uint64 if ``unsigned`` (qemu_strtoi64/u64).

    Accepts C strtoll() syntax with base 0: leading whitespace, a sign, 0x hex, 0 octal.
    Like strtoull(), the unsigned form negates "-N" modulo 2^64.
    """
    match = _C_INT.fullmatch(s.lstrip(_CSPACE))
    if match:
        sign, digits = match.groups()
        base = 16 if digits[:2] in ("0x", "0X") else 8 if digits[0] == "0" else 10
        magnitude = int(digits, base)
        value = -magnitude if sign == "-" else magnitude
        if unsigned and magnitude < 2**64:
            return value % 2**64
        if not unsigned and -2**63 <= value < 2**63:
            return value
    raise KeyvalError(f"Parameter '{name}' expects integer")


def _strtosz(s: str) -> int | None:
    """util/cutils.c qemu_strtosz(): byte count with optional 1024-based suffix, or None."""
    s = s.lstrip(_CSPACE)
    if s.startswith("-"):
        return None  # parse_uint() rejects negative numbers, even -0
    s = s[1:] if s.startswith("+") else s
    if s[:2] in ("0x", "0X"):
        # Hex is a plain byte count: no fraction, no suffix.
        if not re.fullmatch(r"[0-9a-fA-F]+", s[2:]) or int(s[2:], 16) >= 2**64:
            return None
        return int(s[2:], 16)
    whole, fraction, rest = _SIZE.fullmatch(s).groups()
    if not (whole or fraction):
        return None
    value, frac = int(whole or "0"), 0
    if fraction:
        # 64.64 fixed point, as do_strtosz() computes it from strtod()'s double.
        parsed = float("0." + fraction)
        if parsed == 1.0:
            value += 1
        else:
            frac = int(parsed * 2**64)
    multiplier = 1
    if rest and rest[0] in _SIZE_SUFFIXES:
        multiplier = 1024 ** (_SIZE_SUFFIXES.index(rest[0]) // 2)
        rest = rest[1:]
    if rest or (multiplier == 1 and frac):
        return None  # trailing junk, or a fraction without a scaling suffix
    product = frac * multiplier
    value = value * multiplier + (product >> 64) + ((product >> 63) & 1)  # round half up
    return value if value < 2**64 else None


def to_size(s: str, name: str) -> int:
    """Convert a keyval string to a byte count (qemu_strtosz): "1.5G", "512k", "0x200"."""
    value = _strtosz(s)
    if value is None:
        raise KeyvalError(f"Parameter '{name}' expects size")
    return value


_CONVERTERS: dict[str, Callable[[str, str], Any]] = {
    "bool": to_bool,
    "int": to_int,
    "uint64": lambda s, name: to_int(s, name, unsigned=True),
    "size": to_size,
}


def coerce(value: Any, schema: Schema, name: str = "") -> Any:
    """Convert keyval strings in ``value`` to the types ``schema`` names.

    A schema is a type name ("str", "any", "bool", "int", "uint64", "size"), a dict of
    member schemas, or a one-element list holding the element schema.  Members missing
    from the schema and values that are not strings (e.g. from JSON) are left as they
    are; checking for missing or unexpected members is the caller's job.
    """
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise KeyvalError(f"Invalid parameter type for '{name}', expected: object")
        return {key: coerce(item, schema[key], f"{name}.{key}" if name else key)
                if key in schema else item for key, item in value.items()}
    if isinstance(schema, list):
        if not isinstance(value, list):
            raise KeyvalError(f"Invalid parameter type for '{name}', expected: array")
        return [coerce(item, schema[0], f"{name}[{index}]") for index, item in enumerate(value)]
    if schema == "any":
        return value
    if isinstance(value, (dict, list)):
        raise KeyvalError(f"Invalid parameter type for '{name}', expected: string")
    if isinstance(value, str) and schema in _CONVERTERS:
        return _CONVERTERS[schema](value, name)
    return value
