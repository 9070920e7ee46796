"""``qblock dump IMAGE COMMAND [ARGS]``: show and edit qcow2 metadata like QEMU's qcow2.py.

Commands, messages and output follow tests/qemu-iotests/qcow2.py (and qcow2_format.py);
``--output=json`` (or qcow2.py's ``-j``) prints the dumps as JSON.  Editing commands
rewrite only the header fields and the extension area, and refuse (before writing anything)
an extension area that would not fit in the header cluster.  ``dump-l1``, ``dump-l2`` and
``dump-refcounts`` show the mapping and refcount tables.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

from qblock.cli import dump_tables
from qblock.cli.dump_format import (FIELD_CODES, FIELD_NAMES, FIELD_OFFSETS, DumpError,
                                    RawExtension, RawHeader, extension_json, extensions_lines,
                                    header_lines)
from qblock.errors import QBlockError


def _int(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise DumpError(f"'{text}' is not a valid {what}") from None


def _emit(lines: list[str]) -> None:
    if lines:
        print("\n".join(lines))


def _json(value: Any) -> None:
    print(json.dumps(value, indent=4))


def _set_field(h: RawHeader, name: str, value: int) -> None:
    """Set a fixed header field; version 2 headers end before the v3 fields (qcow2.txt)."""
    if FIELD_OFFSETS[name] >= h.fixed_size:
        raise DumpError(f"'{name}' is not a field of a version {h.fields['version']} header")
    h.fields[name] = value


def _update(f: BinaryIO, h: RawHeader, old_end: int) -> None:
    """qcow2.py update(): extension area at header_length, then the fixed fields.  Bytes of
    the old area past the new one are zeroed so that nothing stale stays behind."""
    area = h.pack_area()
    start = h.fields["header_length"]
    if start + len(area) > h.cluster_size:
        raise DumpError("Header extensions do not fit in the header cluster")
    f.seek(start)
    f.write(area + bytes(max(0, old_end - start - len(area))))
    f.seek(0)
    f.write(h.pack_fixed())
    f.flush()
    os.fsync(f.fileno())


def cmd_dump_header(f: BinaryIO, as_json: bool) -> None:
    h = RawHeader.read(f)
    if as_json:
        _json(h.fields)
        print()
        _json([extension_json(f, h, e) for e in h.extensions])
    else:
        _emit(header_lines(h) + [""] + extensions_lines(f, h))


def cmd_dump_header_exts(f: BinaryIO, as_json: bool) -> None:
    h = RawHeader.read(f)
    if as_json:
        _json([extension_json(f, h, e) for e in h.extensions])
    else:
        _emit(extensions_lines(f, h))


def cmd_set_header(f: BinaryIO, as_json: bool, name: str, value: str) -> None:
    number = _int(value, "number")
    if name not in FIELD_NAMES:
        raise DumpError(f"'{name}' is not a known header field")
    bits = {"I": 32, "Q": 64}[FIELD_CODES[name]]
    if not 0 <= number < 1 << bits:
        raise DumpError(f"'{value}' does not fit in the {bits}-bit field '{name}'")
    h = RawHeader.read(f)
    old_end = h.area_end
    _set_field(h, name, number)
    _update(f, h, old_end)


def cmd_add_header_ext(f: BinaryIO, as_json: bool, magic: str, data: str | bytes) -> None:
    number = _int(magic, "magic number")
    if not 0 <= number < 1 << 32:
        raise DumpError(f"'{magic}' is not a valid magic number")
    payload = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    h = RawHeader.read(f)
    old_end = h.area_end
    h.extensions.append(RawExtension(number, payload))
    _update(f, h, old_end)


def cmd_add_header_ext_stdio(f: BinaryIO, as_json: bool, magic: str) -> None:
    cmd_add_header_ext(f, as_json, magic, sys.stdin.buffer.read())


def cmd_del_header_ext(f: BinaryIO, as_json: bool, magic: str) -> None:
    number = _int(magic, "magic number")
    h = RawHeader.read(f)
    old_end = h.area_end
    kept = [e for e in h.extensions if e.magic != number]
    if len(kept) == len(h.extensions):
        print("No such header extension")
        return
    h.extensions = kept
    _update(f, h, old_end)


FEATURE_GROUPS = {"incompatible": "incompatible_features",
                  "compatible": "compatible_features",
                  "autoclear": "autoclear_features"}


def cmd_set_feature_bit(f: BinaryIO, as_json: bool, group: str, bit: str) -> None:
    try:
        number = int(bit, 0)
    except ValueError:
        number = -1
    if not 0 <= number < 64:
        raise DumpError(f"'{bit}' is not a valid bit number in range [0, 64)")
    field = FEATURE_GROUPS.get(group)
    if field is None:
        raise DumpError(f"'{group}' is not a valid group, try 'incompatible', 'compatible', "
                        f"or 'autoclear'")
    h = RawHeader.read(f)
    old_end = h.area_end
    _set_field(h, field, h.fields[field] | 1 << number)
    _update(f, h, old_end)


def cmd_dump_l1(f: BinaryIO, as_json: bool) -> None:
    dump_tables.dump_l1(f, RawHeader.read(f), as_json)


def cmd_dump_l2(f: BinaryIO, as_json: bool, index: str) -> None:
    dump_tables.dump_l2(f, RawHeader.read(f), _int(index, "L1 index"), as_json)


def cmd_dump_refcounts(f: BinaryIO, as_json: bool) -> None:
    dump_tables.dump_refcounts(f, RawHeader.read(f), as_json)


# name -> (handler, argument count, writes the image, description); qcow2.py's order first.
COMMANDS: dict[str, tuple[Callable[..., None], int, bool, str]] = {
    "dump-header": (cmd_dump_header, 0, False, "Dump image header and header extensions"),
    "dump-header-exts": (cmd_dump_header_exts, 0, False, "Dump image header extensions"),
    "set-header": (cmd_set_header, 2, True, "Set a field in the header"),
    "add-header-ext": (cmd_add_header_ext, 2, True, "Add a header extension"),
    "add-header-ext-stdio": (cmd_add_header_ext_stdio, 1, True,
                             "Add a header extension, data from stdin"),
    "del-header-ext": (cmd_del_header_ext, 1, True, "Delete a header extension"),
    "set-feature-bit": (cmd_set_feature_bit, 2, True, "Set a feature bit"),
    "dump-l1": (cmd_dump_l1, 0, False, "Dump the active L1 table"),
    "dump-l2": (cmd_dump_l2, 1, False, "Dump the L2 table of an L1 index"),
    "dump-refcounts": (cmd_dump_refcounts, 0, False,
                       "Dump the refcount table and refcount block summaries"),
}


def usage() -> str:
    lines = ["Usage: qblock dump <file> <cmd> [<arg>, ...] [<key>, ...]", "",
             "Supported commands:"]
    lines += [f"    {name:<20} - {desc}" for name, (_, _, _, desc) in COMMANDS.items()]
    lines += ["", "Supported keys:", f"    {'-j, --output=json':<20} - Dump in JSON format"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = list(argv)
    as_json = False
    rest = []
    it = iter(args)
    for arg in it:
        if arg in ("-h", "--help"):
            print(usage())
            return 0
        if arg == "-j" or arg == "--output=json":
            as_json = True
        elif arg == "--output=human":
            as_json = False
        elif arg == "--output":
            fmt = next(it, "")
            if fmt not in ("json", "human"):
                print("qblock dump: --output must be 'human' or 'json'", file=sys.stderr)
                return 1
            as_json = fmt == "json"
        else:
            rest.append(arg)
    if len(rest) < 2:
        print(usage())
        return 1
    filename, cmd, cmd_args = rest[0], rest[1], rest[2:]
    entry = COMMANDS.get(cmd)
    if entry is None:
        print(f"Unknown command '{cmd}'")
        return 1
    handler, nargs, writes, _ = entry
    if len(cmd_args) != nargs:
        print(usage())
        return 1
    try:
        with open(filename, "r+b" if writes else "rb") as f:
            handler(f, as_json, *cmd_args)
    except DumpError as e:
        print(e)
        return 1
    except QBlockError as e:
        print(f"qblock dump: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"qblock dump: Could not open '{filename}': {e.strerror}", file=sys.stderr)
        return 1
    return 0
