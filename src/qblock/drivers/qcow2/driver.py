"""The qcow2 format driver (QEMU block/qcow2.c).

Requests interleave on one event loop; ``self.lock`` (QEMU's ``s->lock``) serialises every
metadata lookup and change.  Reads and in-place writes drop the lock for their data I/O.
An allocating write of whole unallocated clusters drops it too, between allocating the
clusters and linking them in L2 (qcow2_alloc_cluster_offset() / qcow2_alloc_cluster_link_l2()):
while its data is written the range is an allocation in flight, and writes, zero writes and
discards that overlap it wait for it (QEMU's l2meta dependencies), so two writes to the same
unallocated cluster never both allocate.  A crash in between only leaks the new clusters.
"""
from __future__ import annotations

import asyncio
import bisect
import errno
import os
import struct
import sys
import time
from typing import Any

import numpy as np

from qblock.block import io
from qblock.block.open import open_child
from qblock.block.perm import ROLE_IMAGE, Role
from qblock.block.probe import probe_format
from qblock.drivers.base import BlockDriver, BlockStatus, ReqFlags, Status
from qblock.drivers.file import run_in_pool
from qblock.drivers.options import pop_bool, pop_int, to_bool
from qblock.drivers.qcow2 import header as hdr
from qblock.drivers.qcow2 import bitmap as qbitmap
from qblock.drivers.qcow2.cache import DEFAULT_CACHE_CLEAN_INTERVAL, Qcow2Cache, cache_sizes
from qblock.drivers.qcow2.cluster import COMPRESSED, DATA, L1E_OFFSET_MASK, UNALLOC, ZERO, \
    ClusterMap, Run
from qblock.drivers.qcow2.compress import compress_cluster, decompress_cluster
from qblock.drivers.qcow2.refcount import REFT_OFFSET_MASK, Refcounts, refblock_codec
from qblock.drivers.qcow2.snapshot import SnapshotInfo, read_snapshots
from qblock.drivers.qcow2 import snapshot_ops
from qblock.errors import ImageCorrupt, InvalidArgument, NotSupported, QBlockError

# qcow2.h QCow2MetadataOverlap, in QEMU's check order, with the names of its messages.
OVERLAP_NAMES = {
    "main-header": "qcow2_header",
    "active-l1": "active L1 table",
    "active-l2": "active L2 table",
    "refcount-table": "refcount table",
    "refcount-block": "refcount block",
    "snapshot-table": "snapshot table",
    "inactive-l1": "inactive L1 table",
    "inactive-l2": "inactive L2 table",
    "bitmap-directory": "bitmap directory",
}
_CONSTANT = {"main-header", "active-l1", "refcount-table", "snapshot-table"}
OVERLAP_TEMPLATES = {
    "none": set(),
    "constant": _CONSTANT,
    "cached": _CONSTANT | {"active-l2", "refcount-block", "inactive-l1", "bitmap-directory"},
    "all": set(OVERLAP_NAMES),
}
_FIELD_OFFSETS: dict[str, tuple[int, str]] = {}
_pos = 0
for _name, _code in hdr.V2_FIELDS + hdr.V3_FIELDS:
    _FIELD_OFFSETS[_name] = (_pos, _code)
    _pos += struct.calcsize(">" + _code)

FIX_LEAKS = 1
FIX_ERRORS = 2


def _sorted_offsets(table: np.ndarray, mask: int) -> list[int]:
    """The non-zero table offsets of an L1 or refcount table, sorted."""
    offsets = (table & np.uint64(mask)).astype(np.int64)
    return np.sort(offsets[offsets != 0]).tolist()


def _hits_sorted(offsets: list[int], start: int, end: int, cs: int) -> bool:
    """Whether a cluster starting at one of ``offsets`` overlaps [start, end).

    bisect on a list: it runs before every data write, and numpy's searchsorted releases the
    GIL, then may wait to get it back from an I/O thread."""
    i = bisect.bisect_left(offsets, end)
    return i > 0 and offsets[i - 1] + cs > start


# block-status bits as ints (IntFlag arithmetic is slow on the block-status path)
_ST_DATA, _ST_ZERO = int(Status.DATA), int(Status.ZERO)
_ST_OFFSET_VALID, _ST_COMPRESSED = int(Status.OFFSET_VALID), int(Status.COMPRESSED)
_ST_RECURSE = int(Status.RECURSE)
_WRITE_COMPRESSED, _FUA = int(ReqFlags.WRITE_COMPRESSED), int(ReqFlags.FUA)

# how many clusters of one compressed write are compressed at the same time
COMPRESS_WINDOW = 32


class Qcow2Driver(BlockDriver):
    format_name = "qcow2"
    supports_backing = True

    # -- open --------------------------------------------------------------------------------

    async def open(self, node: Any, options: dict[str, Any]) -> None:
        await super().open(node, options)
        self.lock = asyncio.Lock()
        # allocations whose data is being written without the lock: (start, end, done)
        self.allocs_in_flight: list[tuple[int, int, asyncio.Future[None]]] = []
        self.unusable = False
        self.signaled_corruption = False
        self._corrupt_pending = False
        self._zcache: tuple[int, bytes] | None = None
        self._last_clean = time.monotonic()
        self.metadata_preallocation: bool | None = None
        self._table_offsets: tuple[list[int], list[int]] | None = None
        self.file = await open_child(node, options, "file", ROLE_IMAGE)
        node.filename = self.file.node.filename
        node.request_alignment = self.file.node.request_alignment
        raw = await io.pread(self.file, 0, 1 << hdr.MAX_CLUSTER_BITS)
        magic_cs = struct.unpack_from(">I", raw, 20)[0]
        if hdr.MIN_CLUSTER_BITS <= magic_cs <= hdr.MAX_CLUSTER_BITS:
            raw = raw[:1 << magic_cs]
        self.header = hdr.Qcow2Header.parse(bytes(raw))
        h = self.header
        writable = not node.read_only
        if h.corrupt and writable:
            raise QBlockError("qcow2: Image is corrupt; cannot be opened read/write",
                              errno=errno.EACCES)
        if h.crypt_method:
            raise NotSupported("qcow2: encrypted images are not supported")
        if "data-file" in options or h.incompatible_features & hdr.INCOMPAT_DATA_FILE:
            options.pop("data-file", None)
            raise NotSupported(f"Could not open '{node.filename}': external data file not "
                               f"supported")
        if h.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW:
            raise InvalidArgument("data-file-raw requires a data file")
        self._parse_options(options)
        for warning in h.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        self.map = ClusterMap(self)
        l2_n, slice_bytes, rc_n = cache_sizes(h.cluster_size, h.l2_entry_size, h.size,
                                              self.cache_opts)
        self.map.setup_slices(slice_bytes)
        self.l2_cache = Qcow2Cache("l2", self.file, l2_n, slice_bytes, self.map.decode_l2,
                                   self.map.encode_l2, self._pre_write_l2)
        self.refcounts = Refcounts(self, rc_n)
        await self._load_metadata()
        await self._open_backing(options)
        if writable:
            update = bool(h.autoclear_features & ~hdr.AUTOCLEAR_MASK) or bool(h.warnings)
            h.autoclear_features &= hdr.AUTOCLEAR_MASK
            if update:
                await self.update_header()
            if h.dirty:
                await self._repair_dirty()
        await qbitmap.load_bitmaps(self)

    def _parse_options(self, options: dict[str, Any]) -> None:
        h = self.header
        self.lazy = pop_bool(options, "lazy-refcounts", h.lazy_refcounts)
        if self.lazy and h.version < 3:
            raise InvalidArgument("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                                  "compatibility level")
        self.pass_discard = {
            "request": pop_bool(options, "pass-discard-request", self.node.unmap),
            "snapshot": pop_bool(options, "pass-discard-snapshot", True),
            "other": pop_bool(options, "pass-discard-other", False),
        }
        self.discard_no_unref = pop_bool(options, "discard-no-unref", False)
        self.cache_opts = {}
        for key in ("cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size"):
            if key in options:
                self.cache_opts[key] = pop_int(options, key, 0)
        self.cache_clean_interval = pop_int(options, "cache-clean-interval",
                                            DEFAULT_CACHE_CLEAN_INTERVAL)
        if self.cache_clean_interval < 0 or self.cache_clean_interval > 0xFFFFFFFF:
            raise InvalidArgument("Cache clean interval too big")
        self.overlap = self._overlap_option(options)
        for key in [k for k in options if k.startswith("encrypt.") or k == "encrypt"]:
            options.pop(key)
            raise NotSupported("qcow2: encryption is not supported")

    @staticmethod
    def _overlap_option(options: dict[str, Any]) -> set[str]:
        """overlap-check: a template name, or a dict with template and per-kind switches."""
        value = options.pop("overlap-check", "cached")
        flat = {k: options.pop(k) for k in [k for k in options
                                            if k.startswith("overlap-check.")]}
        if isinstance(value, dict):
            flat.update({f"overlap-check.{k}": v for k, v in value.items()})
            value = flat.pop("overlap-check.template", "cached")
        else:
            value = flat.pop("overlap-check.template", value)
        if value not in OVERLAP_TEMPLATES:
            raise InvalidArgument(f"Unsupported value '{value}' for qcow2 option 'overlap-check'. "
                                  "Allowed are any of the following: none, constant, cached, all")
        chosen = set(OVERLAP_TEMPLATES[value])
        for key, v in flat.items():
            kind = key.removeprefix("overlap-check.")
            if kind not in OVERLAP_NAMES:
                raise InvalidArgument(f"Parameter '{key}' is unexpected")
            if to_bool(v, key):
                chosen.add(kind)
            else:
                chosen.discard(kind)
        return chosen

    async def _load_metadata(self) -> None:
        """Read L1, refcount table and snapshot table from the image file."""
        await self.map.load_l1()
        await self.refcounts.load()
        self.snapshots: list[SnapshotInfo]
        self.snapshots, self.snapshots_size = await read_snapshots(self.file, self.header)

    async def _open_backing(self, options: dict[str, Any]) -> None:
        """The backing child: given by the options, or the header's backing file."""
        if "backing" in options:
            if options["backing"] is None:
                options.pop("backing")
                return
            await open_child(self.node, options, "backing", Role.COW)
            return
        name = self.header.backing_file
        if not name:
            return
        path = name if os.path.isabs(name) else os.path.join(
            os.path.dirname(self.node.filename), name)
        try:
            fmt = self.header.backing_format or probe_format(path)
        except OSError:
            fmt = "raw"  # opening it below reports the missing file by name
        ref = {"driver": fmt, "file": {"driver": "file", "filename": path}, "read-only": True}
        try:
            await open_child(self.node, {"backing": ref}, "backing", Role.COW)
        except QBlockError as e:
            raise QBlockError(f"Could not open backing file: {e}", errno=e.errno) from None

    async def _repair_dirty(self) -> None:
        """A writable open of a dirty image repairs it first (qcow2.txt "dirty bit")."""
        from qblock.drivers.qcow2 import check

        await self.flush_caches()
        try:
            result = await check.check_image(self, FIX_ERRORS | FIX_LEAKS)
        except QBlockError as e:
            raise QBlockError(f"Could not repair dirty image: {e}", errno=e.errno) from None
        if result.check_errors:
            raise QBlockError("Could not repair dirty image: Input/output error",
                              errno=errno.EIO)
        await self.reload_metadata()

    # -- metadata helpers used by the checker ------------------------------------------------

    async def flush_caches(self) -> None:
        """Write every dirty L2 slice and refcount block (qcow2_write_caches + flush)."""
        await self.l2_cache.write()
        await self.refcounts.cache.write()
        await io.flush(self.file.node)

    def drop_caches(self) -> None:
        self.l2_cache.clear()
        self.refcounts.cache.clear()
        self._zcache = None

    async def reload_metadata(self) -> None:
        """Re-read header, L1 and refcount table after the checker changed them on disk."""
        self.drop_caches()
        raw = await io.pread(self.file, 0, self.header.cluster_size)
        self.header = hdr.Qcow2Header.parse(bytes(raw))
        await self._load_metadata()
        self.refcounts.free_cluster_index = 0
        self.refcounts.free_byte_offset = 0

    # -- header ------------------------------------------------------------------------------

    async def update_header(self) -> None:
        """Rewrite the header cluster from ``self.header`` (qcow2_update_header)."""
        self.header.l1_size = len(self.map.l1)
        self.header.l1_table_offset = self.map.l1_offset
        await io.pwritev(self.file, 0, self.header.pack())

    async def update_header_fields(self, **fields: int) -> None:
        """Change some fixed header fields in place, durably (bdrv_pwrite_sync)."""
        for name, value in fields.items():
            setattr(self.header, name, value)
        spans = [_FIELD_OFFSETS[n] for n in fields]
        start = min(off for off, _ in spans)
        end = max(off + struct.calcsize(">" + code) for off, code in spans)
        packed = b"".join(struct.pack(">" + code, getattr(self.header, name))
                          for name, (_, code) in _FIELD_OFFSETS.items())
        await io.pwritev(self.file, start, packed[start:end])
        await io.flush(self.file.node)

    async def change_backing_file(self, filename: str | None, fmt: str | None) -> None:
        """qcow2_change_backing_file(): new backing name and format, one header write."""
        if filename and len(filename.encode("utf-8", "surrogateescape")) > 1023:
            raise InvalidArgument("Invalid argument")
        h = self.header
        old = h.backing_file, h.backing_format
        h.backing_file, h.backing_format = filename or None, (fmt or None) if filename else None
        try:
            await self.update_header()  # the whole header cluster in one write
        except QBlockError:
            h.backing_file, h.backing_format = old
            raise

    async def make_empty(self) -> None:
        """qcow2_make_empty(): every guest cluster unallocated (qemu-img commit's last step)."""
        self._check_writable()
        h = self.header
        cs = h.cluster_size
        l1_clusters = -(-len(self.map.l1) * 8 // cs)
        if (h.version >= 3 and not self.snapshots and h.bitmaps is None
                and 3 + l1_clusters <= h.refcount_block_entries):
            async with self.lock:
                await self._make_completely_empty(l1_clusters)
            return
        # qcow2.c: the slow fallback discards every cluster (QCOW2_DISCARD_SNAPSHOT, full)
        step = (0x7FFFFFFF // cs) * cs
        for offset in range(0, h.size, step):
            await self._pdiscard(offset, min(step, h.size - offset), full=True)

    async def _make_completely_empty(self, l1_clusters: int) -> None:
        """qcow2.c make_completely_empty(): header, reftable, one refblock, a zero L1.

        The dirty bit is set first (qcow2.txt: refcounts may then be wrong), so a crash in
        between leaves an image that the next writable open repairs.
        """
        h = self.header
        cs = h.cluster_size
        await self.update_header_fields(
            incompatible_features=h.incompatible_features | hdr.INCOMPAT_DIRTY)
        await io.pwrite_zeroes(self.file, self.map.l1_offset, l1_clusters * cs)
        self.drop_caches()
        reftable = struct.pack(">Q", 2 * cs) + bytes(cs - 8)
        counts = np.zeros(h.refcount_block_entries, dtype=np.uint64)
        counts[:3 + l1_clusters] = 1
        refblock = refblock_codec(h.refcount_bits)[1](counts)
        await io.pwritev(self.file, cs, reftable + refblock + bytes(l1_clusters * cs))
        await io.flush(self.file.node)
        await self.update_header_fields(l1_table_offset=3 * cs, refcount_table_offset=cs,
                                        refcount_table_clusters=1)
        await self.reload_metadata()
        self.metadata_preallocation = None
        await self.flush_caches()
        self.header.incompatible_features &= ~hdr.INCOMPAT_DIRTY
        await self.update_header()
        await io.flush(self.file.node)
        await io.truncate(self.file, (3 + l1_clusters) * cs)

    async def before_allocation(self) -> None:
        """With lazy refcounts, set the dirty bit before the first allocation (qcow2.txt)."""
        h = self.header
        if self.lazy and not h.dirty:
            await io.pwritev(self.file, 72,
                             struct.pack(">Q", h.incompatible_features | hdr.INCOMPAT_DIRTY))
            await io.flush(self.file.node)
            h.incompatible_features |= hdr.INCOMPAT_DIRTY

    async def l2_depends_on_refcounts(self) -> None:
        """New refcounts must be on disk before the L2 entries that use them."""
        if not self.lazy:
            await self.l2_cache.set_dependency(self.refcounts.cache)

    async def _mark_clean(self) -> None:
        if self.header.dirty:
            await self.flush_caches()
            self.header.incompatible_features &= ~hdr.INCOMPAT_DIRTY
            await self.update_header()
            await io.flush(self.file.node)

    def clusters_freed(self, offsets: np.ndarray) -> None:
        """Forget cached tables of clusters whose refcount dropped to 0."""
        self._zcache = None
        cs = self.header.cluster_size
        for cache in (self.l2_cache, self.refcounts.cache):
            if not len(cache):
                continue
            keys = np.array([k for k, _ in cache.entries()], dtype=np.int64)
            for key in keys[np.isin(keys - keys % cs, offsets)].tolist():
                cache.discard(key)
        self.refcounts.free_byte_offset = self.refcounts.free_byte_offset if not np.isin(
            self.refcounts.free_byte_offset - self.refcounts.free_byte_offset % cs,
            offsets).any() else 0

    async def discard_freed(self, offsets: np.ndarray, kind: str) -> None:
        """Pass the discard of freed clusters to the file (pass-discard-*, QEMU's
        update_refcount_discard()), one request per contiguous run."""
        if kind == "never" or (kind != "always" and not self.pass_discard[kind]):
            return
        cs = self.header.cluster_size
        offsets = np.unique(offsets)
        breaks = np.flatnonzero(np.diff(offsets) != cs) + 1
        for run in np.split(offsets, breaks):
            await io.pdiscard(self.file, int(run[0]), len(run) * cs)

    # -- corruption --------------------------------------------------------------------------

    def corruption(self, msg: str, offset: int = -1, size: int = -1) -> ImageCorrupt:
        """qcow2_signal_corruption(): report, and for a writable image mark it corrupt.

        Returns the error for the caller to raise; the corrupt bit is written by the request
        that raised it (``_guard``).
        """
        fatal = not self.node.read_only
        if not (self.signaled_corruption and (not fatal or self.header.corrupt)):
            if fatal:
                print(f"qcow2: Marking image as corrupt: {msg}; further corruption events "
                      f"will be suppressed", file=sys.stderr)
            else:
                print(f"qcow2: Image is corrupt: {msg}; further non-fatal corruption events "
                      f"will be suppressed", file=sys.stderr)
            if io.event_hook is not None:
                data: dict[str, Any] = {"device": "", "node-name": self.node.node_name,
                                        "msg": msg}
                if offset >= 0:
                    data["offset"] = offset
                if size >= 0:
                    data["size"] = size
                data["fatal"] = fatal
                io.event_hook("BLOCK_IMAGE_CORRUPTED", data)
            if fatal:
                self._corrupt_pending = True
            self.signaled_corruption = True
        return ImageCorrupt(msg)

    async def _write_corrupt_bit(self) -> None:
        self._corrupt_pending = False
        self.unusable = True
        self.header.incompatible_features |= hdr.INCOMPAT_CORRUPT
        try:
            await self.update_header()
            await io.flush(self.file.node)
        except QBlockError:
            pass

    async def _guard(self, coro: Any) -> Any:
        """Run a request; after a fatal corruption write the corrupt bit and stop the node."""
        if self.unusable:
            coro.close()
            raise ImageCorrupt("No medium found", errno=errno.ENOMEDIUM)
        try:
            await self._clean_caches_if_due()
            return await coro
        except ImageCorrupt:
            if self._corrupt_pending:
                await self._write_corrupt_bit()
            raise

    async def overlap_check(self, offset: int, size: int, ignore: str = "") -> None:
        """qcow2_pre_write_overlap_check(): refuse a write that would hit metadata."""
        if not size:
            return
        chk = self.overlap - {ignore.replace("_", "-")}
        cs = self.header.cluster_size
        hit = None
        if "main-header" in chk and offset < cs:
            hit = "main-header"
        else:
            hit = self._overlap(chk, offset - offset % cs, -(-(offset % cs + size) // cs) * cs)
        if hit is not None:
            raise self.corruption(f"Preventing invalid write on metadata (overlaps with "
                                  f"{OVERLAP_NAMES[hit]})", offset, size)

    def _overlap(self, chk: set[str], start: int, size: int) -> str | None:
        cs = self.header.cluster_size
        end = start + size

        def hits(off: int, length: int) -> bool:
            return length > 0 and off < end and start < off + length

        if "active-l1" in chk and hits(self.map.l1_offset, len(self.map.l1) * 8):
            return "active-l1"
        refs = self.refcounts
        if "refcount-table" in chk and hits(refs.table_offset, len(refs.table) * 8):
            return "refcount-table"
        if "snapshot-table" in chk and hits(self.header.snapshots_offset, self.snapshots_size):
            return "snapshot-table"
        if "inactive-l1" in chk:
            for sn in self.snapshots:
                if hits(sn.l1_table_offset, sn.l1_size * 8):
                    return "inactive-l1"
        if self._table_offsets is None:
            self._table_offsets = (_sorted_offsets(self.map.l1, L1E_OFFSET_MASK),
                                   _sorted_offsets(refs.table, REFT_OFFSET_MASK))
        l2s, blocks = self._table_offsets
        if "active-l2" in chk and _hits_sorted(l2s, start, end, cs):
            return "active-l2"
        if "refcount-block" in chk and _hits_sorted(blocks, start, end, cs):
            return "refcount-block"
        bitmaps = self.header.bitmaps
        if ("bitmap-directory" in chk and bitmaps is not None
                and self.header.autoclear_features & hdr.AUTOCLEAR_BITMAPS
                and hits(bitmaps.bitmap_directory_offset, bitmaps.bitmap_directory_size)):
            return "bitmap-directory"
        return None

    def tables_changed(self) -> None:
        """The L1 or refcount table changed: the overlap checks re-read their offsets."""
        self._table_offsets = None

    async def _pre_write_l2(self, offset: int, size: int) -> None:
        await self.overlap_check(offset, size, ignore="active-l2")

    # -- reads -------------------------------------------------------------------------------

    def getlength(self) -> int:
        return self.header.size

    async def co_preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await self._guard(self._preadv(offset, buf))

    async def _preadv(self, offset: int, buf: memoryview) -> None:
        pos = 0
        while pos < len(buf):
            async with self.lock:
                runs = await self.map.lookup(offset + pos, len(buf) - pos)
            await self._read_runs(runs, buf, offset)
            pos = runs[-1].offset + runs[-1].length - offset

    async def co_read_view(self, offset: int, length: int) -> memoryview | None:
        return await self._guard(self._read_view(offset, length))

    async def _read_view(self, offset: int, length: int) -> memoryview | None:
        """A view of the file's bytes when [offset, offset+length) is one run of data
        clusters, contiguous in the file; the backing file's view when it is one run of
        unallocated clusters that the backing file covers (_read_backing() otherwise)."""
        async with self.lock:
            run = (await self.map.lookup(offset, length, first_only=True))[0]
        if run.length < length:
            return None
        if run.kind == DATA:
            return await io.read_view(self.file, run.host, length)
        backing = self.node.backing
        if run.kind == UNALLOC and backing is not None:
            return await io.read_view(backing, offset, length)
        return None

    async def _read_locked(self, offset: int, length: int) -> bytearray:
        """Current guest content, for copy-on-write; the caller holds the lock."""
        out = bytearray(length)
        view = memoryview(out)
        pos = 0
        while pos < length:
            runs = await self.map.lookup(offset + pos, length - pos)
            await self._read_runs(runs, view, offset)
            pos = runs[-1].offset + runs[-1].length - offset
        return out

    async def _read_runs(self, runs: list[Run], buf: memoryview, base: int) -> None:
        for run in runs:
            view = buf[run.offset - base:run.offset - base + run.length]
            if run.kind == DATA:
                await io.preadv(self.file, run.host, view)
            elif run.kind == UNALLOC and self.node.backing is not None:
                await self._read_backing(run.offset, view)
            elif run.kind == COMPRESSED:
                data = await self._decompress(run.entry)
                start = run.offset % self.header.cluster_size
                view[:] = data[start:start + run.length]
            else:
                np.frombuffer(view, dtype=np.uint8)[:] = 0

    async def _read_backing(self, offset: int, view: memoryview) -> None:
        backing = self.node.backing
        assert backing is not None
        inside = max(0, min(len(view), backing.node.length() - offset))
        if inside:
            await io.preadv(backing, offset, view[:inside])
        if inside < len(view):
            np.frombuffer(view[inside:], dtype=np.uint8)[:] = 0

    async def _decompress(self, entry: int) -> bytes:
        if self._zcache is not None and self._zcache[0] == entry:
            return self._zcache[1]
        coffset, csize = self.map.compressed_extent(entry)
        raw = await io.pread(self.file, coffset, csize)
        data = await run_in_pool(decompress_cluster, raw, self.header.cluster_size,
                                 self.header.compression_type)
        self._zcache = (entry, data)
        return data

    # -- writes ------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.header.corrupt:
            raise ImageCorrupt("qcow2: Image is corrupt; cannot be written", errno=errno.EIO)

    async def _write_host(self, host: int, data: memoryview) -> None:
        await self.overlap_check(host, len(data))
        await io.pwritev(self.file, host, data)

    async def zero_host_range(self, host: int, length: int) -> bool:
        """Zero new clusters in the image file without writing data; False if unsupported."""
        await self.overlap_check(host, length)
        try:
            await io.pwrite_zeroes(self.file, host, length, ReqFlags.NO_FALLBACK)
        except NotSupported:
            return False
        return True

    async def lock_range(self, offset: int, length: int) -> None:
        """Take the lock once no allocation in flight overlaps [offset, offset+length)
        (handle_dependencies()); the caller releases it."""
        end = offset + length
        while True:
            await self.lock.acquire()
            busy = next((done for start, stop, done in self.allocs_in_flight
                         if start < end and offset < stop), None)
            if busy is None:
                return
            self.lock.release()
            await busy

    async def co_pwritev(self, offset: int, data: memoryview, flags: ReqFlags) -> None:
        await self._guard(self._pwritev(offset, data, flags))

    async def _pwritev(self, offset: int, data: memoryview, flags: ReqFlags) -> None:
        self._check_writable()
        bits = int(flags)  # plain int: IntFlag arithmetic is slow per request
        if bits & _WRITE_COMPRESSED:
            await self._write_compressed(offset, data)
            return
        pos = 0
        while pos < len(data):
            await self.lock_range(offset + pos, len(data) - pos)
            try:
                runs = await self.map.in_place_runs(offset + pos, len(data) - pos)
                if runs is None:
                    pos += await self.map.allocating_write(
                        offset + pos, data[pos:], self._read_locked, self._write_host)
                    continue
            finally:
                self.lock.release()
            for run in runs:
                await self._write_host(run.host, data[run.offset - offset:
                                                      run.offset - offset + run.length])
            pos = runs[-1].offset + runs[-1].length - offset
        if bits & _FUA:
            await self.co_flush_to_os()
            await io.flush(self.file.node)

    async def _write_compressed(self, offset: int, data: memoryview) -> None:
        """qcow2_co_pwritev_compressed_part(): whole clusters, each compressed if it shrinks.

        Like QEMU's task pool, the clusters of a request are compressed in parallel on the
        thread pool (qcow2-threads.c), off the event loop; they are stored in guest order.
        """
        cs = self.header.cluster_size
        if offset % cs:
            raise InvalidArgument("Compressed writes must be cluster aligned", errno=errno.EINVAL)
        if len(data) % cs and offset + len(data) != self.header.size:
            raise InvalidArgument("Compressed writes must be whole clusters", errno=errno.EINVAL)
        ctype = self.header.compression_type
        window = COMPRESS_WINDOW * cs
        for start in range(0, len(data), window):
            chunks = []
            for pos in range(start, min(start + window, len(data)), cs):
                chunk = data[pos:pos + cs]
                if len(chunk) < cs:
                    chunk = memoryview(bytes(chunk) + bytes(cs - len(chunk)))
                chunks.append(chunk)
            packed = await asyncio.gather(*(run_in_pool(compress_cluster, chunk, ctype)
                                            for chunk in chunks))
            i = 0
            while i < len(packed):  # clusters that do not shrink are stored as they are
                pos = start + i * cs
                if packed[i] is None:
                    # one cluster of the request, not its end: no io.write_allocated news
                    token = io.write_allocated.set(None)
                    try:
                        await self._pwritev(offset + pos, data[pos:pos + cs], ReqFlags.NONE)
                    finally:
                        io.write_allocated.reset(token)
                    i += 1
                    continue
                j = i + 1
                while j < len(packed) and packed[j] is not None:
                    j += 1
                await self.lock_range(offset + pos, (j - i) * cs)
                try:
                    await self.map.write_compressed_entries(offset + pos, packed[i:j],
                                                            self._write_host)
                finally:
                    self.lock.release()
                i = j

    async def co_pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        await self._guard(self._pwrite_zeroes(offset, length, flags))

    async def _pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        """Zero a range with zero clusters/subclusters where possible (qcow2.txt v3).

        Like bdrv_co_do_pwrite_zeroes() + qcow2_co_pwrite_zeroes(): the request is split at
        subcluster boundaries; an unaligned piece becomes a zero subcluster only when the rest
        of its subcluster already reads as zero and holds no data, else zeroes are written.
        """
        if self.header.version < 3:
            raise NotSupported("zero clusters need qcow2 v3")
        self._check_writable()
        unit = self.header.subcluster_size
        size = self.header.size
        end = offset + length
        unmap = bool(flags & ReqFlags.MAY_UNMAP)
        pos = offset
        while pos < end:
            piece_end = min(end, (pos // unit + 1) * unit) if pos % unit else \
                (end if end == size else max(end - end % unit, min(end, pos + unit)))
            if pos % unit == 0 and (piece_end % unit == 0 or piece_end == size):
                await self._zeroize(pos, piece_end - pos, unmap)
            elif not await self._zero_unaligned(pos, piece_end, unmap):
                await self._pwritev(pos, memoryview(bytes(piece_end - pos)), ReqFlags.NONE)
            pos = piece_end

    async def _zero_unaligned(self, start: int, end: int, unmap: bool) -> bool:
        """Zero the whole subcluster around [start, end) if the rest of it reads as zero."""
        unit = self.header.subcluster_size
        size = self.header.size
        u0 = start - start % unit
        u1 = min(u0 + unit, size)
        for a, b in ((u0, start), (end, u1)):
            if b > a:
                st, _ = await io.block_status_above(self.node, None, a, b - a)
                if not st.status & Status.ZERO or st.pnum != b - a:
                    return False
        await self.lock_range(u0, u1 - u0)
        try:
            runs = await self.map.lookup(u0, u1 - u0)
            if any(r.kind not in (ZERO, UNALLOC) for r in runs):
                return False
            await self._zeroize_locked(u0, u1 - u0, unmap)
        finally:
            self.lock.release()
        return True

    async def _zeroize(self, offset: int, length: int, unmap: bool) -> None:
        end = offset + length
        while offset < end:
            await self.lock_range(offset, end - offset)
            try:
                n, done = await self._zeroize_locked(offset, end - offset, unmap)
            finally:
                self.lock.release()
            if not done:
                await self._pwritev(offset, memoryview(bytes(n)), ReqFlags.NONE)
            offset += n

    async def _zeroize_locked(self, offset: int, length: int, unmap: bool) -> tuple[int, bool]:
        """qcow2_subcluster_zeroize() for the part of the range in one L2 slice / cluster.

        Returns the bytes handled and whether they were zeroed (False: the subclusters of a
        compressed cluster, which the caller overwrites with zeroes instead).
        """
        cs = self.header.cluster_size
        if offset % cs or (length < cs and offset + length < self.header.size):
            n = min(length, cs - offset % cs)
            return n, await self.map.zeroize_subclusters(offset, n)
        return await self.map.zeroize(offset, length, unmap), True

    async def co_pdiscard(self, offset: int, length: int) -> None:
        await self._guard(self._pdiscard(offset, length, full=False))

    async def _pdiscard(self, offset: int, length: int, full: bool) -> None:
        """Only whole clusters are discarded (and the partial one at the image end)."""
        self._check_writable()
        cs = self.header.cluster_size
        end = offset + length
        start = -(-offset // cs) * cs
        stop = end if end >= self.header.size else end - end % cs
        pos = start
        while pos < stop:
            await self.lock_range(pos, stop - pos)
            try:
                pos += await self.map.discard(pos, stop - pos, full, self.discard_no_unref,
                                              self.node.backing is not None)
            finally:
                self.lock.release()

    # -- flush, close ------------------------------------------------------------------------

    async def co_flush_to_os(self) -> None:
        if self.unusable or not (self.l2_cache.dirty or self.refcounts.cache.dirty):
            return
        async with self.lock:
            await self.l2_cache.write()
            await self.refcounts.cache.write()

    async def close(self) -> None:
        if not hasattr(self, "refcounts") or self.unusable:
            return
        # Even a node switched to read-only since may hold dirty tables from before.
        if self.node.read_only and not (self.l2_cache.dirty or self.refcounts.cache.dirty):
            return
        async with self.lock:
            if not self.node.read_only:
                await self._store_bitmaps()
            await self.flush_caches()
            await self._mark_clean()

    async def _store_bitmaps(self) -> None:
        try:
            await qbitmap.store_bitmaps(self)
        except QBlockError as e:
            print(f"Lost persistent bitmaps during inactivation of node "
                  f"'{self.node.node_name}': {e}", file=sys.stderr)

    # -- persistent dirty bitmaps (qcow2-bitmap.c) ---------------------------------------------

    def can_store_new_dirty_bitmap(self, name: str, granularity: int) -> None:
        qbitmap.can_store_new(self, name, granularity)

    async def remove_persistent_dirty_bitmap(self, name: str) -> None:
        await qbitmap.remove_persistent(self, name)

    # -- internal snapshots (qcow2-snapshot.c; the work is in snapshot_ops.py) ----------------

    async def snapshot_create(self, name: str, date_sec: int, date_nsec: int,
                              vm_clock_nsec: int, icount: int) -> SnapshotInfo:
        self._check_writable()
        return await snapshot_ops.quiesced(self, snapshot_ops.create(
            self, name, date_sec, date_nsec, vm_clock_nsec, icount))

    async def snapshot_goto(self, id_or_name: str) -> None:
        self._check_writable()
        await snapshot_ops.goto_with_size(self, id_or_name)
        self.metadata_preallocation = None

    async def snapshot_delete(self, id_str: str | None, name: str | None) -> SnapshotInfo:
        self._check_writable()
        return await snapshot_ops.quiesced(self, snapshot_ops.delete(self, id_str, name))

    async def _clean_caches_if_due(self) -> None:
        """cache-clean-interval: drop cache entries unused for that long (checked lazily on
        requests instead of by a timer)."""
        interval = self.cache_clean_interval
        now = time.monotonic()
        if interval and now - self._last_clean >= interval:
            self._last_clean = now
            async with self.lock:
                await self.l2_cache.clean(interval)
                await self.refcounts.cache.clean(interval)

    # -- block status ------------------------------------------------------------------------

    async def co_block_status(self, offset: int, length: int) -> BlockStatus:
        return await self._guard(self._block_status(offset, length))

    async def _block_status(self, offset: int, length: int) -> BlockStatus:
        async with self.lock:
            if self.metadata_preallocation is None:
                self.metadata_preallocation = await self._detect_metadata_preallocation()
            run = (await self.map.lookup(offset, length, first_only=True))[0]
        file = None
        host = 0
        kind = run.kind
        if kind == DATA:
            status = _ST_DATA | _ST_OFFSET_VALID
            host = run.host
            file = self.file.node
        elif kind == COMPRESSED:
            status = _ST_DATA | _ST_COMPRESSED
        elif kind == ZERO:
            status = _ST_ZERO
        else:
            status = 0
        if kind in (ZERO, UNALLOC) and run.host:
            status |= _ST_OFFSET_VALID
            host = run.host
            file = self.file.node
        if self.metadata_preallocation and kind == DATA:
            # Like qcow2_co_block_status(): only with metadata preallocation (more clusters
            # in use than the file holds) does the generic layer look for holes in the file.
            status |= _ST_RECURSE
        return BlockStatus(Status(status), run.length, host, file)

    async def _detect_metadata_preallocation(self) -> bool:
        """qcow2_detect_metadata_preallocation(): more clusters used than the file holds."""
        cs = self.header.cluster_size
        real = self.file.node.drv.allocated_file_size()
        if real is None:
            return False
        real_clusters = real // cs
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = -(-self.file.node.length() // cs)
        counts = await self.refcounts.get_refcounts(0, end_cluster)
        return int(np.count_nonzero(counts)) >= threshold

    # -- truncate ----------------------------------------------------------------------------

    async def co_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        await self._guard(self._truncate(length, prealloc))

    async def _truncate(self, length: int, prealloc: str) -> None:
        h = self.header
        self._check_writable()
        if length % 512:
            raise InvalidArgument("The new size must be a multiple of 512")
        if h.nb_snapshots and h.version < 3:
            # v3 snapshots record their own disk size; v2 ones do not (qcow2_co_truncate).
            raise NotSupported("Can't resize a v2 image which has snapshots")
        if prealloc not in ("off", "metadata", "falloc", "full"):
            raise InvalidArgument(f"Unsupported preallocation mode '{prealloc}'")
        if prealloc != "off" and length < h.size:
            raise InvalidArgument("Preallocation can't be used for shrinking an image")
        qbitmap.truncate_check(self)
        old = h.size
        cs = h.cluster_size
        if length < old:
            await self._pdiscard(-(-length // cs) * cs, old - -(-length // cs) * cs, full=True)
            # no allocation in flight may link clusters past the new end afterwards
            await self.lock_range(length, old - length)
            try:
                await self._shrink_l1(h.size_to_l1(length))
                await self.refcounts.shrink_table()
                await self._truncate_file_tail()
            finally:
                self.lock.release()
        async with self.lock:
            try:
                await self.map.grow_l1(h.size_to_l1(length), exact=True)
            except QBlockError as e:
                raise QBlockError(f"Failed to grow the L1 table: {os.strerror(e.errno)}",
                                  errno=e.errno) from None
        if prealloc != "off" and length > old:
            await self._preallocate(old, length, prealloc)
        backing = self.node.backing
        if length > old and backing is not None and backing.node.length() > old:
            h.size = length
            try:
                await self._pwrite_zeroes_any(old, length - old)
            finally:
                h.size = old
        async with self.lock:
            await self.update_header_fields(size=length)
        for bitmap in self.node.dirty_bitmaps:
            bitmap.resize(length)
        self.l2_cache_resize()

    async def _truncate_file_tail(self) -> None:
        """After a shrink, cut the image file after its last used cluster (qcow2_co_truncate
        with qcow2_get_last_cluster()), so no stale data lies past the end for later
        preallocation to expose."""
        cs = self.header.cluster_size
        file_size = self.file.node.length()
        counts = await self.refcounts.get_refcounts(0, -(-file_size // cs))
        used = np.flatnonzero(counts)
        if not len(used):
            raise self.corruption("There are no references in the refcount table.")
        end = (int(used[-1]) + 1) * cs
        if end < file_size:
            await self.flush_caches()
            try:
                await io.truncate(self.file, end)
            except QBlockError as e:
                print(f"warning: Failed to truncate the tail of the image: {e}", file=sys.stderr)

    async def _preallocate(self, start: int, end: int, mode: str) -> None:
        """Allocate clusters for [start, end) and extend the file over the last of them.

        metadata: the file grows sparse.  falloc/full: the new part of the file is also
        reserved with fallocate or written with zeroes (qcow2_co_truncate), so every data
        cluster has its host blocks.
        """
        cs = self.header.cluster_size
        pos = start - start % cs
        host_end = 0
        while pos < end:
            async with self.lock:
                done, last = await self.map.preallocate(pos, end)
            host_end = max(host_end, last)
            pos += done
        if host_end > self.file.node.length():
            file_mode = "off" if mode == "metadata" else mode
            await io.truncate(self.file, host_end, exact=False, prealloc=file_mode)

    async def _pwrite_zeroes_any(self, offset: int, length: int) -> None:
        try:
            await self._pwrite_zeroes(offset, length, ReqFlags.NONE)
        except NotSupported:
            await self._pwritev(offset, memoryview(bytes(length)), ReqFlags.NONE)

    async def _shrink_l1(self, new_l1_size: int) -> None:
        """qcow2_shrink_l1_table(): drop the L2 tables past the new end."""
        l1 = self.map.l1
        for i in range(new_l1_size, len(l1)):
            l2 = int(l1[i]) & L1E_OFFSET_MASK
            if l2:
                l1[i] = 0
                await self.map.write_l1_entry(i)
                await self.refcounts.free(l2, self.header.cluster_size, "always")

    def l2_cache_resize(self) -> None:
        """The default L2 cache covers the whole disk; follow a resize."""
        h = self.header
        n, _, _ = cache_sizes(h.cluster_size, h.l2_entry_size, h.size,
                              {**self.cache_opts,
                               "l2-cache-entry-size": self.l2_cache.entry_size})
        self.l2_cache.size = max(self.l2_cache.size, n)

    # -- info --------------------------------------------------------------------------------

    def allocated_file_size(self) -> int | None:
        return self.file.node.drv.allocated_file_size()
