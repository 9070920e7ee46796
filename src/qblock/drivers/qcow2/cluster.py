"""Guest-to-host mapping: L1 table, L2 slices, cluster types (QEMU block/qcow2-cluster.c).

qcow2.txt "Cluster mapping": the L1 table points at L2 tables; an L2 entry (64 bits, or 128
with extended L2) describes one guest cluster.  Lookups classify a whole stretch of entries with
numpy and return *runs*: maximal pieces of a request that have one type and, for data, one
contiguous host range, so that a read of many clusters becomes one request per host run.

Types (per cluster, or per subcluster with extended L2):
UNALLOC (read from backing), ZERO (reads zeroes), DATA (host offset valid), COMPRESSED.
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
from typing import TYPE_CHECKING

import numpy as np

from qblock.block import io
from qblock.errors import QBlockError

if TYPE_CHECKING:
    from qblock.drivers.qcow2.driver import Qcow2Driver

# qcow2.txt "Cluster mapping" / block/qcow2.h
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF
L2_BITMAP_ALL_ZEROES = 0xFFFFFFFF << 32

UNALLOC, ZERO, DATA, COMPRESSED = 0, 1, 2, 3


def c_hex(n: int) -> str:
    """C's ``%#x``: like hex() but a bare 0 for zero, as in QEMU's messages."""
    return "0" if n == 0 else hex(n)

_U64 = np.uint64
_OFFSET_MASK = _U64(L2E_OFFSET_MASK)
# the bits of a standard L2 entry that decide its type and host offset (not COPIED)
_RUN_MASK = _U64(L2E_OFFSET_MASK | OFLAG_COMPRESSED | OFLAG_ZERO)
_RUN_PROBE = 64  # entries lookup() compares before comparing the rest of a slice


@dataclasses.dataclass(slots=True)
class Run:
    """``length`` guest bytes from ``offset`` of one type (and one host range for DATA).

    ``host`` is the host offset of ``offset`` for DATA (and for ZERO with a preallocated host
    cluster, 0 otherwise); ``entry`` is the L2 entry for COMPRESSED.
    """

    kind: int
    offset: int
    length: int
    host: int = 0
    entry: int = 0


@dataclasses.dataclass(slots=True)
class Slice:
    """One cached L2 slice: its host offset, table and the guest cluster of its entry 0."""

    offset: int
    table: np.ndarray
    first_cluster: int


def compressed_geometry(cluster_bits: int) -> tuple[int, int, int]:
    """(csize_shift, csize_mask, offset_mask) of compressed descriptors (qcow2.txt)."""
    shift = 62 - (cluster_bits - 8)
    return shift, (1 << (cluster_bits - 8)) - 1, (1 << shift) - 1


class ClusterMap:
    """The active L1 table and the L2 slices of one open image."""

    def __init__(self, drv: Qcow2Driver) -> None:
        self.drv = drv
        h = drv.header
        self.cs = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.extended = h.extended_l2
        self.entry_size = h.l2_entry_size
        self.l2_entries = h.l2_entries
        self.upc = h.subclusters_per_cluster  # units (subclusters) per cluster
        self.unit = h.subcluster_size
        self.v3 = h.version >= 3
        self.csize_shift, self.csize_mask, self.coffset_mask = compressed_geometry(
            h.cluster_bits)
        self.l1 = np.zeros(0, dtype=_U64)
        self.l1_offset = 0

    # -- configuration -----------------------------------------------------------------------

    def setup_slices(self, slice_bytes: int) -> None:
        self.slice_entries = slice_bytes // self.entry_size
        # host offset steps of contiguous clusters, for comparing a slice's entries at once
        self._steps = np.arange(self.slice_entries, dtype=_U64) * _U64(self.cs)

    def decode_l2(self, raw: bytes) -> np.ndarray:
        table = np.frombuffer(raw, dtype=">u8").astype(_U64)
        return table.reshape(-1, 2) if self.extended else table

    @staticmethod
    def encode_l2(table: np.ndarray) -> bytes:
        return table.astype(">u8").tobytes()

    async def load_l1(self) -> None:
        h = self.drv.header
        raw = await io.pread(self.drv.file, h.l1_table_offset, h.l1_size * 8)
        self.l1 = np.frombuffer(bytes(raw), dtype=">u8").astype(_U64)
        self.l1_offset = h.l1_table_offset
        self.drv.tables_changed()

    # -- L1 ----------------------------------------------------------------------------------

    def _l2_offset(self, l1_index: int) -> int:
        """Host offset of the L2 table of ``l1_index``; 0 if none (corruption if unaligned)."""
        if l1_index >= len(self.l1):
            return 0
        offset = int(self.l1[l1_index]) & L1E_OFFSET_MASK
        if offset % self.cs:
            raise self.drv.corruption(
                f"L2 table offset {c_hex(offset)} unaligned (L1 index: {c_hex(l1_index)})")
        return offset

    async def write_l1_entry(self, l1_index: int) -> None:
        """Write the 512-byte aligned group of L1 entries around ``l1_index`` and sync."""
        self.drv.tables_changed()
        start = l1_index - l1_index % 64
        end = min(start + 64, len(self.l1))
        offset = self.l1_offset + start * 8
        await self.drv.overlap_check(offset, (end - start) * 8, ignore="active_l1")
        await io.pwritev(self.drv.file, offset, self.l1[start:end].astype(">u8").tobytes())
        await io.flush(self.drv.file.node)

    async def grow_l1(self, min_size: int, exact: bool) -> None:
        """qcow2_grow_l1_table(): a bigger L1 at a new place; header switched; old freed."""
        old_size = len(self.l1)
        if min_size <= old_size:
            return
        if exact:
            new_size = min_size
        else:
            new_size = max(old_size, 1)
            while min_size > new_size:
                new_size = -(-new_size * 3 // 2)
        if new_size * 8 > 32 * 1024 * 1024:
            raise QBlockError("Active L1 table too large", errno=27)
        new_bytes = new_size * 8
        new_table = np.zeros(new_size, dtype=_U64)
        new_table[:old_size] = self.l1
        refs = self.drv.refcounts
        new_offset = await refs.alloc_clusters(-(-new_bytes // self.cs))
        await refs.cache.flush()
        await self.drv.overlap_check(new_offset, new_bytes, ignore="")
        await io.pwritev(self.drv.file, new_offset, new_table.astype(">u8").tobytes())
        await io.flush(self.drv.file.node)
        old_offset = self.l1_offset
        await self.drv.update_header_fields(l1_size=new_size, l1_table_offset=new_offset)
        self.l1 = new_table
        self.l1_offset = new_offset
        self.drv.tables_changed()
        if old_size:
            await refs.free(old_offset, old_size * 8)

    # -- L2 slices ---------------------------------------------------------------------------

    def _slice_key(self, l2_offset: int, guest_cluster: int) -> tuple[int, int]:
        l2_index = guest_cluster % self.l2_entries
        first = guest_cluster - l2_index % self.slice_entries
        slice_index = l2_index // self.slice_entries
        return l2_offset + slice_index * self.slice_entries * self.entry_size, first

    async def get_slice(self, guest_cluster: int) -> Slice | None:
        """The L2 slice mapping ``guest_cluster``; None when its L2 table is unallocated."""
        l2_offset = self._l2_offset(guest_cluster // self.l2_entries)
        if not l2_offset:
            return None
        key, first = self._slice_key(l2_offset, guest_cluster)
        return Slice(key, await self.drv.l2_cache.get(key), first)

    async def get_writable_slice(self, guest_cluster: int) -> Slice:
        """Like get_slice(), allocating or copying the L2 table first (get_cluster_table())."""
        l1_index = guest_cluster // self.l2_entries
        if l1_index >= len(self.l1):
            await self.grow_l1(l1_index + 1, exact=False)
        l1e = int(self.l1[l1_index])
        old = self._l2_offset(l1_index)
        if old and l1e & OFLAG_COPIED:
            slc = await self.get_slice(guest_cluster)
            assert slc is not None
            return slc
        await self._allocate_l2(l1_index, old)
        if old:
            await self.drv.refcounts.free(old, self.cs)
        slc = await self.get_slice(guest_cluster)
        assert slc is not None
        return slc

    async def _allocate_l2(self, l1_index: int, old: int) -> None:
        """l2_allocate(): new L2 table (a copy of a shared one), flushed before the L1 entry."""
        drv = self.drv
        new = await drv.refcounts.alloc_clusters(1)
        await drv.refcounts.cache.flush()
        slice_bytes = self.slice_entries * self.entry_size
        for k in range(self.cs // slice_bytes):
            if old:
                table = (await drv.l2_cache.get(old + k * slice_bytes)).copy()
            else:
                shape = (self.slice_entries, 2) if self.extended else (self.slice_entries,)
                table = np.zeros(shape, dtype=_U64)
            await drv.l2_cache.get_empty(new + k * slice_bytes, table)
        await drv.l2_cache.flush()
        self.l1[l1_index] = _U64(new | OFLAG_COPIED)
        await self.write_l1_entry(l1_index)

    # -- classification ----------------------------------------------------------------------

    def classify(self, entries: np.ndarray, slice_offset: int,
                 first_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Per unit (subcluster or cluster): (type, host offset) arrays for ``entries``.

        Raises the corruption error for entries QEMU refuses (qcow2_get_subcluster_type()
        INVALID, unaligned host offsets).
        """
        e = entries[:, 0] if self.extended else entries
        off = e & _OFFSET_MASK
        comp = (e & _U64(OFLAG_COMPRESSED)) != 0
        if self.extended:
            bm = entries[:, 1]
            bits = np.arange(32, dtype=_U64)
            alloc = ((bm[:, None] >> bits) & _U64(1)).astype(bool)
            zero = ((bm[:, None] >> (bits + _U64(32))) & _U64(1)).astype(bool)
            bad = ~comp & (((bm >> _U64(32)) & bm) != 0) | (~comp & (off == 0) & alloc.any(1))
            self._check_entries(bad, off, comp, slice_offset, first_index)
            kind = np.where(zero, ZERO, np.where(alloc, DATA, UNALLOC)).astype(np.int8)
            kind[comp] = COMPRESSED
            host = off[:, None] + bits * _U64(self.unit)
            host = np.where((off[:, None] != 0) & (kind != COMPRESSED), host, _U64(0))
            return kind.reshape(-1), host.reshape(-1)
        zero_flag = (e & _U64(OFLAG_ZERO)) != 0
        self._check_entries(np.zeros(len(e), bool), off, comp, slice_offset, first_index)
        kind = np.where(comp, COMPRESSED,
                        np.where(zero_flag, ZERO, np.where(off != 0, DATA, UNALLOC)))
        kind = kind.astype(np.int8)
        return kind, np.where(comp, _U64(0), off)

    def _check_entries(self, bad: np.ndarray, off: np.ndarray, comp: np.ndarray,
                       slice_offset: int, first_index: int) -> None:
        unaligned = ~comp & ((off & _U64(self.cs - 1)) != 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self.drv.corruption(f"Invalid cluster entry found (L2 offset: "
                                      f"{c_hex(self._l2_base(slice_offset))}, L2 index: "
                                      f"{c_hex(first_index + i)})")
        if unaligned.any():
            i = int(np.flatnonzero(unaligned)[0])
            raise self.drv.corruption(f"Cluster allocation offset {c_hex(int(off[i]))} unaligned "
                                      f"(L2 offset: {c_hex(self._l2_base(slice_offset))}, "
                                      f"L2 index: {c_hex(first_index + i)})")

    def _l2_base(self, slice_offset: int) -> int:
        return slice_offset - slice_offset % self.cs

    async def lookup(self, offset: int, length: int, *, first_only: bool = False) -> list[Run]:
        """Runs covering [offset, offset+length), at most up to the end of one L2 slice.

        ``first_only`` stops after the first run (block status needs no more).
        """
        cs = self.cs
        gc = offset // cs
        slc = await self.get_slice(gc)
        idx = gc % self.slice_entries
        in_slice = self.slice_entries - idx
        length = min(length, in_slice * cs - offset % cs)
        if slc is None:
            return [Run(UNALLOC, offset, length)]
        last = (offset + length - 1) // cs
        if last == gc and not self.extended:
            return [self._lookup_one(int(slc.table[idx]), offset, length, slc, idx)]
        entries = slc.table[idx:idx + last - gc + 1]
        if not self.extended:
            first = int(entries[0])
            off = first & L2E_OFFSET_MASK
            if not first & OFLAG_COMPRESSED and off % cs == 0:
                # Fast path: the run of the first cluster, found with one table comparison.
                # Clusters continue it while they have its type and (with a host cluster)
                # the next host cluster, like count_contiguous_subclusters().
                n = self._run_entries(entries, first & int(_RUN_MASK), bool(off))
                if n == len(entries) or first_only:
                    run_len = length if n == len(entries) else (gc + n) * cs - offset
                    return [self._lookup_one(first, offset, run_len, slc, idx)]
        kind, host = self.classify(entries, slc.offset, idx + self._slice_index_base(slc))
        unit = self.unit
        u0 = offset // unit - gc * self.upc
        u1 = (offset + length - 1) // unit - gc * self.upc + 1
        kind = kind[u0:u1]
        host = host[u0:u1]
        units = np.arange(u0, u1)
        brk = (kind[1:] != kind[:-1])
        # Like QEMU's count_contiguous_subclusters(): units with a host offset continue a
        # run only if their host offsets are contiguous too.
        has_host = host != 0
        brk |= has_host[1:] != has_host[:-1]
        brk |= has_host[1:] & (host[1:] != host[:-1] + _U64(unit))
        brk |= (kind[1:] == COMPRESSED) & (units[1:] // self.upc != units[:-1] // self.upc)
        starts = np.concatenate(([0], np.flatnonzero(brk) + 1))
        runs = []
        base = gc * cs
        end = offset + length
        kinds = kind[starts].tolist()
        hosts = host[starts].tolist()
        ustarts = (units[starts]).tolist()
        for j, (k, h, u) in enumerate(zip(kinds, hosts, ustarts)):
            run_start = max(offset, base + u * unit)
            run_end = end if j + 1 == len(ustarts) else base + ustarts[j + 1] * unit
            run = Run(k, run_start, run_end - run_start)
            if h:
                run.host = h + (run_start - base - u * unit)
            elif k == COMPRESSED:
                cl = u // self.upc
                e = entries[cl, 0] if self.extended else entries[cl]
                run.entry = int(e)
            runs.append(run)
            if first_only:
                break
        return runs

    def _run_entries(self, entries: np.ndarray, first: int, has_host: bool) -> int:
        """How many of ``entries`` continue the run of the first one (type bits ``first``,
        host clusters following each other when ``has_host``).

        A short window is compared first: runs are usually short, and comparing a whole
        slice for each block-status call would dominate a sequential scan.
        """
        start = 0
        window = _RUN_PROBE
        while start < len(entries):
            chunk = entries[start:start + window]
            expect = _U64(first)
            if has_host:
                expect = expect + self._steps[start:start + len(chunk)]
            # the first mismatch, found without argmin(), which releases the GIL and may
            # wait to get it back from an I/O thread
            brk = ((chunk & _RUN_MASK) == expect).tobytes().find(0)
            if brk >= 0:
                return start + brk
            start += len(chunk)
            window = len(entries)
        return len(entries)

    def _lookup_one(self, e: int, offset: int, length: int, slc: Slice, idx: int) -> Run:
        """lookup() within one cluster of a standard L2 table, without numpy (hot path)."""
        if e & OFLAG_COMPRESSED:
            return Run(COMPRESSED, offset, length, entry=e)
        off = e & L2E_OFFSET_MASK
        if off % self.cs:
            self._check_entries(np.zeros(1, bool), np.array([off], dtype=_U64),
                                np.zeros(1, bool), slc.offset,
                                idx + self._slice_index_base(slc))
        host = off + offset % self.cs if off else 0
        if e & OFLAG_ZERO:
            return Run(ZERO, offset, length, host)
        return Run(DATA if off else UNALLOC, offset, length, host)

    def _slice_index_base(self, slc: Slice) -> int:
        return slc.first_cluster % self.l2_entries

    def compressed_extent(self, entry: int) -> tuple[int, int]:
        """(host byte offset, byte count to read) of a compressed cluster's data."""
        coffset = entry & self.coffset_mask
        nb_sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return coffset, nb_sectors * 512 - (coffset & 511)

    def compressed_entry(self, coffset: int, csize: int) -> int:
        """The L2 entry of compressed data at ``coffset`` of ``csize`` bytes."""
        nb = ((coffset + csize - 1) >> 9) - (coffset >> 9)
        return OFLAG_COMPRESSED | (nb << self.csize_shift) | coffset

    # -- writes ------------------------------------------------------------------------------

    async def in_place_runs(self, offset: int, length: int) -> list[Run] | None:
        """Host runs for a write that needs no metadata change, else None.

        That is the case when every unit written is DATA in a cluster with refcount 1 (COPIED)
        in an L2 table with refcount 1 (qcow2.c handle_copied()).
        """
        cs = self.cs
        gc = offset // cs
        l1_index = gc // self.l2_entries
        if l1_index >= len(self.l1) or not int(self.l1[l1_index]) & OFLAG_COPIED:
            return None
        slc = await self.get_slice(gc)
        if slc is None:
            return None
        idx = gc % self.slice_entries
        if length > (self.slice_entries - idx) * cs - offset % cs:
            return None
        last = (offset + length - 1) // cs
        entries = slc.table[idx:idx + last - gc + 1]
        e = entries[:, 0] if self.extended else entries
        if not int(e[0]) & OFLAG_COPIED or not ((e & _U64(OFLAG_COPIED)) != 0).all():
            return None
        runs = await self.lookup(offset, length)
        if any(r.kind != DATA for r in runs):
            return None
        return runs

    def _edge_region(self, kind: np.ndarray, reuse: bool, ws: int, we: int,
                     old_bitmap: int) -> tuple[int, int, int]:
        """For a partly written cluster: (lo, hi, new bitmap) relative to the cluster.

        [lo, hi) is what must be written to the target host cluster: the payload [ws, we)
        plus copy-on-write of whatever the target does not already hold (qcow2.txt "Extended
        L2 Entries": untouched subclusters keep their state; a new host cluster receives a
        copy of the allocated ones).
        """
        cs, unit = self.cs, self.unit
        if not self.extended:
            return (ws, we, 0) if reuse and kind[0] == DATA else (0, cs, 0)
        u_ws, u_we = ws // unit, (we - 1) // unit + 1
        lo, hi = ws, we
        if ws % unit and not (reuse and kind[u_ws] == DATA):
            lo = u_ws * unit
        if we % unit and not (reuse and kind[u_we - 1] == DATA):
            hi = u_we * unit
        touched = ((1 << (u_we - u_ws)) - 1) << u_ws
        if reuse:
            alloc = (old_bitmap & L2_BITMAP_ALL_ALLOC) | touched
            zero = (old_bitmap >> 32) & ~alloc
            return lo, hi, alloc | (zero << 32)
        copy = np.flatnonzero((kind == DATA) | (kind == COMPRESSED))
        copy_mask = 0
        if len(copy):
            lo = min(lo, int(copy[0]) * unit)
            hi = max(hi, (int(copy[-1]) + 1) * unit)
            for u in copy.tolist():
                copy_mask |= 1 << u
        alloc = touched | copy_mask
        zero = 0 if kind[0] == COMPRESSED else (old_bitmap >> 32) & ~alloc
        return lo, hi, alloc | (zero << 32)

    async def allocating_write(self, offset: int, data: memoryview, read_current,
                               write_host) -> int:
        """Write the part of ``data`` at ``offset`` that lies in one L2 slice, allocating
        clusters and copying on write as needed; returns the bytes consumed.

        ``read_current(offset, length)`` returns the guest's current content (for COW),
        ``write_host(host_offset, buffer)`` writes guest data to the image file.
        Order (qcow2.c): data first, then the L2 entries (whose write-back waits for the new
        refcounts), then the old clusters are released.
        """
        cs = self.cs
        drv = self.drv
        gc = offset // cs
        slc = await self.get_writable_slice(gc)
        idx = gc % self.slice_entries
        length = min(len(data), (self.slice_entries - idx) * cs - offset % cs)
        end = offset + length
        n = (end - 1) // cs - gc + 1
        if (not self.extended and offset % cs == 0 and end % cs == 0
                and not np.count_nonzero(slc.table[idx:idx + n])):
            return await self._allocate_whole(gc, n, data[:length], write_host,
                                              final=length == len(data))
        entries = slc.table[idx:idx + n].copy()
        kind, _ = self.classify(entries, slc.offset, idx + self._slice_index_base(slc))
        kind = kind.reshape(n, self.upc)
        e0 = entries[:, 0] if self.extended else entries
        off = e0 & _OFFSET_MASK
        comp = (e0 & _U64(OFLAG_COMPRESSED)) != 0
        reuse = (off != 0) & ~comp & ((e0 & _U64(OFLAG_COPIED)) != 0)
        need = ~reuse
        k = int(need.sum())
        host = off.copy()
        if k:
            await drv.before_allocation()
            base = await drv.refcounts.alloc_clusters(k)
            host[need] = _U64(base) + np.arange(k, dtype=_U64) * _U64(cs)
        cstart = (gc + np.arange(n, dtype=np.int64)) * cs
        glo = cstart.copy()
        ghi = cstart + cs
        bitmaps = np.full(n, L2_BITMAP_ALL_ALLOC, dtype=_U64)
        for i in sorted({0, n - 1}):
            c0 = int(cstart[i])
            ws, we = max(offset, c0) - c0, min(end, c0 + cs) - c0
            old_bm = int(entries[i, 1]) if self.extended else 0
            lo, hi, bm = self._edge_region(kind[i], bool(reuse[i]), ws, we, old_bm)
            glo[i], ghi[i] = c0 + lo, c0 + hi
            bitmaps[i] = bm
        brk = np.flatnonzero(host[1:] != host[:-1] + _U64(cs)) + 1
        bounds = [0, *brk.tolist(), n]
        hosts = host.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            g0, g1 = int(glo[a]), int(ghi[b - 1])
            h0 = hosts[a] + (g0 - int(cstart[a]))
            p0, p1 = max(g0, offset), min(g1, end)
            if g0 == p0 and g1 == p1:
                buf = data[p0 - offset:p1 - offset]
            elif (not reuse[a:b].any() and await self._reads_zero(g0, p0)
                  and await self._reads_zero(p1, g1)
                  and await drv.zero_host_range(h0, g1 - g0)):
                # handle_alloc_space(): zero the new clusters in the file instead of writing
                # zero-filled copy-on-write buffers, so the file keeps its holes.
                h0 += p0 - g0
                buf = data[p0 - offset:p1 - offset]
            else:
                full = bytearray(g1 - g0)
                if g0 < p0:
                    full[:p0 - g0] = await read_current(g0, p0 - g0)
                if p1 < g1:
                    full[p1 - g0:] = await read_current(p1, g1 - p1)
                full[p0 - g0:p1 - g0] = data[p0 - offset:p1 - offset]
                buf = memoryview(full)
            await write_host(h0, buf)
        if k:
            # Before the entries change: flushing what the refcount cache waits for must not
            # write them early (qcow2_alloc_cluster_link_l2() order).
            await drv.l2_depends_on_refcounts()
        new = host | _U64(OFLAG_COPIED)
        table = slc.table
        if self.extended:
            table[idx:idx + n, 0] = new
            table[idx:idx + n, 1] = bitmaps
        else:
            table[idx:idx + n] = new
        drv.l2_cache.mark_dirty(slc.offset, table)
        if k:
            await self._release(e0[need], "never")
        return length

    async def _allocate_whole(self, gc: int, n: int, data: memoryview, write_host,
                              final: bool) -> int:
        """allocating_write() of whole clusters that are all unallocated (entries 0): one
        contiguous allocation, one data write, the L2 entries set at once.  Nothing to copy
        on write and no old cluster to release.

        Like qcow2_co_pwritev_task(), the data is written without the lock (the caller's,
        held again on return): meanwhile the range is an allocation in flight, which
        overlapping writes wait for (Qcow2Driver.lock_range()).  ``final``: the request ends
        here, so its caller may be told that its allocation is done (io.write_allocated).
        Returns 0, the clusters freed, if the entries changed meanwhile anyway: the caller
        writes the range again.
        """
        drv = self.drv
        cs = self.cs
        await drv.before_allocation()
        base = await drv.refcounts.alloc_clusters(n)
        in_flight = (gc * cs, (gc + n) * cs, asyncio.get_running_loop().create_future())
        drv.allocs_in_flight.append(in_flight)
        if final:
            io.notify_write_allocated()
        drv.lock.release()
        try:
            await write_host(base, data)
        finally:
            await drv.lock.acquire()
            drv.allocs_in_flight.remove(in_flight)
            in_flight[2].set_result(None)
        slc = await self.get_writable_slice(gc)
        idx = gc % self.slice_entries
        if np.count_nonzero(slc.table[idx:idx + n]):
            await drv.refcounts.free(base, n * cs)
            return 0
        await drv.l2_depends_on_refcounts()
        slc.table[idx:idx + n] = self._steps[:n] + _U64(base | OFLAG_COPIED)
        drv.l2_cache.mark_dirty(slc.offset, slc.table)
        return len(data)

    async def preallocate(self, offset: int, end: int) -> tuple[int, int]:
        """Allocate host clusters for the unallocated clusters of one slice, without data
        (qcow2.c preallocate_co() with metadata preallocation).

        ``offset`` is cluster aligned; returns (guest bytes handled, host end or 0).
        """
        cs = self.cs
        gc = offset // cs
        slc = await self.get_writable_slice(gc)
        idx = gc % self.slice_entries
        n = min(-(-(end - offset) // cs), self.slice_entries - idx)
        done = min(end - offset, n * cs)
        table = slc.table
        e0 = table[idx:idx + n, 0] if self.extended else table[idx:idx + n]
        need = (e0 & (_OFFSET_MASK | _U64(OFLAG_COMPRESSED))) == 0
        k = int(need.sum())
        if not k:
            return done, 0
        await self.drv.before_allocation()
        base = await self.drv.refcounts.alloc_clusters(k)
        await self.drv.l2_depends_on_refcounts()
        hosts = _U64(base) + np.arange(k, dtype=_U64) * _U64(cs)
        new = e0.copy()
        new[need] = hosts | _U64(OFLAG_COPIED)
        if self.extended:
            table[idx:idx + n, 0] = new
        else:
            table[idx:idx + n] = new
        self.drv.l2_cache.mark_dirty(slc.offset, table)
        return done, base + k * cs

    async def _reads_zero(self, offset: int, end: int) -> bool:
        """Whether the guest range reads as zeroes from its metadata alone (is_zero_cow())."""
        if end <= offset:
            return True
        backing = self.drv.node.backing
        backing_end = backing.node.length() if backing is not None else 0
        pos = offset
        while pos < end:
            runs = await self.lookup(pos, end - pos)
            for run in runs:
                if run.kind == ZERO or (run.kind == UNALLOC and run.offset >= backing_end):
                    continue
                return False
            pos = runs[-1].offset + runs[-1].length
        return True

    async def _release(self, e0: np.ndarray, discard: str) -> None:
        """Drop the references of replaced entries (qcow2_free_any_cluster())."""
        refs = self.drv.refcounts
        for e in e0.tolist():
            if e & OFLAG_COMPRESSED:
                coffset, csize = self.compressed_extent(e)
                await refs.free(coffset, csize, discard)
            elif e & L2E_OFFSET_MASK:
                await refs.free(e & L2E_OFFSET_MASK, self.cs, discard)

    async def write_compressed_entries(self, offset: int, packed: list[bytes],
                                       write_host) -> None:
        """qcow2_alloc_compressed_cluster_offset() and the data writes for the consecutive
        clusters from ``offset``, one compressed buffer each.

        Space is allocated cluster by cluster in guest order, as QEMU does one request at a
        time; the data then goes out in one write per contiguous host range, and only after
        it the L2 entries point at it.
        """
        cs = self.cs
        places = []
        hosts = []
        for i, compressed in enumerate(packed):
            slc = await self.get_writable_slice(offset // cs + i)
            idx = (offset // cs + i) % self.slice_entries
            e = int(slc.table[idx, 0] if self.extended else slc.table[idx])
            if e & L2E_OFFSET_MASK:
                raise QBlockError("Compression can't overwrite anything", errno=errno.EIO)
            await self.drv.before_allocation()
            hosts.append(await self.drv.refcounts.alloc_bytes(len(compressed)))
            places.append((slc, idx))
        first = 0
        for i in range(1, len(packed) + 1):
            if i == len(packed) or hosts[i] != hosts[i - 1] + len(packed[i - 1]):
                await write_host(hosts[first], memoryview(b"".join(packed[first:i])))
                first = i
        await self.drv.l2_depends_on_refcounts()
        for (slc, idx), host, compressed in zip(places, hosts, packed):
            entry = _U64(self.compressed_entry(host, len(compressed)))
            if self.extended:
                slc.table[idx, 0] = entry
                slc.table[idx, 1] = 0
            else:
                slc.table[idx] = entry
            self.drv.l2_cache.mark_dirty(slc.offset, slc.table)

    # -- zeroes and discard ------------------------------------------------------------------

    async def zeroize(self, offset: int, length: int, unmap: bool) -> int:
        """Make whole clusters in one slice read as zeroes (zero_in_l2_slice()).

        ``offset`` and ``length`` are cluster aligned (or end at the image end).  Returns the
        bytes handled.
        """
        cs = self.cs
        gc = offset // cs
        slc = await self.get_writable_slice(gc)
        idx = gc % self.slice_entries
        whole = length // cs if offset + length < self.drv.header.size else -(-length // cs)
        n = min(whole, self.slice_entries - idx)
        table = slc.table
        old = table[idx:idx + n].copy()
        e0 = old[:, 0] if self.extended else old
        comp = (e0 & _U64(OFLAG_COMPRESSED)) != 0
        has_host = comp | ((e0 & _OFFSET_MASK) != 0)
        drop = comp | (has_host if unmap else np.zeros(n, bool))
        new0 = np.where(drop, _U64(0), e0)
        if self.extended:
            table[idx:idx + n, 0] = new0
            table[idx:idx + n, 1] = _U64(L2_BITMAP_ALL_ZEROES)
        else:
            table[idx:idx + n] = new0 | _U64(OFLAG_ZERO)
        self.drv.l2_cache.mark_dirty(slc.offset, table)
        if drop.any():
            await self._release(e0[drop], "request")
        return min(length, n * cs)

    async def zeroize_subclusters(self, offset: int, length: int) -> bool:
        """zero_l2_subclusters(): mark subclusters of one cluster as reading zeroes.

        False (nothing done) for a compressed cluster, which has no subclusters.
        """
        unit = self.unit
        slc = await self.get_writable_slice(offset // self.cs)
        i = (offset // self.cs) % self.slice_entries
        if int(slc.table[i, 0]) & OFLAG_COMPRESSED:
            return False
        first = offset % self.cs // unit
        count = -(-length // unit)
        mask = ((1 << count) - 1) << first
        old = int(slc.table[i, 1])
        new = (old | (mask << 32)) & ~mask
        if new != old:
            slc.table[i, 1] = _U64(new)
            self.drv.l2_cache.mark_dirty(slc.offset, slc.table)
        return True

    async def discard(self, offset: int, length: int, full: bool, keep_reference: bool,
                      has_backing: bool) -> int:
        """Drop whole clusters in one slice (discard_in_l2_slice()); returns bytes handled.

        A discarded cluster reads as zeroes on v3 images (ZERO flag or zero subclusters),
        from the backing file on v2; ``full`` makes it plain unallocated (shrinking).
        """
        cs = self.cs
        gc = offset // cs
        idx = gc % self.slice_entries
        whole = length // cs if offset + length < self.drv.header.size else -(-length // cs)
        n = min(whole, self.slice_entries - idx)
        l1_index = gc // self.l2_entries
        if (l1_index >= len(self.l1) or not self._l2_offset(l1_index)) and \
                (full or not has_backing):
            return min(length, n * cs)
        slc = await self.get_writable_slice(gc)
        table = slc.table
        old = table[idx:idx + n].copy()
        e0 = old[:, 0] if self.extended else old
        allocated = (e0 & (_OFFSET_MASK | _U64(OFLAG_COMPRESSED))) != 0
        if full:
            new0, new_bm = np.zeros(n, _U64), _U64(0)
        elif keep_reference:
            new0 = np.where(allocated & ((e0 & _U64(OFLAG_COMPRESSED)) == 0), e0, _U64(0))
            new_bm = _U64(L2_BITMAP_ALL_ZEROES)
            if not self.extended:
                new0 = new0 | _U64(OFLAG_ZERO) if self.v3 else new0
        else:
            change = allocated | has_backing
            if self.extended:
                new0 = np.where(change, _U64(0), e0)
            else:
                zero = _U64(OFLAG_ZERO if self.v3 else 0)
                new0 = np.where(change, zero, e0)
            new_bm = _U64(L2_BITMAP_ALL_ZEROES)
        if self.extended:
            change_any = (new0 != e0) | (old[:, 1] != new_bm)
            table[idx:idx + n, 0] = new0
            if not full and not keep_reference:
                table[idx:idx + n, 1] = np.where(allocated | has_backing, new_bm, old[:, 1])
            else:
                table[idx:idx + n, 1] = new_bm
        else:
            change_any = new0 != e0
            table[idx:idx + n] = new0
        if change_any.any():
            self.drv.l2_cache.mark_dirty(slc.offset, table)
        released = allocated & ((new0 & _OFFSET_MASK) == 0)
        if released.any():
            await self._release(e0[released], "always" if full else "request")
        return min(length, n * cs)
