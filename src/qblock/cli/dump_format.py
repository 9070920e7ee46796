"""The qcow2 header cluster as QEMU's iotests qcow2.py sees it: raw fields and extensions.

Unlike ``Qcow2Header.parse``, which validates and normalises (it refuses unknown incompatible
bits, drops a stale bitmaps extension, folds the backing format and feature table into
fields), this keeps the bytes as they are, so that broken images can be shown and edited.
The field table is header.py's; bitmap directories are parsed by drivers/qcow2/bitmap.py.
Output layout, names and number formats follow tests/qemu-iotests/qcow2_format.py.
"""
from __future__ import annotations

import dataclasses
import string
import struct
from typing import Any, BinaryIO

import numpy as np

from qblock.drivers.qcow2 import bitmap as qbitmap
from qblock.drivers.qcow2.header import (EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO_HEADER,
                                         EXT_DATA_FILE, EXT_FEATURE_TABLE, MAX_CLUSTER_BITS,
                                         MIN_CLUSTER_BITS, QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
                                         V2_FIELDS, V2_HEADER_SIZE, V3_FIELDS)

# qcow2.txt "Header": bytes 0-103 (compression_type and later are not dumped, as in qcow2.py).
_DUMPED = V2_FIELDS + tuple(f for f in V3_FIELDS if f[0] != "compression_type")
FIXED = struct.Struct(">" + "".join(code for _, code in _DUMPED))
# qcow2.py's names; it calls header.py's snapshots_offset "snapshot_offset".
FIELD_NAMES: tuple[str, ...] = tuple("snapshot_offset" if n == "snapshots_offset" else n
                                     for n, _ in _DUMPED)
FIELD_CODES = dict(zip(FIELD_NAMES, (code for _, code in _DUMPED)))
FIELD_OFFSETS = {name: struct.calcsize(">" + "".join(c for _, c in _DUMPED[:i]))
                 for i, name in enumerate(FIELD_NAMES)}
_HEX = {"magic", "backing_file_offset", "backing_file_size", "l1_table_offset",
        "refcount_table_offset", "snapshot_offset"}
_MASK = {"incompatible_features", "compatible_features", "autoclear_features"}

EXT_NAMES = {
    EXT_BACKING_FORMAT: "Backing format",
    EXT_FEATURE_TABLE: "Feature table",
    EXT_CRYPTO_HEADER: "Crypto header",
    EXT_BITMAPS: "Bitmaps",
    EXT_DATA_FILE: "Data file",
}
_EXT_HDR = struct.Struct(">II")  # qcow2.txt "Header extensions": type, length
_BITMAPS_EXT = struct.Struct(">IIQQ")  # qcow2.txt "Bitmaps extension"
_PRINTABLE = frozenset(string.printable.encode("ascii"))


class DumpError(Exception):
    """A usage or image error: its message is printed and the command exits 1."""


def line(name: str, value: object) -> str:
    """One ``name value`` row, the name left-aligned in 25 columns."""
    return f"{name:<25} {value}"


def flags64(value: int) -> str:
    """A feature mask as the list of its set bit numbers."""
    return str([bit for bit in range(64) if value >> bit & 1])


def pad8(n: int) -> int:
    return (n + 7) & ~7


@dataclasses.dataclass
class RawExtension:
    """One header extension: type, payload and the padding bytes found after it."""

    magic: int
    data: bytes
    padding: bytes = b""

    @property
    def name(self) -> str:
        return EXT_NAMES.get(self.magic, "<unknown>")

    def pack(self) -> bytes:
        pad = self.padding if len(self.padding) == pad8(len(self.data)) - len(self.data) \
            else bytes(pad8(len(self.data)) - len(self.data))
        return _EXT_HDR.pack(self.magic, len(self.data)) + self.data + pad


@dataclasses.dataclass
class RawHeader:
    """The header cluster as it is on disk (qcow2.txt "Header", "Header extensions")."""

    fields: dict[str, int]
    extensions: list[RawExtension]
    backing_file: bytes | None
    area_end: int  # first byte after the end marker and the backing file name

    @property
    def cluster_size(self) -> int:
        """The header cluster size, cluster_bits clamped to what QEMU can open (qcow2.txt
        "Header": 9 and up; QEMU's limit is 2 MiB) so that a bad value cannot make us read
        or write gigabytes."""
        return 1 << min(max(self.fields["cluster_bits"], MIN_CLUSTER_BITS), MAX_CLUSTER_BITS)

    @property
    def fixed_size(self) -> int:
        """Bytes of the fixed header this version has on disk."""
        return V2_HEADER_SIZE if self.fields["version"] == 2 else FIXED.size

    @classmethod
    def read(cls, f: BinaryIO) -> RawHeader:
        """Decode the header cluster of ``f`` without validation (qcow2.py QcowHeader)."""
        f.seek(0)
        head = f.read(FIXED.size)
        head += bytes(FIXED.size - len(head))
        fields = dict(zip(FIELD_NAMES, FIXED.unpack(head)))
        if fields["version"] == 2:
            # qcow2.txt: version 2 has none of the v3 fields; these are their implied values.
            fields.update(incompatible_features=0, compatible_features=0, autoclear_features=0,
                          refcount_order=4, header_length=V2_HEADER_SIZE)
        cs = cls(fields, [], None, 0).cluster_size
        f.seek(0)
        buf = f.read(cs)
        bfo = fields["backing_file_offset"]
        end = min(cs, bfo) if bfo else cs
        pos = fields["header_length"]
        exts = []
        while pos + _EXT_HDR.size <= min(end, len(buf)):
            magic, length = _EXT_HDR.unpack_from(buf, pos)
            pos += _EXT_HDR.size
            if magic == 0:
                break
            data = buf[pos:pos + length]
            padding = buf[pos + length:pos + pad8(length)]
            exts.append(RawExtension(magic, data, padding))
            pos += pad8(length)
        backing = None
        if bfo:
            backing = buf[bfo:bfo + fields["backing_file_size"]]
            pos = max(pos, bfo + len(backing))
        return cls(fields, exts, backing, min(pos, cs))

    def pack_area(self) -> bytes:
        """Extensions, end marker and backing file name, as qcow2.py's update() lays them out;
        sets ``backing_file_offset`` to where the name lands."""
        area = b"".join(e.pack() for e in self.extensions) + _EXT_HDR.pack(0, 0)
        if self.backing_file is not None:
            self.fields["backing_file_offset"] = self.fields["header_length"] + len(area)
            area += self.backing_file
        return area

    def pack_fixed(self) -> bytes:
        """The fixed header fields this version has, cut at ``header_length``."""
        raw = FIXED.pack(*(self.fields[n] for n in FIELD_NAMES))
        return raw[:min(self.fixed_size, self.fields["header_length"])]


# -- bitmaps extension ---------------------------------------------------------------------

def table_entry_type(entries: np.ndarray) -> list[str]:
    """qcow2.txt "Bitmap table": each entry's kind (an offset with bit 0 set is invalid)."""
    offset = (entries & np.uint64(qbitmap.BME_TABLE_ENTRY_OFFSET)) != 0
    ones = (entries & np.uint64(qbitmap.BME_TABLE_ENTRY_ALL_ONES)) != 0
    kinds = np.array(["all-zeroes", "all-ones", "serialized", "invalid"])
    return kinds[offset.astype(np.int64) * 2 + ones.astype(np.int64)].tolist()


def read_bitmaps(f: BinaryIO, data: bytes, cluster_size: int) -> dict[str, Any]:
    """The bitmaps extension with its directory and every bitmap table, as plain data."""
    nb, reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(data[:_BITMAPS_EXT.size].ljust(
        _BITMAPS_EXT.size, b"\0"))
    f.seek(dir_offset)
    raw = f.read(min(dir_size, QCOW2_MAX_BITMAP_DIRECTORY_SIZE))
    directory = []
    for e in qbitmap.parse_directory(raw, nb):
        f.seek(e.table_offset)
        table = np.frombuffer(f.read(e.table_size * 8), dtype=">u8").astype(np.uint64)
        offsets = (table & np.uint64(qbitmap.BME_TABLE_ENTRY_OFFSET)).tolist()
        reserved_bits = (table & np.uint64(qbitmap.BME_TABLE_ENTRY_RESERVED)).tolist()
        directory.append({
            "name": e.name,
            "bitmap_table_offset": e.table_offset,
            "bitmap_table_size": e.table_size,
            "flags": e.flags,
            "type": e.type,
            "granularity_bits": e.gran_bits,
            "name_size": len(e.name.encode()),
            "extra_data_size": len(e.extra),
            "bitmap_table": [{"type": t, "offset": o, "reserved": r} for t, o, r in
                             zip(table_entry_type(table), offsets, reserved_bits)],
        })
    return {"nb_bitmaps": nb, "reserved32": reserved, "bitmap_directory_size": dir_size,
            "bitmap_directory_offset": dir_offset, "bitmap_directory": directory}


def bitmap_flags(value: int) -> str:
    """Directory entry flags: hex value and the flag names (qcow2.txt "Bitmap directory")."""
    names = {qbitmap.BME_FLAG_IN_USE: "in-use", qbitmap.BME_FLAG_AUTO: "auto"}
    bits = [names.get(1 << b, f"bit-{b}") for b in range(32) if value >> b & 1]
    return f"{value:#x} ({bits})"


def bitmaps_lines(ext: dict[str, Any], cluster_size: int) -> list[str]:
    out = [line("nb_bitmaps", ext["nb_bitmaps"]), line("reserved32", ext["reserved32"]),
           line("bitmap_directory_size", f"{ext['bitmap_directory_size']:#x}"),
           line("bitmap_directory_offset", f"{ext['bitmap_directory_offset']:#x}")]
    for e in ext["bitmap_directory"]:
        out += ["", line("Bitmap name", e["name"]),
                line("bitmap_table_offset", f"{e['bitmap_table_offset']:#x}"),
                line("bitmap_table_size", e["bitmap_table_size"]),
                line("flags", bitmap_flags(e["flags"])),
                line("type", e["type"]), line("granularity_bits", e["granularity_bits"]),
                line("name_size", e["name_size"]), line("extra_data_size", e["extra_data_size"]),
                f"{'Bitmap table':<14} {'type':<15} {'size':<12} offset"]
        for i, t in enumerate(e["bitmap_table"]):
            size = cluster_size if t["type"] == "serialized" else 0
            out.append(f"{i:<14} {t['type']:<15} {size:<12} {t['offset']}")
    return out


# -- whole dumps -----------------------------------------------------------------------------

def header_lines(h: RawHeader) -> list[str]:
    out = []
    for name in FIELD_NAMES:
        value = h.fields[name]
        text = flags64(value) if name in _MASK else f"{value:#x}" if name in _HEX else value
        out.append(line(name, text))
    return out


def data_str(data: bytes) -> str:
    """An extension payload: quoted if it is printable ASCII, else <binary>."""
    return f"'{data.decode('ascii')}'" if all(c in _PRINTABLE for c in data) else "<binary>"


def extension_json(f: BinaryIO, h: RawHeader, e: RawExtension) -> dict[str, Any]:
    res: dict[str, Any] = {"name": e.name, "magic": e.magic, "length": len(e.data)}
    if e.magic == EXT_BITMAPS:
        res["data"] = read_bitmaps(f, e.data, h.cluster_size)
    else:
        res["data_str"] = data_str(e.data)
    return res


def extensions_lines(f: BinaryIO, h: RawHeader) -> list[str]:
    out = []
    for e in h.extensions:
        out += ["Header extension:", line("magic", f"{e.magic:#x} ({e.name})"),
                line("length", len(e.data))]
        if e.magic == EXT_BITMAPS:
            out += bitmaps_lines(read_bitmaps(f, e.data, h.cluster_size), h.cluster_size)
        else:
            out.append(line("data", data_str(e.data)))
        out.append("")
    return out
