"""Refcount table, refcount blocks and cluster allocation (QEMU block/qcow2-refcount.c).

qcow2.txt "Host cluster management": every host cluster has a refcount of ``refcount_bits``
(1..64) bits, stored in refcount blocks that the refcount table points at.  Entries of 8 bits
or more are big-endian; narrower entries are packed LSB-first within a byte (qcow2.txt: "bit
offset ... (i * refcount_bits) % 8").  Blocks are cached (cache.py) as native numpy arrays.

The allocator hands out the first free run of clusters from ``free_cluster_index`` like QEMU's
alloc_clusters_noref(); a missing refcount block is created where it can describe itself, and a
full refcount table is replaced by a bigger one placed with its new blocks right after the area
the old table could describe (qcow2_refcount_area()).  Refcount blocks always reach the disk
before anything points at a cluster they count.
"""
from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

import numpy as np

from qblock.block import io
from qblock.drivers.qcow2.cache import Qcow2Cache
from qblock.drivers.qcow2.cluster import c_hex
from qblock.errors import QBlockError

if TYPE_CHECKING:
    from qblock.drivers.qcow2.driver import Qcow2Driver

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00  # qcow2.txt "Refcount table entry": bits 9-63
QCOW_MAX_HOST_OFFSET = 1 << 56  # host offsets are at most 56 bits (L2 entry bits 9-55)

_NATIVE = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def refblock_codec(refcount_bits: int):
    """(decode, encode) between a refcount block on disk and a native array of refcounts."""
    if refcount_bits >= 8:
        disk = np.dtype(_NATIVE[refcount_bits]).newbyteorder(">")
        native = _NATIVE[refcount_bits]

        def decode(raw: bytes) -> np.ndarray:
            return np.frombuffer(raw, dtype=disk).astype(native)

        def encode(table: np.ndarray) -> bytes:
            return table.astype(disk).tobytes()

        return decode, encode
    per_byte = 8 // refcount_bits
    mask = np.uint8((1 << refcount_bits) - 1)
    shifts = (np.arange(per_byte, dtype=np.uint8) * refcount_bits).astype(np.uint8)

    def decode_packed(raw: bytes) -> np.ndarray:
        b = np.frombuffer(raw, dtype=np.uint8)
        return ((b[:, None] >> shifts) & mask).reshape(-1)

    def encode_packed(table: np.ndarray) -> bytes:
        vals = table.reshape(-1, per_byte).astype(np.uint8) << shifts
        return np.bitwise_or.reduce(vals, axis=1).astype(np.uint8).tobytes()

    return decode_packed, encode_packed


class RefcountError(QBlockError):
    """A refcount would underflow or overflow (QEMU's -EINVAL / -ERANGE)."""


class Refcounts:
    """The refcount structures of one open image."""

    def __init__(self, drv: Qcow2Driver, cache_entries: int) -> None:
        self.drv = drv
        h = drv.header
        self.cluster_size = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.refcount_bits = h.refcount_bits
        self.refcount_max = (1 << h.refcount_bits) - 1
        self.rb_entries = h.refcount_block_entries
        self.dtype = _NATIVE[max(8, h.refcount_bits)]
        decode, encode = refblock_codec(h.refcount_bits)
        self.cache = Qcow2Cache("refcount-block", drv.file, cache_entries, self.cluster_size,
                                decode, encode, self._pre_write_block)
        self.table = np.zeros(0, dtype=np.uint64)
        self.table_offset = h.refcount_table_offset
        self.free_cluster_index = 0
        self.free_byte_offset = 0

    async def _pre_write_block(self, offset: int, size: int) -> None:
        await self.drv.overlap_check(offset, size, ignore="refcount_block")

    async def load(self) -> None:
        """Read the refcount table (qcow2_refcount_init)."""
        h = self.drv.header
        size = h.refcount_table_clusters * self.cluster_size // 8
        raw = await io.pread(self.drv.file, h.refcount_table_offset, size * 8)
        self.table = np.frombuffer(bytes(raw), dtype=">u8").astype(np.uint64)
        self.table_offset = h.refcount_table_offset
        self.drv.tables_changed()

    # -- lookups -----------------------------------------------------------------------------

    def _block_offset(self, rt_index: int) -> int:
        """Host offset of refcount block ``rt_index``; 0 if not allocated."""
        if rt_index >= len(self.table):
            return 0
        offset = int(self.table[rt_index]) & REFT_OFFSET_MASK
        if offset % self.cluster_size:
            raise self.drv.corruption(
                f"Refblock offset {c_hex(offset)} unaligned (reftable index: {c_hex(rt_index)})")
        return offset

    async def block(self, rt_index: int) -> np.ndarray | None:
        """The refcount block ``rt_index`` (cached), None if not allocated."""
        offset = self._block_offset(rt_index)
        if not offset:
            return None
        return await self.cache.get(offset)

    async def get_refcount(self, cluster_index: int) -> int:
        tbl = await self.block(cluster_index // self.rb_entries)
        return 0 if tbl is None else int(tbl[cluster_index % self.rb_entries])

    async def get_refcounts(self, cluster_index: int, count: int) -> np.ndarray:
        """Refcounts of ``count`` clusters from ``cluster_index`` as a uint64 array."""
        out = np.zeros(count, dtype=np.uint64)
        pos = 0
        while pos < count:
            c = cluster_index + pos
            rt, i = divmod(c, self.rb_entries)
            n = min(count - pos, self.rb_entries - i)
            tbl = await self.block(rt)
            if tbl is not None:
                out[pos:pos + n] = tbl[i:i + n]
            pos += n
        return out

    # -- allocation --------------------------------------------------------------------------

    async def find_free(self, n: int) -> int:
        """First cluster index of a run of ``n`` free clusters from ``free_cluster_index``."""
        rbe = self.rb_entries
        c = self.free_cluster_index
        rt, i = divmod(c, rbe)
        if i + n <= rbe:
            # The sequential case: the clusters right at the hint are free.
            tbl = await self.block(rt)
            if tbl is None or not np.count_nonzero(tbl[i:i + n]):
                return c
        run_start, run_len = c, 0
        while True:
            rt = c // rbe
            block_end = (rt + 1) * rbe
            tbl = await self.block(rt)
            if tbl is None:
                if run_len == 0:
                    run_start = c
                run_len += block_end - c
                if run_len >= n:
                    return run_start
                c = block_end
                continue
            free = tbl[c - rt * rbe:] == 0
            if run_len:
                lead = len(free) if free.all() else int(np.argmin(free))
                if run_len + lead >= n:
                    return run_start
                if lead < len(free):
                    run_len = 0
                else:
                    run_len += lead
                    c = block_end
                    continue
            edges = np.diff(np.concatenate(([0], free.view(np.int8), [0])))
            starts = np.flatnonzero(edges == 1)
            ends = np.flatnonzero(edges == -1)
            lengths = ends - starts
            big = np.flatnonzero(lengths >= n)
            if len(big):
                return c + int(starts[big[0]])
            if len(starts) and ends[-1] == len(free):
                run_start, run_len = c + int(starts[-1]), int(lengths[-1])
            c = block_end

    async def alloc_clusters(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1); return the host offset."""
        rbe = self.rb_entries
        while True:
            c = await self.find_free(n)
            if (c + n) * self.cluster_size > QCOW_MAX_HOST_OFFSET:
                raise QBlockError("Cannot allocate clusters beyond the maximum host offset",
                                  errno=27)
            self.free_cluster_index = c + n
            missing = [rt for rt in range(c // rbe, (c + n - 1) // rbe + 1)
                       if not self._block_offset(rt)]
            if not missing:
                break
            # QEMU (update_refcount() -> alloc_refcount_block() -> -EAGAIN) puts the block
            # after the run, rolls back what it counted and searches again: from the run's
            # start if clusters before the missing block were counted, else after the block.
            await self._create_block(missing[0])
            if missing[0] * rbe > c:
                self.free_cluster_index = min(self.free_cluster_index, c)
        await self.update(c * self.cluster_size, n * self.cluster_size, 1)
        return c * self.cluster_size

    async def alloc_bytes(self, size: int) -> int:
        """Allocate ``size`` bytes for compressed data, packed into shared clusters.

        qcow2-refcount.c qcow2_alloc_bytes(): every cluster the bytes touch gets +1.
        """
        cs = self.cluster_size
        offset = self.free_byte_offset
        if offset and await self.get_refcount(offset // cs) >= self.refcount_max:
            offset = 0
        free_in_cluster = cs - offset % cs if offset else 0
        if not offset or free_in_cluster < size:
            while True:
                c = await self.find_free(1)
                if self._block_offset(c // self.rb_entries):
                    break
                await self._create_block(c // self.rb_entries)
            self.free_cluster_index = c + 1
            new = c * cs
            if not offset or -(-offset // cs) * cs != new:
                offset = new
        await self.update(offset, size, 1)
        self.free_byte_offset = (offset + size) if (offset + size) % cs else 0
        return offset

    async def _create_block(self, rt_index: int) -> None:
        """Give range ``rt_index`` a refcount block (alloc_refcount_block()).

        The block goes to the first free cluster; it counts itself when it lies in the range
        it describes, else its refcount is set in the block of its own range first.  If the
        refcount table has no entry for it, a bigger table is built (_refcount_area()).
        """
        cs, rbe = self.cluster_size, self.rb_entries
        await self.drv.l2_cache.flush()  # the refcount table write must not overtake L2s
        b = await self.find_free(1)
        self.free_cluster_index = b + 1
        table = np.zeros(rbe, dtype=self.dtype)
        if b // rbe == rt_index:
            table[b - rt_index * rbe] = 1
        else:
            await self.update(b * cs, cs, 1)
            await self.cache.flush()
        await self.cache.get_empty(b * cs, table)
        await self.cache.flush()
        if rt_index < len(self.table):
            self.table[rt_index] = b * cs
            await self._write_table_entry(rt_index)
            return
        start = -(-max(rt_index * rbe + 1, b + 1) // rbe) * rbe
        await self._refcount_area(start, rt_index, b * cs)

    def _refblock_count(self, clusters: int) -> int:
        """Refcount blocks needed to count ``clusters`` plus the refcount structures
        themselves, with QEMU's 50 % headroom (qcow2_refcount_metadata_size())."""
        per_table_cluster = self.cluster_size // 8
        rbe = self.rb_entries
        table = blocks = n = 0
        generous = True
        while True:
            last = n
            blocks = -(-(clusters + table + blocks) // rbe)
            table = -(-blocks // per_table_cluster)
            n = clusters + blocks + table
            if n == last and generous:
                clusters += -(-table // 2)
                n = 0
                generous = False
            elif n == last:
                return blocks

    async def _refcount_area(self, start: int, new_index: int, new_offset: int) -> None:
        """qcow2_refcount_area(): a bigger refcount table, and the blocks that count it,
        placed from cluster ``start`` (past everything in use); then the header is switched
        over and the old table freed."""
        cs, rbe = self.cluster_size, self.rb_entries
        total = self._refblock_count(start)
        area_index = start // rbe
        per_cluster = cs // 8
        table_size = -(-(total + -(-total // 2)) // per_cluster) * per_cluster
        if table_size * 8 > 8 * 1024 * 1024:
            raise QBlockError("Refcount table too large", errno=27)
        table_clusters = table_size * 8 // cs
        new_table = np.zeros(table_size, dtype=np.uint64)
        used = np.flatnonzero(self.table)
        keep = min(table_size, int(used[-1]) + 1 if len(used) else 0)
        new_table[:keep] = self.table[:keep]
        new_table[new_index] = new_offset
        additional = int(np.count_nonzero(new_table[area_index:total] == 0))
        table_offset = (start + additional) * cs
        end = table_offset + table_clusters * cs
        block_offset = start * cs
        for i in range(area_index, total):
            if new_table[i]:
                block = await self.cache.get(int(new_table[i]))
                offset = int(new_table[i])
            else:
                block = await self.cache.get_empty(block_offset,
                                                   np.zeros(rbe, dtype=self.dtype))
                offset = new_table[i] = block_offset
                block_offset += cs
            first = i * rbe * cs
            if first < end:
                j0 = max(0, (start * cs - first) // cs)
                j1 = min((end - first) // cs, rbe)
                block[j0:j1] = 1
                self.cache.mark_dirty(int(offset), block)
        await self.cache.flush()
        await self.drv.overlap_check(table_offset, table_size * 8, ignore="")
        await io.pwritev(self.drv.file, table_offset, new_table.astype(">u8").tobytes())
        await io.flush(self.drv.file.node)
        old_offset, old_size = self.table_offset, len(self.table)
        await self.drv.update_header_fields(refcount_table_offset=table_offset,
                                            refcount_table_clusters=table_clusters)
        self.table = new_table
        self.table_offset = table_offset
        self.drv.tables_changed()
        await self.update(old_offset, old_size * 8, -1, "other")

    async def shrink_table(self) -> None:
        """qcow2_shrink_reftable(): drop refcount blocks that count nothing but themselves.

        The new table is written (and flushed) before the dropped blocks are freed.
        """
        cs, rbe = self.cluster_size, self.rb_entries
        keep = self.table.copy()
        for rt in np.flatnonzero(self.table).tolist():
            offset = self._block_offset(rt)
            block = await self.cache.get(offset)
            own = offset // cs - rt * rbe
            others = block if not 0 <= own < rbe else np.delete(block, own)
            if not others.any():
                keep[rt] = 0
        if np.array_equal(keep, self.table):
            return
        await self.drv.overlap_check(self.table_offset, len(keep) * 8, ignore="refcount_table")
        await io.pwritev(self.drv.file, self.table_offset, keep.astype(">u8").tobytes())
        await io.flush(self.drv.file.node)
        for rt in np.flatnonzero(self.table != keep).tolist():
            await self.free(int(self.table[rt]) & REFT_OFFSET_MASK, cs)
            self.table[rt] = 0
        self.drv.tables_changed()

    async def _write_table_entry(self, rt_index: int) -> None:
        """Write one refcount table entry and make it durable."""
        self.drv.tables_changed()
        offset = self.table_offset + rt_index * 8
        await self.drv.overlap_check(offset, 8, ignore="refcount_table")
        await io.pwritev(self.drv.file, offset, struct.pack(">Q", int(self.table[rt_index])))
        await io.flush(self.drv.file.node)

    # -- updates -----------------------------------------------------------------------------

    async def update(self, offset: int, length: int, addend: int,
                     discard: str = "never") -> None:
        """Add ``addend`` to the refcount of every cluster touching [offset, offset+length).

        qcow2-refcount.c update_refcount(): all blocks are checked before any is changed,
        so a failing update changes nothing.  Clusters that become free are discarded in the
        file when the ``discard`` kind (request, snapshot, other, always) is passed through.
        """
        if length <= 0 or addend == 0:
            return
        cs, rbe = self.cluster_size, self.rb_entries
        first = offset // cs
        last = (offset + length - 1) // cs
        if addend < 0:
            # An L2 entry that dropped this cluster must be on disk before its refcount drops.
            await self.cache.set_dependency(self.drv.l2_cache)
        parts = []
        c = first
        while c <= last:
            rt, i = divmod(c, rbe)
            n = min(last + 1 - c, rbe - i)
            block_offset = self._block_offset(rt)
            if not block_offset:
                if addend < 0:
                    raise RefcountError(f"Refcount of cluster {c_hex(c)} would become negative",
                                        errno=errno.EINVAL)
                await self._create_block(rt)
                continue
            tbl = await self.cache.get(block_offset)
            view = tbl[i:i + n]
            if addend > 0 and view.max() > self.refcount_max - addend:
                raise RefcountError("Refcount overflow", errno=34)
            if addend < 0 and view.min() < -addend:
                raise RefcountError(f"Refcount of cluster {c_hex(c)} would become negative",
                                    errno=errno.EINVAL)
            parts.append((block_offset, tbl, i, n, c))
            c += n
        freed_all = []
        for block_offset, tbl, i, n, c in parts:
            if addend > 0:
                tbl[i:i + n] += self.dtype(addend)
            else:
                tbl[i:i + n] -= self.dtype(-addend)
                freed = np.flatnonzero(tbl[i:i + n] == 0)
                if len(freed):
                    self.free_cluster_index = min(self.free_cluster_index, c + int(freed[0]))
                    offsets = (c + freed.astype(np.int64)) * cs
                    self.drv.clusters_freed(offsets)
                    freed_all.append(offsets)
            self.cache.mark_dirty(block_offset, tbl)
        if freed_all:
            await self.drv.discard_freed(np.concatenate(freed_all), discard)

    async def free(self, offset: int, length: int, discard: str = "other") -> None:
        """Drop one reference to the clusters of a host range (qcow2_free_clusters)."""
        await self.update(offset, length, -1, discard)
