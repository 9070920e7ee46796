"""qcow2 consistency check and repair (block/qcow2-refcount.c qcow2_check_refcounts & co).

The checker rebuilds the expected refcount of every host cluster from the image's structures
(header, active and snapshot L1/L2 tables, compressed extents, snapshot table, reftable and
refblocks, FDE header, bitmap directory and tables) into an in-memory refcount table, compares
it with the stored refcounts, and checks the COPIED flags of the active tables.  It works on the
image file through ``drv.file`` and ``drv.header`` only, after the driver flushed its caches;
the driver reloads its metadata afterwards.

Messages on stderr, counts and repairs follow QEMU 7.2 so that ``qemu-img check`` and
``qblock img check`` agree.
"""
from __future__ import annotations

import dataclasses
import errno
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from qblock.block import io
from qblock.drivers.qcow2.cluster import (L1E_OFFSET_MASK, L2_BITMAP_ALL_ALLOC, L2E_OFFSET_MASK,
                                          OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO)
from qblock.drivers.qcow2.header import (AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT,
                                         INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, QCOW_MAX_L1_SIZE,
                                         Qcow2Header)
from qblock.drivers.qcow2.refcount import REFT_OFFSET_MASK
from qblock.drivers.qcow2.snapshot import SnapshotInfo, read_snapshots

if TYPE_CHECKING:
    from qblock.block.graph import BdrvChild

# include/block/block-common.h BdrvCheckMode
FIX_LEAKS = 1
FIX_ERRORS = 2

# qcow2.txt "Cluster mapping": masks of L1/L2/reftable entries (block/qcow2.h).
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_RESERVED_MASK = 0x1FF

HEADER_L1_OFFSET = 40  # QCowHeader.l1_table_offset
HEADER_REFTABLE = 48  # QCowHeader.refcount_table_offset, refcount_table_clusters
HEADER_INCOMPAT = 72  # QCowHeader.incompatible_features

_BITMAP_DIR = struct.Struct(">QIIBBHI")  # qcow2.txt "Bitmap directory entry" (24 bytes)
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00


@dataclasses.dataclass
class CheckResult:
    """BdrvCheckResult with its BlockFragInfo (include/block/block-common.h)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    ret: int = 0  # a negative errno when the check could not complete (QEMU's return value)


class _Checker:
    """One run of the checker over an image (the state QEMU keeps in BDRVQcow2State)."""

    def __init__(self, file: BdrvChild, header: Qcow2Header, log: TextIO,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.file = file
        self.progress = progress  # (L2 tables walked, all of them) of the active L1 table
        self.h = header
        self.log = log
        self.cs = header.cluster_size
        self.cb = header.cluster_bits
        self.rb_bits = header.refcount_bits
        self.refcount_max = (1 << self.rb_bits) - 1
        self.rb_entries = header.refcount_block_entries
        self.data_file = bool(header.incompatible_features & INCOMPAT_DATA_FILE)
        self.extl2 = header.extended_l2
        self.csize_shift = 62 - (self.cb - 8)
        self.csize_mask = (1 << (self.cb - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        self.reftable = np.zeros(0, dtype=np.uint64)
        self.stored = np.zeros(0, dtype=np.uint64)  # on-disk refcounts (qcow2_get_refcount)
        self.stored_err = np.zeros(0, dtype=bool)  # clusters whose refblock cannot be read
        self.snapshots: list[SnapshotInfo] = []
        self.snapshots_size = 0

    def err(self, msg: str) -> None:
        print(msg, file=self.log)

    def file_length(self) -> int:
        return self.file.node.length()

    def clusters(self, size: int) -> int:
        return (size + self.cs - 1) >> self.cb

    # -- loading ------------------------------------------------------------------------------
    async def load(self) -> None:
        """Read the reftable, every refblock and the snapshot table."""
        h = self.h
        n = h.refcount_table_clusters * self.cs // 8
        raw = await io.pread(self.file, h.refcount_table_offset, n * 8) if n else b""
        self.reftable = np.frombuffer(bytes(raw), dtype=">u8").astype(np.uint64)
        await self.load_stored(self.clusters(self.file_length()))
        await self.load_snapshots()

    async def load_stored(self, nb_clusters: int) -> None:
        """The stored refcount of clusters 0..nb_clusters-1 (qcow2_get_refcount)."""
        nblocks = -(-nb_clusters // self.rb_entries)
        total = nblocks * self.rb_entries
        self.stored = np.zeros(total, dtype=np.uint64)
        self.stored_err = np.zeros(total, dtype=bool)
        for i in range(min(nblocks, len(self.reftable))):
            off = int(self.reftable[i]) & REFT_OFFSET_MASK
            if not off:
                continue
            sl = slice(i * self.rb_entries, (i + 1) * self.rb_entries)
            if off % self.cs:
                self.stored_err[sl] = True
                continue
            block = await io.pread(self.file, off, self.cs)
            self.stored[sl] = decode_refcounts(bytes(block), self.rb_bits)

    def stored_refcount(self, cluster: int) -> int | None:
        """On-disk refcount of ``cluster``; None when its refblock is unusable."""
        if cluster >= len(self.stored):
            return 0 if cluster // self.rb_entries >= len(self.reftable) else None
        if self.stored_err[cluster]:
            return None
        return int(self.stored[cluster])

    async def load_snapshots(self) -> None:
        """The snapshot table entries, read as the driver reads them at open."""
        self.snapshots, self.snapshots_size = await read_snapshots(self.file, self.h)

    # -- the in-memory refcount table (IMRT) ---------------------------------------------------
    def inc(self, res: CheckResult, imrt: list[np.ndarray], offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt(): count one reference to every cluster of a region."""
        if size <= 0:
            return
        if offset + size - self.file_length() >= self.cs:
            self.err("ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset {offset:#x} size {size:#x}")
            res.corruptions += 1
            return
        first = offset >> self.cb
        last = (offset + size - 1) >> self.cb
        self.grow(imrt, last + 1)
        imrt[0][first:last + 1] += 1

    def inc_clusters(self, res: CheckResult, imrt: list[np.ndarray], starts: np.ndarray,
                     sizes: np.ndarray) -> None:
        """``inc`` for many regions at once (the entries of one table)."""
        if not len(starts):
            return
        ends = starts + sizes
        beyond = ends - np.uint64(self.file_length()) >= self.cs
        beyond &= ends >= self.file_length()
        for off, size in zip(starts[beyond].tolist(), sizes[beyond].tolist()):
            self.err("ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset {off:#x} size {size:#x}")
        res.corruptions += int(beyond.sum())
        starts, ends = starts[~beyond], ends[~beyond]
        if not len(starts):
            return
        first = starts >> np.uint64(self.cb)
        last = (ends - np.uint64(1)) >> np.uint64(self.cb)
        self.grow(imrt, int(last.max()) + 1)
        for k in range(int((last - first).max()) + 1):
            sel = first + np.uint64(k) <= last
            np.add.at(imrt[0], (first[sel] + np.uint64(k)).astype(np.int64), 1)

    @staticmethod
    def grow(imrt: list[np.ndarray], n: int) -> None:
        """realloc_refcount_array(): make room for ``n`` clusters."""
        if n > len(imrt[0]):
            bigger = np.zeros(n, dtype=np.uint64)
            bigger[:len(imrt[0])] = imrt[0]
            imrt[0] = bigger

    # -- calculate_refcounts ------------------------------------------------------------------
    async def calculate(self, res: CheckResult, fix: int, nb_clusters: int
                        ) -> tuple[np.ndarray, bool]:
        """calculate_refcounts(): the references of every host cluster; returns (imrt, rebuild)."""
        h = self.h
        imrt = [np.zeros(nb_clusters, dtype=np.uint64)]
        self.inc(res, imrt, 0, self.cs)
        await self.check_l1(res, imrt, h.l1_table_offset, h.l1_size, True)
        if self.data_file and self.snapshots:
            self.err(f"ERROR {len(self.snapshots)} snapshots in image with data file")
            res.corruptions += 1
        for sn in self.snapshots:
            if sn.l1_table_offset % self.cs:
                self.err(f"ERROR snapshot {sn.id_str} ({sn.name}) "
                         f"l1_offset={sn.l1_table_offset:#x}: L1 table is not cluster "
                         "aligned; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            if sn.l1_size > QCOW_MAX_L1_SIZE // 8:
                self.err(f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={sn.l1_size:#x}: "
                         "L1 table is too large; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            await self.check_l1(res, imrt, sn.l1_table_offset, sn.l1_size, False)
        self.inc(res, imrt, h.snapshots_offset, self.snapshots_size)
        self.inc(res, imrt, h.refcount_table_offset, len(self.reftable) * 8)
        crypto = h.crypto_header
        if crypto is not None and crypto[1]:
            self.inc(res, imrt, crypto[0], crypto[1])
        await self.check_bitmaps(res, imrt)
        rebuild = self.check_refblocks(res, imrt)
        # qcow2_inc_refcounts_imrt() stops at refcount_max: each further reference is an error.
        over = imrt[0] > self.refcount_max
        if over.any():
            for k in np.flatnonzero(over).tolist():
                self.err(f"ERROR: overflow cluster offset={k << self.cb:#x}")
            res.corruptions += int((imrt[0][over] - self.refcount_max).sum())
            imrt[0][over] = self.refcount_max
        return imrt[0], rebuild

    async def check_l1(self, res: CheckResult, imrt: list[np.ndarray], l1_offset: int,
                       l1_size: int, active: bool) -> None:
        """check_refcounts_l1()."""
        if not l1_size:
            return
        self.inc(res, imrt, l1_offset, l1_size * 8)
        l1 = np.frombuffer(bytes(await io.pread(self.file, l1_offset, l1_size * 8)),
                           dtype=">u8").astype(np.uint64)
        entries = l1[l1 != 0].tolist()
        for done, entry in enumerate(entries):
            if active and self.progress is not None:
                self.progress(done, len(entries))
            if entry & L1E_RESERVED_MASK:
                self.err(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            l2_offset = entry & L1E_OFFSET_MASK
            self.inc(res, imrt, l2_offset, self.cs)
            if l2_offset % self.cs:
                self.err(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                         "L1 entry corrupted")
                res.corruptions += 1
            await self.check_l2(res, imrt, l2_offset, active)

    async def read_l2(self, l2_offset: int) -> tuple[np.ndarray, np.ndarray]:
        """Entries and subcluster bitmaps (zero without extended L2) of one L2 table."""
        raw = np.frombuffer(bytes(await io.pread(self.file, l2_offset, self.cs)),
                            dtype=">u8").astype(np.uint64)
        if self.extl2:
            return raw[0::2], raw[1::2]
        return raw, np.zeros(len(raw), dtype=np.uint64)

    def cluster_types(self, entries: np.ndarray) -> dict[str, np.ndarray]:
        """qcow2_get_cluster_type() for a whole table: boolean masks per type."""
        offset = entries & np.uint64(L2E_OFFSET_MASK)
        compressed = (entries & np.uint64(OFLAG_COMPRESSED)) != 0
        zero = ~compressed & ((entries & np.uint64(OFLAG_ZERO)) != 0) if not self.extl2 \
            else np.zeros(len(entries), dtype=bool)
        has_offset = offset != 0
        if self.data_file:
            # qcow2.txt "External data file": offset 0 is valid when COPIED is set.
            has_offset |= (entries & np.uint64(OFLAG_COPIED)) != 0
        plain = ~compressed & ~zero
        return {"compressed": compressed, "zero_plain": zero & ~has_offset,
                "zero_alloc": zero & has_offset, "normal": plain & has_offset,
                "unallocated": plain & ~has_offset}

    async def check_l2(self, res: CheckResult, imrt: list[np.ndarray], l2_offset: int,
                       active: bool) -> None:
        """check_refcounts_l2(): reserved bits, alignment, references, fragmentation."""
        entries, bitmaps = await self.read_l2(l2_offset)
        types = self.cluster_types(entries)
        comp = types["compressed"]
        bad_reserved = ~comp & ((entries & np.uint64(L2E_STD_RESERVED_MASK)) != 0)
        for e in entries[bad_reserved].tolist():
            self.err(f"ERROR found l2 entry with reserved bits set: {e:x}")
        res.corruptions += int(bad_reserved.sum())

        # qcow2.txt "Compressed Clusters Descriptor": never COPIED, no subclusters.
        copied = comp & ((entries & np.uint64(OFLAG_COPIED)) != 0)
        for e in entries[copied].tolist():
            self.err(f"ERROR: coffset={e & self.coffset_mask:#x}: copied flag must never be "
                     "set for compressed clusters")
        res.corruptions += int(copied.sum())
        if self.data_file and comp.any():
            for i in np.flatnonzero(comp).tolist():
                self.err(f"ERROR compressed cluster {i} with data file, "
                         f"entry={int(entries[i]) & ~OFLAG_COPIED:#x}")
            res.corruptions += int(comp.sum())
            comp = np.zeros_like(comp)
        bad_bitmap = comp & (bitmaps != 0)
        for i in np.flatnonzero(bad_bitmap).tolist():
            self.err(f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
                     f"entry={int(entries[i]) & ~OFLAG_COPIED:#x}")
        res.corruptions += int(bad_bitmap.sum())
        comp &= ~bad_bitmap
        cdesc = entries[comp]
        coff = cdesc & np.uint64(self.coffset_mask)
        nsect = ((cdesc >> np.uint64(self.csize_shift)) & np.uint64(self.csize_mask)) + np.uint64(1)
        csize = nsect * np.uint64(512) - (coff & np.uint64(511))
        self.inc_clusters(res, imrt, coff, csize)
        ncomp = int(comp.sum())

        alloc = types["normal"] | types["zero_alloc"]
        offsets = entries & np.uint64(L2E_OFFSET_MASK)
        bad_sc = alloc & (((bitmaps >> np.uint64(32)) & bitmaps) != 0)
        for off in offsets[bad_sc].tolist():
            self.err(f"ERROR offset={off:x}: Allocated cluster has corrupted subcluster "
                     "allocation bitmap")
        res.corruptions += int(bad_sc.sum())
        misaligned = alloc & ((offsets & np.uint64(self.cs - 1)) != 0)
        if misaligned.any():
            if self.extl2:
                data = (bitmaps & np.uint64(L2_BITMAP_ALL_ALLOC)) != 0
            else:
                data = (entries & np.uint64(OFLAG_ZERO)) == 0
            for off, has_data in zip(offsets[misaligned].tolist(), data[misaligned].tolist()):
                if has_data:
                    self.err(f"ERROR offset={off:x}: Data cluster is not properly aligned; "
                             "L2 entry corrupted.")
                else:
                    self.err(f"ERROR offset={off:x}: Preallocated cluster is not properly "
                             "aligned; L2 entry corrupted.")
            res.corruptions += int(misaligned.sum())
        if active:
            # BlockFragInfo: a cluster not following its predecessor in the same L2 table is
            # fragmented; compressed clusters always count as fragmented.
            host = offsets[alloc]
            frag = int(np.count_nonzero(host[1:] != host[:-1] + np.uint64(self.cs)))
            res.allocated_clusters += int(alloc.sum()) + ncomp
            res.compressed_clusters += ncomp
            res.fragmented_clusters += frag + ncomp
        if not self.data_file:
            host = offsets[alloc]
            self.inc_clusters(res, imrt, host, np.full(len(host), self.cs, dtype=np.uint64))
        unalloc_bad = types["unallocated"] & ((bitmaps & np.uint64(L2_BITMAP_ALL_ALLOC)) != 0)
        for _ in range(int(unalloc_bad.sum())):
            self.err("ERROR: Unallocated cluster has non-zero subcluster allocation map")
        res.corruptions += int(unalloc_bad.sum())

    async def check_bitmaps(self, res: CheckResult, imrt: list[np.ndarray]) -> None:
        """qcow2_check_bitmaps_refcounts(): directory, bitmap tables and their data clusters."""
        ext = self.h.bitmaps
        if ext is None or not self.h.autoclear_features & AUTOCLEAR_BITMAPS:
            return
        self.inc(res, imrt, ext.bitmap_directory_offset, ext.bitmap_directory_size)
        raw = bytes(await io.pread(self.file, ext.bitmap_directory_offset,
                                   ext.bitmap_directory_size))
        pos = 0
        for _ in range(ext.nb_bitmaps):
            if pos + _BITMAP_DIR.size > len(raw):
                break
            table_off, table_size, _flags, _type, _gran, name_size, extra = \
                _BITMAP_DIR.unpack_from(raw, pos)
            pos += (_BITMAP_DIR.size + extra + name_size + 7) & ~7
            self.inc(res, imrt, table_off, table_size * 8)
            table = np.frombuffer(bytes(await io.pread(self.file, table_off, table_size * 8)),
                                  dtype=">u8").astype(np.uint64)
            data = table & np.uint64(BME_TABLE_ENTRY_OFFSET_MASK)
            data = data[data != 0]
            self.inc_clusters(res, imrt, data, np.full(len(data), self.cs, dtype=np.uint64))

    def check_refblocks(self, res: CheckResult, imrt: list[np.ndarray]) -> bool:
        """check_refblocks(): every refblock is aligned, inside the image, referenced once."""
        rebuild = False
        nb_clusters = len(imrt[0])
        for i, entry in enumerate(self.reftable.tolist()):
            offset = entry & REFT_OFFSET_MASK
            cluster = offset >> self.cb
            if entry & REFT_RESERVED_MASK:
                self.err(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if offset % self.cs:
                self.err(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                         "entry corrupted")
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= nb_clusters:
                self.err(f"ERROR refcount block {i} is outside image")
                res.corruptions += 1
                continue
            if offset:
                self.inc(res, imrt, offset, self.cs)
                if int(imrt[0][cluster]) != 1:
                    self.err(f"ERROR refcount block {i} refcount={int(imrt[0][cluster])}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    # -- compare_refcounts ---------------------------------------------------------------------
    async def compare(self, res: CheckResult, fix: int, imrt: np.ndarray) -> tuple[bool, int]:
        """compare_refcounts(): stored vs. computed; returns (rebuild, highest cluster)."""
        n = len(imrt)
        await self.load_stored(n)
        stored = self.stored[:n]
        errs = self.stored_err[:n]
        rebuild = False
        used = np.flatnonzero(~errs & ((stored > 0) | (imrt > 0)))
        highest = int(used[-1]) if len(used) else 0
        for i in np.flatnonzero(errs).tolist():
            self.err(f"Can't get refcount for cluster {i}: Input/output error")
        res.check_errors += int(errs.sum())
        diff = np.flatnonzero(~errs & (stored != imrt))
        changed: list[int] = []
        for i in diff.tolist():
            r1, r2 = int(stored[i]), int(imrt[i])
            fixed = False
            if r1 == 0:
                rebuild = True
            elif r1 > r2 and fix & FIX_LEAKS:
                fixed = True
                res.leaks_fixed += 1
            elif r1 < r2 and fix & FIX_ERRORS:
                fixed = True
                res.corruptions_fixed += 1
            label = "Repairing" if fixed else "ERROR" if r1 < r2 else "Leaked"
            self.err(f"{label} cluster {i} refcount={r1} reference={r2}")
            if fixed:
                self.stored[i] = r2
                changed.append(i)
            elif r1 < r2:
                res.corruptions += 1
            else:
                res.leaks += 1
        if changed:
            await self.write_refcounts(changed)
        return rebuild, highest

    async def write_refcounts(self, clusters: list[int]) -> None:
        """update_refcount(): write the refblocks of changed clusters, discard freed ones."""
        for block in sorted({c // self.rb_entries for c in clusters}):
            off = int(self.reftable[block]) & REFT_OFFSET_MASK
            sl = self.stored[block * self.rb_entries:(block + 1) * self.rb_entries]
            await io.pwritev(self.file, off, encode_refcounts(sl, self.rb_bits))
        # update_refcount(QCOW2_DISCARD_ALWAYS): a cluster whose refcount drops to 0 is
        # discarded; coalesce neighbours into one request.
        freed = sorted(c for c in clusters if self.stored[c] == 0)
        for start, count in _runs(freed):
            await io.pdiscard(self.file, start << self.cb, count << self.cb)

    # -- check_oflag_copied ----------------------------------------------------------------------
    async def check_copied(self, res: CheckResult, fix: int) -> None:
        """check_oflag_copied(): COPIED set exactly where the refcount is 1 (active tables)."""
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        h = self.h
        if not h.l1_size:
            return
        l1 = np.frombuffer(bytes(await io.pread(self.file, h.l1_table_offset, h.l1_size * 8)),
                           dtype=">u8").astype(np.uint64)
        label = "Repairing" if repair else "ERROR"
        for i, l1e in enumerate(l1.tolist()):
            l2_offset = l1e & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            refcount = self.stored_refcount(l2_offset >> self.cb)
            if refcount is not None and (refcount == 1) != bool(l1e & OFLAG_COPIED):
                res.corruptions += 1
                self.err(f"{label} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} "
                         f"refcount={refcount}")
                if repair:
                    new = l1e | OFLAG_COPIED if refcount == 1 else l1e & ~OFLAG_COPIED
                    await io.pwritev(self.file, h.l1_table_offset + 8 * i,
                                     struct.pack(">Q", new))
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            raw = bytearray(await io.pread(self.file, l2_offset, self.cs))
            table = np.frombuffer(raw, dtype=">u8")
            entries = table[0::2] if self.extl2 else table
            types = self.cluster_types(entries.astype(np.uint64))
            alloc = np.flatnonzero(types["normal"] | types["zero_alloc"])
            if not len(alloc):
                continue
            ent = entries[alloc].astype(np.uint64)
            if self.data_file:
                refs = np.ones(len(alloc), dtype=np.int64)
            else:
                clusters = ((ent & np.uint64(L2E_OFFSET_MASK)) >> np.uint64(self.cb)).tolist()
                refs = np.array([-1 if r is None else r
                                 for r in map(self.stored_refcount, clusters)], dtype=np.int64)
            has_copied = (ent & np.uint64(OFLAG_COPIED)) != 0
            wrong = (refs >= 0) & ((refs == 1) != has_copied)
            if not wrong.any():
                continue
            for e, r in zip(ent[wrong].tolist(), refs[wrong].tolist()):
                res.corruptions += 1
                self.err(f"{label} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={r}")
            if repair:
                idx = alloc[wrong]
                fixed = np.where(refs[wrong] == 1, ent[wrong] | np.uint64(OFLAG_COPIED),
                                 ent[wrong] & np.uint64(~OFLAG_COPIED & (2**64 - 1)))
                view = np.frombuffer(raw, dtype=">u8").copy()
                stride = 2 if self.extl2 else 1
                view[idx * stride] = fixed
                await io.pwritev(self.file, l2_offset, view.tobytes())
                count = int(wrong.sum())
                res.corruptions -= count
                res.corruptions_fixed += count

    # -- rebuild_refcount_structure -------------------------------------------------------------
    async def rebuild(self, res: CheckResult, imrt: np.ndarray) -> np.ndarray:
        """rebuild_refcount_structure(): new refblocks and reftable from the IMRT."""
        self.err("Rebuilding refcount structure")
        imrt_l = [imrt]
        reftable: list[int] = []
        await self._write_refblocks(imrt_l, 0, len(imrt_l[0]), reftable)
        while True:
            rt_clusters = self.clusters(len(reftable) * 8)
            rt_offset, _ = self._alloc(imrt_l, rt_clusters, 0)
            start = rt_offset >> self.cb
            grown = await self._write_refblocks(imrt_l, start, start + rt_clusters, reftable)
            if not grown:
                break
            imrt_l[0][start:start + rt_clusters] = 0
        table = np.array(reftable, dtype=">u8").tobytes()
        table += bytes(rt_clusters * self.cs - len(table))
        await io.pwritev(self.file, rt_offset, table)
        await io.pwritev(self.file, HEADER_REFTABLE, struct.pack(">QI", rt_offset, rt_clusters))
        await io.flush(self.file.node)
        self.h.refcount_table_offset = rt_offset
        self.h.refcount_table_clusters = rt_clusters
        self.reftable = np.array(reftable + [0] * (rt_clusters * self.cs // 8 - len(reftable)),
                                 dtype=np.uint64)
        return imrt_l[0]

    def _alloc(self, imrt: list[np.ndarray], count: int, first_free: int) -> tuple[int, int]:
        """alloc_clusters_imrt(): ``count`` contiguous free clusters from ``first_free``.

        Free clusters at the end of the table may be extended past it.  Returns the offset and
        the updated first free cluster.
        """
        n = len(imrt[0])
        zeros = np.flatnonzero(imrt[0][first_free:] == 0) + first_free
        start = max(n, first_free)
        if len(zeros):
            first_free = int(zeros[0])
            breaks = np.flatnonzero(np.diff(zeros) != 1)
            run_starts = np.concatenate(([0], breaks + 1))
            run_ends = np.concatenate((breaks + 1, [len(zeros)]))
            long_enough = np.flatnonzero(run_ends - run_starts >= count)
            if len(long_enough):
                start = int(zeros[run_starts[long_enough[0]]])
            elif int(zeros[-1]) == n - 1:
                start = int(zeros[run_starts[-1]])
        self.grow(imrt, start + count)
        imrt[0][start:start + count] = 1
        return start << self.cb, first_free

    async def _write_refblocks(self, imrt: list[np.ndarray], first: int, end: int,
                               reftable: list[int]) -> bool:
        """rebuild_refcounts_write_refblocks(): allocate and write each needed refblock.

        Returns whether the reftable had to grow.
        """
        grown = False
        first_free = 0
        cluster = first
        while cluster < end:
            nz = np.flatnonzero(imrt[0][cluster:end])
            if not len(nz):
                break
            cluster += int(nz[0])
            index = cluster // self.rb_entries
            block_start = index * self.rb_entries
            if index < len(reftable) and reftable[index]:
                offset = reftable[index]
            else:
                # Never allocate in a refblock already written.
                offset, first_free = self._alloc(imrt, 1, max(first_free, block_start))
                end = max(end, (offset >> self.cb) + 1)
                if len(reftable) <= index:
                    entries = -(-((index + 1) * 8) // self.cs) * self.cs // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[index] = offset
            block = np.zeros(self.rb_entries, dtype=np.uint64)
            part = imrt[0][block_start:block_start + self.rb_entries]
            block[:len(part)] = part
            await io.pwritev(self.file, offset, encode_refcounts(block, self.rb_bits))
            cluster = block_start + self.rb_entries
        return grown


def decode_refcounts(block: bytes, bits: int) -> np.ndarray:
    """Refcount entries of a refblock (qcow2.txt "Refcount block entries")."""
    if bits >= 8:
        return np.frombuffer(block, dtype=f">u{bits // 8}").astype(np.uint64)
    flat = np.unpackbits(np.frombuffer(block, dtype=np.uint8), bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint64))
    return (flat.reshape(-1, bits).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)


def encode_refcounts(counts: np.ndarray, bits: int) -> bytes:
    """The inverse of ``decode_refcounts``."""
    if bits >= 8:
        return counts.astype(f">u{bits // 8}").tobytes()
    shifts = np.arange(bits, dtype=np.uint64)
    flat = ((counts.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(flat.reshape(-1), bitorder="little").tobytes()


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Sorted integers as (start, length) runs."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][0] + runs[-1][1] == v:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs


async def check_refcounts(chk: _Checker, fix: int) -> CheckResult:
    """qcow2_check_refcounts(): the refcount and COPIED checks with optional repair."""
    res = CheckResult()
    h = chk.h
    nb_clusters = chk.clusters(chk.file_length())
    res.total_clusters = chk.clusters(h.size)
    imrt, rebuild = await chk.calculate(res, fix, nb_clusters)
    pre_compare = dataclasses.replace(res)
    rebuild2, highest = await chk.compare(res, 0, imrt)
    rebuild |= rebuild2
    if rebuild and fix & FIX_ERRORS:
        old = dataclasses.replace(res)
        fresh_leaks = 0
        imrt = await chk.rebuild(res, imrt)
        res.corruptions = 0
        res.leaks = 0
        imrt, rebuild = await chk.calculate(res, 0, len(imrt))
        if fix & FIX_LEAKS:
            saved = dataclasses.replace(res)
            scratch = CheckResult()
            rebuild, highest = await chk.compare(scratch, FIX_LEAKS, imrt)
            if rebuild:
                chk.err("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = scratch.leaks
            res = saved
        if res.corruptions < old.corruptions:
            res.corruptions_fixed += old.corruptions - res.corruptions
        if res.leaks < old.leaks:
            res.leaks_fixed += old.leaks - res.leaks
        res.leaks += fresh_leaks
    elif fix:
        if rebuild:
            chk.err("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            raise _CheckFailed(res)
        if res.leaks or res.corruptions:
            res = pre_compare
            _, highest = await chk.compare(res, fix, imrt)
    await chk.check_copied(res, fix)
    res.image_end_offset = (highest + 1) * chk.cs
    return res


class _CheckFailed(Exception):
    """check_refcounts() gave up (QEMU returns -EIO with partial results)."""

    def __init__(self, res: CheckResult) -> None:
        super().__init__("check failed")
        self.res = res


async def check_image(drv: Any, fix: int, *, log: TextIO | None = None,
                      progress: Callable[[int, int], None] | None = None) -> CheckResult:
    """qcow2_co_check_locked(): check (and with ``fix`` repair) the image of ``drv``.

    ``drv`` provides ``file`` (the BdrvChild of the image file) and ``header`` (its parsed
    Qcow2Header, updated in place by repairs).  ``fix`` is a mask of FIX_LEAKS/FIX_ERRORS.
    A clean result after a repair clears the dirty and corrupt bits.  ``progress(done,
    total)`` is called before each L2 table of the active L1 table is walked.
    """
    file: BdrvChild = drv.file
    header: Qcow2Header = drv.header
    chk = _Checker(file, header, log if log is not None else sys.stderr, progress)
    await chk.load()
    try:
        res = await check_refcounts(chk, fix)
    except _CheckFailed as e:
        e.res.ret = -errno.EIO
        return e.res
    if fix and res.check_errors == 0 and res.corruptions == 0:
        await mark_clean(file, header)
    return res


async def mark_clean(file: BdrvChild, header: Qcow2Header) -> None:
    """qcow2_mark_clean() + qcow2_mark_consistent(): clear the dirty, then the corrupt bit."""
    if header.version < 3:
        return
    for bit in (INCOMPAT_DIRTY, INCOMPAT_CORRUPT):
        if header.incompatible_features & bit:
            await io.flush(file.node)
            header.incompatible_features &= ~bit
            await io.pwritev(file, HEADER_INCOMPAT, struct.pack(">Q", header.incompatible_features))
            await io.flush(file.node)
