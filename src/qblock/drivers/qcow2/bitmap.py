"""Persistent dirty bitmaps in qcow2 (qcow2.txt "Bitmaps", QEMU block/qcow2-bitmap.c).

Open loads every bitmap of the directory into ``node.dirty_bitmaps``; one already ``in_use``
was not saved consistently and is loaded inconsistent, without data.  A writable open sets
``in_use`` on disk for the others (in-place directory update); close writes their data, new
tables and a new directory with ``in_use`` cleared, then frees the old tables.
"""
from __future__ import annotations

import dataclasses
import struct
from typing import TYPE_CHECKING

import numpy as np

from qblock.block import io
from qblock.block.dirty_bitmap import CHECK_DEFAULT, DirtyBitmap, check_bitmap
from qblock.drivers.qcow2.header import (AUTOCLEAR_BITMAPS, QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
                                         QCOW2_MAX_BITMAPS, BitmapsExt)
from qblock.errors import ImageCorrupt, InvalidArgument

if TYPE_CHECKING:
    from qblock.drivers.qcow2.driver import Qcow2Driver

_ENTRY = struct.Struct(">QIIBBHI")  # qcow2.txt "Bitmap directory entry", 24 bytes
BME_FLAG_IN_USE = 1
BME_FLAG_AUTO = 2
BME_TYPE_DIRTY_TRACKING = 1
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_TABLE_ENTRY_RESERVED = 0xFF000000000001FE  # qcow2.txt "Bitmap table"
BME_TABLE_ENTRY_OFFSET = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_ALL_ONES = 1


@dataclasses.dataclass
class DirEntry:
    """One bitmap directory entry."""

    table_offset: int
    table_size: int
    flags: int
    gran_bits: int
    name: str
    type: int = BME_TYPE_DIRTY_TRACKING
    extra: bytes = b""

    def pack(self) -> bytes:
        name = self.name.encode()
        raw = _ENTRY.pack(self.table_offset, self.table_size, self.flags, self.type,
                          self.gran_bits, len(name), len(self.extra)) + self.extra + name
        return raw + bytes(-len(raw) % 8)


def parse_directory(raw: bytes, count: int) -> list[DirEntry]:
    """The entries of a directory (qcow2.txt "Bitmap directory")."""
    entries = []
    pos = 0
    for _ in range(count):
        if pos + _ENTRY.size > len(raw):
            raise ImageCorrupt("Bitmap directory is corrupted")
        toff, tsize, flags, typ, gbits, name_size, extra = _ENTRY.unpack_from(raw, pos)
        start = pos + _ENTRY.size
        if start + extra + name_size > len(raw):
            raise ImageCorrupt("Bitmap directory is corrupted")
        name = raw[start + extra:start + extra + name_size].decode("utf-8", "replace")
        entries.append(DirEntry(toff, tsize, flags, gbits, name, typ,
                                raw[start:start + extra]))
        pos += -(-(_ENTRY.size + extra + name_size) // 8) * 8
    return entries


def table_size(size: int, granularity: int, cluster_size: int) -> int:
    """Bitmap table entries: one per cluster of serialized data (qcow2.txt "Bitmap table")."""
    data_bytes = -(-(-(-size // granularity)) // 8)
    return -(-data_bytes // cluster_size)


def check_constraints(drv: Qcow2Driver, name: str, granularity: int) -> None:
    """check_constraints_on_bitmap() of qcow2-bitmap.c."""
    size = drv.header.size
    gran_bits = granularity.bit_length() - 1
    if len(name.encode()) > BME_MAX_NAME_SIZE:
        raise InvalidArgument(f"Name length exceeds maximum ({BME_MAX_NAME_SIZE} characters)")
    if gran_bits > BME_MAX_GRANULARITY_BITS:
        raise InvalidArgument(f"Granularity exceeds maximum "
                              f"({1 << BME_MAX_GRANULARITY_BITS} bytes)")
    if gran_bits < BME_MIN_GRANULARITY_BITS:
        raise InvalidArgument(f"Granularity is under minimum "
                              f"({1 << BME_MIN_GRANULARITY_BITS} bytes)")
    if (size > BME_MAX_PHYS_SIZE * 8 * granularity
            or size > BME_MAX_TABLE_SIZE * drv.header.cluster_size * 8 * granularity):
        raise InvalidArgument("Too much space will be occupied by the bitmap. "
                              "Use larger granularity")


def can_store_new(drv: Qcow2Driver, name: str, granularity: int) -> None:
    """qcow2_co_can_store_new_dirty_bitmap(); raises with QEMU's reason."""
    if drv.header.version < 3:
        raise InvalidArgument("Cannot store dirty bitmaps in qcow2 v2 files")
    check_constraints(drv, name, granularity)
    if len(drv.bitmap_dir) >= QCOW2_MAX_BITMAPS:
        raise InvalidArgument("Maximum number of persistent bitmaps is already reached")
    size = sum(len(e.pack()) for e in drv.bitmap_dir) + len(
        DirEntry(0, 0, 0, 0, name).pack())
    if drv.bitmap_dir and size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        raise InvalidArgument("Not enough space in the bitmap directory")


def truncate_check(drv: Qcow2Driver) -> None:
    """qcow2_truncate_bitmaps_check(): every stored bitmap must be usable to follow a resize."""
    on_disk = {e.name for e in drv.bitmap_dir}
    for bitmap in drv.node.dirty_bitmaps:
        if bitmap.name in on_disk:
            check_bitmap(bitmap, CHECK_DEFAULT)


# -- open ------------------------------------------------------------------------------------

async def load_bitmaps(drv: Qcow2Driver) -> None:
    """qcow2_load_dirty_bitmaps(): every bitmap of the image into node.dirty_bitmaps."""
    h = drv.header
    ext = h.bitmaps
    drv.bitmap_dir = []
    if ext is None or not h.autoclear_features & AUTOCLEAR_BITMAPS:
        return
    raw = bytes(await io.pread(drv.file, ext.bitmap_directory_offset,
                               ext.bitmap_directory_size))
    entries = parse_directory(raw, ext.nb_bitmaps)
    cs = h.cluster_size
    for e in entries:
        if e.extra:
            raise InvalidArgument("Bitmap extra data is not supported")
        if (e.type != BME_TYPE_DIRTY_TRACKING
                or not BME_MIN_GRANULARITY_BITS <= e.gran_bits <= BME_MAX_GRANULARITY_BITS
                or not e.table_offset or e.table_offset % cs
                or e.table_size != table_size(h.size, 1 << e.gran_bits, cs)):
            raise InvalidArgument(f"Bitmap '{e.name}' doesn't satisfy the constraints")
    drv.bitmap_dir = entries
    writable = not drv.node.read_only
    for e in entries:
        bitmap = DirtyBitmap(e.name, h.size, 1 << e.gran_bits, persistent=True,
                             enabled=bool(e.flags & BME_FLAG_AUTO))
        if e.flags & BME_FLAG_IN_USE:
            bitmap.inconsistent = True
        else:
            await _load_data(drv, e, bitmap)
        bitmap.readonly = not writable
        drv.node.dirty_bitmaps.append(bitmap)
    if writable and any(not e.flags & BME_FLAG_IN_USE for e in entries):
        for e in entries:
            e.flags |= BME_FLAG_IN_USE
        await _rewrite_directory_in_place(drv)


async def _read_table(drv: Qcow2Driver, e: DirEntry) -> np.ndarray:
    raw = await io.pread(drv.file, e.table_offset, e.table_size * 8)
    table = np.frombuffer(bytes(raw), dtype=">u8").astype(np.uint64)
    bad = (table & np.uint64(BME_TABLE_ENTRY_RESERVED)) != 0
    bad |= ((table & np.uint64(BME_TABLE_ENTRY_OFFSET)) != 0) & (table & np.uint64(1) != 0)
    if bad.any():
        raise ImageCorrupt(f"Bitmap '{e.name}' has a corrupted bitmap table")
    return table


async def _load_data(drv: Qcow2Driver, e: DirEntry, bitmap: DirtyBitmap) -> None:
    """load_bitmap_data(): data clusters in contiguous runs, all-ones entries as 0xFF."""
    cs = drv.header.cluster_size
    table = await _read_table(drv, e)
    offsets = (table & np.uint64(BME_TABLE_ENTRY_OFFSET)).astype(np.int64)
    ones = np.flatnonzero((offsets == 0) & (table == np.uint64(BME_TABLE_ENTRY_ALL_ONES)))
    for j in ones.tolist():
        bitmap.deserialize(b"\xff" * cs, j * cs)
    data = np.flatnonzero(offsets)
    if not len(data):
        return
    host = offsets[data]
    breaks = np.flatnonzero((np.diff(host) != cs) | (np.diff(data) != 1)) + 1
    for run in np.split(np.arange(len(data)), breaks):
        j, start = int(data[run[0]]), int(host[run[0]])
        bitmap.deserialize(await io.pread(drv.file, start, len(run) * cs), j * cs)


async def _rewrite_directory_in_place(drv: Qcow2Driver) -> None:
    """update_ext_header_and_dir_in_place(): clear the autoclear bit (synced), rewrite the
    directory, set the bit again, so a crash in between leaves the bitmaps untrusted."""
    h = drv.header
    ext = h.bitmaps
    assert ext is not None
    directory = b"".join(e.pack() for e in drv.bitmap_dir)
    h.autoclear_features &= ~AUTOCLEAR_BITMAPS
    await drv.update_header()
    await io.flush(drv.file.node)
    await drv.overlap_check(ext.bitmap_directory_offset, len(directory),
                            ignore="bitmap_directory")
    await io.pwritev(drv.file, ext.bitmap_directory_offset, directory)
    await io.flush(drv.file.node)
    h.autoclear_features |= AUTOCLEAR_BITMAPS
    await drv.update_header()
    await io.flush(drv.file.node)


# -- directory and table changes -------------------------------------------------------------

async def _write_new_directory(drv: Qcow2Driver) -> None:
    """update_ext_header_and_dir(): the directory in new clusters, then the header; the old
    directory is freed after the header points to the new one."""
    h = drv.header
    old = h.bitmaps if h.autoclear_features & AUTOCLEAR_BITMAPS else None
    directory = b"".join(e.pack() for e in drv.bitmap_dir)
    if drv.bitmap_dir:
        offset = await drv.refcounts.alloc_clusters(-(-len(directory) // h.cluster_size))
        await drv.overlap_check(offset, len(directory))
        await io.pwritev(drv.file, offset, directory)
        await drv.flush_caches()
        h.bitmaps = BitmapsExt(len(drv.bitmap_dir), len(directory), offset)
        h.autoclear_features |= AUTOCLEAR_BITMAPS
    else:
        h.bitmaps = None
        h.autoclear_features &= ~AUTOCLEAR_BITMAPS
    await drv.update_header()
    await io.flush(drv.file.node)
    if old is not None:
        await drv.refcounts.free(old.bitmap_directory_offset, old.bitmap_directory_size)


async def _free_table(drv: Qcow2Driver, e: DirEntry) -> None:
    """free_bitmap_clusters(): the data clusters of a table, then the table itself."""
    cs = drv.header.cluster_size
    table = await _read_table(drv, e)
    hosts = np.sort((table & np.uint64(BME_TABLE_ENTRY_OFFSET)).astype(np.int64))
    hosts = hosts[hosts != 0]
    if len(hosts):
        for run in np.split(hosts, np.flatnonzero(np.diff(hosts) != cs) + 1):
            # qcow2-bitmap.c clear_bitmap_table(): data clusters go with QCOW2_DISCARD_ALWAYS
            await drv.refcounts.free(int(run[0]), len(run) * cs, "always")
    await drv.refcounts.free(e.table_offset, e.table_size * 8)


async def remove_persistent(drv: Qcow2Driver, name: str) -> None:
    """qcow2_co_remove_persistent_dirty_bitmap(): drop the entry now, free its clusters."""
    entry = next((e for e in drv.bitmap_dir if e.name == name), None)
    if entry is None:
        return  # added since the open and never stored
    async with drv.lock:
        drv.bitmap_dir.remove(entry)
        await _write_new_directory(drv)
        await _free_table(drv, entry)
        await drv.flush_caches()


async def _write_bitmap(drv: Qcow2Driver, bitmap: DirtyBitmap) -> DirEntry:
    """store_bitmap(): data clusters only for chunks with set bits, in one write."""
    cs = drv.header.cluster_size
    data = bitmap.serialize()
    n = table_size(bitmap.size, bitmap.granularity, cs)
    padded = np.zeros(n * cs, dtype=np.uint8)
    padded[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    chunks = padded.reshape(n, cs) if n else padded.reshape(0, cs)
    used = np.flatnonzero(chunks.any(axis=1))
    table = np.zeros(n, dtype=">u8")
    if len(used):
        start = await drv.refcounts.alloc_clusters(len(used))
        await drv.overlap_check(start, len(used) * cs)
        await io.pwritev(drv.file, start, memoryview(chunks[used].tobytes()))
        table[used] = start + np.arange(len(used), dtype=np.int64) * cs
    table_bytes = table.tobytes()
    table_offset = await drv.refcounts.alloc_clusters(max(1, -(-len(table_bytes) // cs)))
    await drv.overlap_check(table_offset, len(table_bytes))
    await io.pwritev(drv.file, table_offset, table_bytes)
    return DirEntry(table_offset, n, BME_FLAG_AUTO if bitmap.enabled else 0,
                    bitmap.gran_bits, bitmap.name or "")


async def store_bitmaps(drv: Qcow2Driver) -> None:
    """qcow2_store_persistent_dirty_bitmaps(): on close of a writable node.

    Inconsistent bitmaps keep their entry (still in_use); the others get new tables and a
    new directory, after which the old tables are freed.
    """
    node = drv.node
    persistent = [b for b in node.dirty_bitmaps
                  if b.persistent and not b.readonly and not b.inconsistent]
    if not persistent:
        return
    on_disk = {e.name: e for e in drv.bitmap_dir}
    for bitmap in persistent:
        old = on_disk.get(bitmap.name or "")
        if old is not None and not old.flags & BME_FLAG_IN_USE:
            raise InvalidArgument(f"Bitmap '{bitmap.name}' already exists in the image")
    replaced = []
    new_dir = [e for e in drv.bitmap_dir if e.name not in {b.name for b in persistent}]
    for bitmap in persistent:
        new_dir.append(await _write_bitmap(drv, bitmap))
        if bitmap.name in on_disk:
            replaced.append(on_disk[bitmap.name])
    await drv.flush_caches()
    drv.bitmap_dir = new_dir
    await _write_new_directory(drv)
    for e in replaced:
        await _free_table(drv, e)
