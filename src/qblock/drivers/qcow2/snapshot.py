"""Reading the internal snapshot table (QEMU block/qcow2-snapshot.c qcow2_read_snapshots).

The driver keeps snapshots intact: it needs their L1 tables for the overlap checks and the
table's size; creating, applying and deleting snapshots is not done here.
"""
from __future__ import annotations

import dataclasses
import struct

from qblock.block import io
from qblock.block.graph import BdrvChild
from qblock.drivers.qcow2.header import Qcow2Header
from qblock.errors import InvalidArgument

_ENTRY = struct.Struct(">QIHHIIQII")  # qcow2.txt "Snapshot table entry", 40 bytes
QCOW_MAX_SNAPSHOTS_SIZE = 64 * 1024 * 1024
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """What the driver needs of one snapshot."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str


async def read_snapshots(file: BdrvChild, header: Qcow2Header) -> tuple[list[SnapshotInfo], int]:
    """Snapshots and the table's size in bytes; InvalidArgument for a broken table."""
    snapshots: list[SnapshotInfo] = []
    if not header.nb_snapshots:
        return snapshots, 0
    offset = header.snapshots_offset
    size = 0
    for _ in range(header.nb_snapshots):
        raw = bytes(await io.pread(file, offset + size, _ENTRY.size))
        (l1_offset, l1_size, id_len, name_len, _sec, _nsec, _clock, _vmsz,
         extra) = _ENTRY.unpack(raw)
        if extra > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise InvalidArgument("Too much extra metadata in snapshot table entry 0")
        pos = size + _ENTRY.size + extra
        strings = bytes(await io.pread(file, offset + pos, id_len + name_len))
        size = pos + id_len + name_len
        size = -(-size // 8) * 8
        if size > QCOW_MAX_SNAPSHOTS_SIZE:
            raise InvalidArgument("Snapshot table exceeds the maximum size")
        snapshots.append(SnapshotInfo(l1_offset, l1_size,
                                      strings[:id_len].decode("utf-8", "replace"),
                                      strings[id_len:].decode("utf-8", "replace")))
    return snapshots, size
