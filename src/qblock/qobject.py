"""QEMU's JSON writer: QObject serialisation byte for byte (qobject/json-writer.c, qdict.c).

QEMU stores objects in a QDict, a 512-bucket hash table; printing walks the buckets in order and
each bucket from its most recently inserted entry.  So the key order of QEMU's JSON is the hash
order of the keys, not the order the fields were added.  ``to_json`` takes a Python dict in
*insertion* order (QAPI field order) and prints it as QEMU would.
"""
from __future__ import annotations

import math
from typing import Any

QDICT_BUCKET_MAX = 512  # include/qapi/qmp/qdict.h
_U32 = 0xFFFFFFFF

# json-writer.c quoted_str(): the escapes with a short form.
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n",
                  "\r": "\\r", "\t": "\\t"}


def tdb_hash(key: str) -> int:
    """qdict.c tdb_hash(): the hash of a key's UTF-8 bytes (from the Samba tdb library)."""
    data = key.encode("utf-8", "surrogatepass")
    value = (0x238F13AF * len(data)) & _U32
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & _U32
    return (1103515243 * value + 12345) & _U32


def bucket(key: str) -> int:
    """The QDict bucket ``key`` lands in."""
    return tdb_hash(key) % QDICT_BUCKET_MAX


def qdict_order(keys: list[str]) -> list[str]:
    """The order a QDict built by inserting ``keys`` in sequence prints them.

    qdict.c qdict_put_obj() inserts at the head of the bucket list; qdict_first/qdict_next walk
    buckets 0..511.  A key inserted twice keeps its first position (the value is replaced).
    """
    seen: dict[str, int] = {}
    for key in keys:
        seen.setdefault(key, len(seen))
    return sorted(seen, key=lambda k: (bucket(k), -seen[k]))


def insertion_order(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Turn members as QEMU printed them back into a dict in insertion order.

    Inside a bucket QEMU prints the newest key first, so reversing the printed members gives an
    insertion order that ``to_json`` prints identically.  Use as ``json.loads``'s
    ``object_pairs_hook`` to re-serialise QEMU output.
    """
    return dict(reversed(pairs))


def quote(text: str) -> str:
    """json-writer.c quoted_str(): escape as QEMU does (\\uXXXX uppercase, surrogate pairs)."""
    out = ['"']
    for ch in text:
        short = _SHORT_ESCAPES.get(ch)
        if short is not None:
            out.append(short)
            continue
        cp = ord(ch)
        if 0xD800 <= cp <= 0xDFFF:  # a lone surrogate is not valid UTF-8: U+FFFD
            cp = 0xFFFD
        if cp > 0xFFFF:
            cp -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)))
        elif cp < 0x20 or cp >= 0x7F:
            out.append("\\u%04X" % cp)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _number(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    # json-writer.c json_writer_double(): "%.17g"; non-finite values have no JSON form.
    if not math.isfinite(value):
        raise ValueError(f"cannot serialise {value!r} as JSON")
    return "%.17g" % value


class _Writer:
    """json-writer.c JSONWriter: containers, commas and pretty newlines."""

    def __init__(self, pretty: bool) -> None:
        self.pretty = pretty
        self.out: list[str] = []
        self.depth = 0
        self.need_comma = False
        self.empty = True

    def _newline(self) -> None:
        if self.pretty:
            self.out.append("\n" + " " * (self.depth * 4))

    def _before_value(self, name: str | None) -> None:
        if self.need_comma:
            self.out.append(",")
            if self.pretty:
                self._newline()
            else:
                self.out.append(" ")
        else:
            if not self.empty:
                self._newline()
            self.need_comma = True
        self.empty = False
        if name is not None:
            self.out.append(quote(name) + ": ")

    def value(self, name: str | None, value: Any) -> None:
        if isinstance(value, dict):
            self._before_value(name)
            self.out.append("{")
            self.depth += 1
            self.need_comma = False
            for key in qdict_order(list(value)):
                if not isinstance(key, str):
                    raise TypeError(f"QDict keys are strings, not {type(key).__name__}")
                self.value(key, value[key])
            self._end("}")
        elif isinstance(value, (list, tuple)):
            self._before_value(name)
            self.out.append("[")
            self.depth += 1
            self.need_comma = False
            for item in value:
                self.value(None, item)
            self._end("]")
        else:
            self._before_value(name)
            self.out.append(_scalar(value))

    def _end(self, closer: str) -> None:
        self.depth -= 1
        self._newline()
        self.out.append(closer)
        self.need_comma = True


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        return _number(value)
    if isinstance(value, str):
        return quote(value)
    raise TypeError(f"cannot serialise {type(value).__name__} as a QObject")


def to_json(value: Any, pretty: bool = False) -> str:
    """qobject_to_json()/qobject_to_json_pretty(): QEMU's JSON text for ``value``.

    Dicts are QDicts (keys in hash order), lists and tuples QLists; ints, floats, bools, None
    and str the scalar QObjects.
    """
    writer = _Writer(pretty)
    writer.value(None, value)
    return "".join(writer.out)
