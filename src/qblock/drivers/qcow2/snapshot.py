"""The internal snapshot table: reading, encoding, QAPI view (QEMU block/qcow2-snapshot.c).

qcow2.txt "Snapshots": ``nb_snapshots`` entries from ``snapshots_offset``, each 8-byte aligned:
a 40-byte header, extra data (vm_state_size_large, disk_size, icount: 24 bytes as QEMU 7.2
writes them; unknown trailing extra data is kept), the id string and the name.  Creating,
applying and deleting snapshots is snapshot_ops.py.
"""
from __future__ import annotations

import dataclasses
import errno
import struct

from qblock.block import io
from qblock.block.graph import BdrvChild
from qblock.drivers.qcow2.header import Qcow2Header
from qblock.errors import InvalidArgument, QBlockError

_ENTRY = struct.Struct(">QIHHIIQII")  # qcow2.txt "Snapshot table entry", 40 bytes
_EXTRA = struct.Struct(">QQQ")  # vm_state_size_large, disk_size, icount
QCOW_MAX_SNAPSHOTS_SIZE = 64 * 1024 * 1024
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
ICOUNT_NONE = -1  # qcow2.txt: "If icount is not known, this field is -1"
U64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot table entry (QCowSnapshot)."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int = 0
    icount: int = ICOUNT_NONE
    extra_data_size: int = _EXTRA.size
    unknown_extra: bytes = b""


def _entry_size(sn: SnapshotInfo) -> int:
    return (_ENTRY.size + max(_EXTRA.size, sn.extra_data_size)
            + len(sn.id_str.encode()) + len(sn.name.encode()))


async def read_snapshots(file: BdrvChild, header: Qcow2Header) -> tuple[list[SnapshotInfo], int]:
    """Snapshots and the table's size in bytes (qcow2_read_snapshots); InvalidArgument for a
    broken table."""
    snapshots: list[SnapshotInfo] = []
    if not header.nb_snapshots:
        return snapshots, 0
    start = header.snapshots_offset
    # qcow2.txt: without disk_size in the extra data, the snapshot has the image's size.
    default_disk_size = -(-header.size // 512) * 512
    pos = 0
    for i in range(header.nb_snapshots):
        pos = -(-pos // 8) * 8
        raw = bytes(await io.pread(file, start + pos, _ENTRY.size))
        (l1_offset, l1_size, id_len, name_len, sec, nsec, clock, vm_state,
         extra_size) = _ENTRY.unpack(raw)
        if extra_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise InvalidArgument(f"Too much extra metadata in snapshot table entry {i}",
                                  errno=errno.EFBIG)
        pos += _ENTRY.size
        rest = bytes(await io.pread(file, start + pos, extra_size + id_len + name_len))
        extra = rest[:extra_size]
        known = extra[:_EXTRA.size].ljust(_EXTRA.size, b"\0")
        vm_large, disk_size, icount = _EXTRA.unpack(known)
        strings = rest[extra_size:]
        pos += len(rest)
        if pos > QCOW_MAX_SNAPSHOTS_SIZE:
            raise InvalidArgument("Snapshot table is too big", errno=errno.EFBIG)
        snapshots.append(SnapshotInfo(
            l1_offset, l1_size,
            strings[:id_len].decode("utf-8", "replace"),
            strings[id_len:].decode("utf-8", "replace"),
            date_sec=sec, date_nsec=nsec, vm_clock_nsec=clock,
            vm_state_size=vm_large if extra_size >= 8 else vm_state,
            disk_size=disk_size if extra_size >= 16 else default_disk_size,
            icount=(icount - (1 << 64) if icount >> 63 else icount) if extra_size >= 24
            else ICOUNT_NONE,
            extra_data_size=extra_size, unknown_extra=extra[_EXTRA.size:]))
    return snapshots, pos


def pack_table(snapshots: list[SnapshotInfo]) -> bytes:
    """The table as qcow2_write_snapshots() writes it: 24 bytes of known extra data (more if
    the entry carried unknown extra data), entries 8-byte aligned, no padding at the end."""
    size = 0
    for sn in snapshots:
        size = -(-size // 8) * 8 + _entry_size(sn)
        if size > QCOW_MAX_SNAPSHOTS_SIZE:
            raise QBlockError("Snapshot table is too big", errno=errno.EFBIG)
    out = bytearray()
    for sn in snapshots:
        out += bytes(-len(out) % 8)
        id_b, name_b = sn.id_str.encode(), sn.name.encode()
        # "If it doesn't fit in 32 bit, older implementations should treat it as a
        # disk-only snapshot rather than truncate the VM state" (qcow2-snapshot.c)
        small_vm = sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0
        out += _ENTRY.pack(sn.l1_table_offset, sn.l1_size, len(id_b), len(name_b),
                           sn.date_sec, sn.date_nsec, sn.vm_clock_nsec, small_vm,
                           max(_EXTRA.size, sn.extra_data_size))
        out += _EXTRA.pack(sn.vm_state_size, sn.disk_size, sn.icount & U64)
        out += sn.unknown_extra + id_b + name_b
    return bytes(out)


def qapi_info(sn: SnapshotInfo) -> dict[str, object]:
    """QAPI SnapshotInfo (block-core.json) of one entry; icount only when known."""
    info: dict[str, object] = {
        "id": sn.id_str, "name": sn.name, "vm-state-size": sn.vm_state_size,
        "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
        "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000}
    if sn.icount != ICOUNT_NONE:
        info["icount"] = sn.icount
    return info
