"""Changing the options of an existing qcow2 image (QEMU block/qcow2.c qcow2_amend_options).

The steps run in QEMU's order: upgrade to v3 first (later steps may need it), then the
refcount width, the header, lazy refcounts, the size, and a downgrade to v2 last (after the
features v2 lacks are gone).  The refcount width change is qcow2-refcount.c
qcow2_change_refcount_order(): new refcount blocks and table are allocated in (and counted
by) the old structures, written, and switched to by one header write; then the old
structures are freed.  A crash leaves the image consistent, with leaked clusters at worst.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from qblock.block import io
from qblock.drivers.qcow2 import header as hdr
from qblock.drivers.qcow2.cluster import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, \
    OFLAG_COPIED, OFLAG_ZERO, c_hex
from qblock.drivers.qcow2.refcount import REFT_OFFSET_MASK, Refcounts, refblock_codec
from qblock.errors import InvalidArgument, NotSupported, QBlockError

if TYPE_CHECKING:
    from qblock.drivers.qcow2.driver import Qcow2Driver

# qcow2_amend_opts: the order in which qcow2_amend_options() looks at the options.
AMEND_ORDER = ("encrypt.state", "encrypt.keyslot", "encrypt.old-secret", "encrypt.new-secret",
               "encrypt.iter-time", "size", "compat", "backing_file", "backing_fmt",
               "data_file", "data_file_raw", "lazy_refcounts", "refcount_bits")
_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024
_U64 = np.uint64

Status = Callable[[int, int], None]


class _Progress:
    """qcow2_amend_helper_cb(): one progress scale over the operations amend performs."""

    def __init__(self, status: Status | None, total_operations: int) -> None:
        self.status = status
        self.total = max(total_operations, 1)
        self.current: str | None = None
        self.last: str | None = None
        self.completed = 0
        self.offset_completed = 0
        self.last_work = 0

    def operation(self, name: str) -> Status:
        self.current = name
        return self._report

    def _report(self, offset: int, work: int) -> None:
        if self.status is None:
            return
        if self.current != self.last:
            if self.last is not None:
                self.offset_completed += self.last_work
                self.completed += 1
            self.last = self.current
        self.last_work = work
        current = self.offset_completed + work
        projected = current * (self.total - self.completed - 1) // (self.completed + 1)
        self.status(self.offset_completed + offset, current + projected)


async def amend_options(drv: Qcow2Driver, opts: dict[str, Any],
                        status: Status | None = None) -> None:
    """qcow2_amend_options(): apply the explicitly given amend options ``opts``.

    Values are typed: ``size``/``refcount_bits`` int, ``lazy_refcounts``/``data_file_raw``
    bool, the rest str.  Raises QBlockError subclasses with QEMU's messages.
    """
    h = drv.header
    old_version = new_version = h.version
    new_size = 0
    backing_file = backing_format = None
    lazy = drv.lazy
    refcount_bits = h.refcount_bits
    for key in AMEND_ORDER:
        if key not in opts:
            continue
        value = opts[key]
        if key.startswith("encrypt."):
            raise InvalidArgument("Can't amend encryption options - encryption not present")
        if key == "compat":
            if value not in _VERSIONS:
                raise InvalidArgument(f"Unknown compatibility level {value}")
            new_version = _VERSIONS[value]
        elif key == "size":
            new_size = value
        elif key == "backing_file":
            backing_file = value
        elif key == "backing_fmt":
            backing_format = value
        elif key == "lazy_refcounts":
            lazy = value
        elif key == "refcount_bits":
            refcount_bits = value
            if refcount_bits <= 0 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
                raise InvalidArgument("Refcount width must be a power of two and may not "
                                      "exceed 64 bits")
        elif key == "data_file":
            raise InvalidArgument("data-file can only be set for images that use an external "
                                  "data file")
        elif key == "data_file_raw" and value:
            raise InvalidArgument("data-file-raw cannot be set on existing images")
    progress = _Progress(status, (new_version != old_version)
                         + (refcount_bits != h.refcount_bits))
    if new_version > old_version:
        await upgrade(drv, progress.operation("upgrade"))
    if refcount_bits != h.refcount_bits:
        if new_version < 3 and refcount_bits != 16:
            raise InvalidArgument("Refcount widths other than 16 bits require compatibility "
                                  "level 1.1 or above (use compat=1.1 or greater)")
        await change_refcount_order(drv, refcount_bits.bit_length() - 1,
                                    progress.operation("refcount"))
    h.autoclear_features &= ~hdr.AUTOCLEAR_DATA_FILE_RAW
    await _update_header(drv)
    if (backing_file is not None or backing_format is not None) and (
            backing_file != h.backing_file or backing_format != h.backing_format):
        raise InvalidArgument("Cannot amend the backing file\n"
                              "You can use 'qemu-img rebase' instead.")
    if lazy != drv.lazy:
        await _set_lazy_refcounts(drv, lazy, new_version)
    if new_size:
        # Amending asks for exactly this size (exact=true), without preallocation.
        await drv.co_truncate(new_size, True, "off")
    if new_version < old_version:
        await downgrade(drv, progress.operation("downgrade"))


async def _update_header(drv: Qcow2Driver) -> None:
    try:
        await drv.update_header()
        await io.flush(drv.file.node)
    except QBlockError as e:
        raise QBlockError(f"Failed to update the image header: {e}", errno=e.errno) from None


async def _set_lazy_refcounts(drv: Qcow2Driver, lazy: bool, version: int) -> None:
    h = drv.header
    if lazy:
        if version < 3:
            raise InvalidArgument("Lazy refcounts only supported with compatibility level 1.1 "
                                  "and above (use compat=1.1 or greater)")
        h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
    else:
        # Refcounts must be right before the image may claim they are (qcow2_mark_clean).
        async with drv.lock:
            await drv._mark_clean()
        h.compatible_features &= ~hdr.COMPAT_LAZY_REFCOUNTS
    try:
        await _update_header(drv)
    except QBlockError:
        h.compatible_features ^= hdr.COMPAT_LAZY_REFCOUNTS
        raise
    drv.lazy = lazy


# -- versions --------------------------------------------------------------------------------
async def upgrade(drv: Qcow2Driver, status: Status) -> None:
    """qcow2_upgrade(): v2 snapshots get the extra data v3 requires, then the header."""
    from qblock.drivers.qcow2 import snapshot_ops

    status(0, 2)
    if any(sn.extra_data_size < 16 for sn in drv.snapshots):
        async with drv.lock:
            await snapshot_ops.write_snapshots(drv, drv.snapshots)
    status(1, 2)
    h = drv.header
    h.version = 3
    try:
        await _update_header(drv)
    except QBlockError:
        h.version = 2
        raise
    drv.map.v3 = True
    status(2, 2)


async def downgrade(drv: Qcow2Driver, status: Status) -> None:
    """qcow2_downgrade(): to v2, refusing what v2 cannot express (qcow2.txt version 2)."""
    h = drv.header
    if h.refcount_order != 4:
        raise NotSupported("compat=0.10 requires refcount_bits=16")
    for sn in drv.snapshots:
        if sn.vm_state_size > 0xFFFFFFFF or sn.disk_size != h.size:
            raise NotSupported("Internal snapshots prevent downgrade of image")
    if h.dirty:
        async with drv.lock:
            await drv._mark_clean()
    features = h.incompatible_features & ~hdr.INCOMPAT_COMPRESSION
    if features:
        raise NotSupported(f"Cannot downgrade an image with incompatible features {features:#x} "
                           "set")
    # Compatible features may be dropped; autoclear ones are cleared by definition.
    h.compatible_features = 0
    h.autoclear_features = 0
    drv.lazy = False
    try:
        async with drv.lock:
            await expand_zero_clusters(drv, status)
    except QBlockError as e:
        raise QBlockError(f"Failed to turn zero into data clusters: {e}", errno=e.errno) from None
    if h.compression_type != hdr.COMPRESSION_ZLIB:
        if await _has_compressed_clusters(drv):
            raise NotSupported("Cannot downgrade an image with zstd compression type and "
                               "existing compressed clusters")
        h.incompatible_features &= ~hdr.INCOMPAT_COMPRESSION
        h.compression_type = hdr.COMPRESSION_ZLIB
    h.version = 2
    try:
        await _update_header(drv)
    except QBlockError:
        h.version = 3
        raise
    drv.map.v3 = False


async def _has_compressed_clusters(drv: Qcow2Driver) -> bool:
    """qcow2_has_compressed_clusters(): any compressed cluster in the active L2 tables."""
    for l2_offset, _ in _l2_tables(drv, drv.map.l1):
        for slice_offset in _slice_offsets(drv, l2_offset):
            table = await drv.l2_cache.get(slice_offset)
            if ((table & _U64(OFLAG_COMPRESSED)) != 0).any():
                return True
    return False


def _l2_tables(drv: Qcow2Driver, l1: np.ndarray) -> list[tuple[int, int]]:
    """(L2 offset, L1 index) of the allocated L2 tables of an L1 table."""
    cs = drv.header.cluster_size
    out = []
    for i in np.flatnonzero(l1 & _U64(L1E_OFFSET_MASK)).tolist():
        offset = int(l1[i]) & L1E_OFFSET_MASK
        if offset % cs:
            raise drv.corruption(f"L2 table offset {c_hex(offset)} unaligned (L1 index: "
                                 f"{c_hex(i)})")
        out.append((offset, i))
    return out


def _slice_offsets(drv: Qcow2Driver, l2_offset: int) -> list[int]:
    slice_bytes = drv.map.slice_entries * drv.map.entry_size
    return [l2_offset + k for k in range(0, drv.header.cluster_size, slice_bytes)]


async def expand_zero_clusters(drv: Qcow2Driver, status: Status) -> None:
    """qcow2_expand_zero_clusters(): v2 has no zero clusters, so each becomes unallocated
    (no backing file), or a data cluster of zeroes: its own preallocated one, or a new one.

    The active L1 table goes through the L2 cache; snapshot L1 tables are read and
    rewritten on disk.  Zeroes are durable before an L2 entry points at them.
    """
    tables: list[tuple[np.ndarray, bool]] = [(drv.map.l1, True)]
    for sn in drv.snapshots:
        raw = await io.pread(drv.file, sn.l1_table_offset, sn.l1_size * 8)
        tables.append((np.frombuffer(bytes(raw), dtype=">u8").astype(_U64), False))
    total = sum(len(l1) for l1, _ in tables)
    visited = 0
    for l1, active in tables:
        for l2_offset, _ in _l2_tables(drv, l1):
            await _expand_l2(drv, l2_offset, active)
        visited += len(l1)
        status(visited, total)
        if active:
            # Snapshot L1 tables may share these L2 tables, which are read from disk below.
            await drv.l2_cache.flush()
            drv.l2_cache.clear()


async def _expand_l2(drv: Qcow2Driver, l2_offset: int, active: bool) -> None:
    cs = drv.header.cluster_size
    l2_refcount = await drv.refcounts.get_refcount(l2_offset // cs)
    backing = drv.node.backing is not None
    for slice_offset in (_slice_offsets(drv, l2_offset) if active else [l2_offset]):
        if active:
            table = await drv.l2_cache.get(slice_offset)
        else:
            raw = await io.pread(drv.file, slice_offset, cs)
            table = np.frombuffer(bytes(raw), dtype=">u8").astype(_U64)
        e = table
        zero = ((e & _U64(OFLAG_ZERO)) != 0) & ((e & _U64(OFLAG_COMPRESSED)) == 0)
        if not zero.any():
            continue
        host = e & _U64(L2E_OFFSET_MASK)
        plain = np.flatnonzero(zero & (host == 0))
        if not backing:
            # Unallocated clusters read as zeroes when nothing is below.
            table[plain] = 0
            zero[plain] = False
            plain = plain[:0]
        for i in plain.tolist():
            # QEMU allocates these one at a time, filling holes in order.
            offset = await drv.refcounts.alloc_clusters(1)
            if l2_refcount > 1:
                await drv.refcounts.update(offset, cs, l2_refcount - 1)
            host[i] = offset
        idx = np.flatnonzero(zero)
        if len(idx):
            await drv.refcounts.cache.flush()
            await _write_zero_clusters(drv, np.sort(host[idx].astype(np.int64)))
            flag = _U64(OFLAG_COPIED) if l2_refcount == 1 else _U64(0)
            table[idx] = host[idx] | flag
        if active:
            drv.l2_cache.mark_dirty(slice_offset, table)
        else:
            await drv.overlap_check(slice_offset, cs, ignore="inactive_l2")
            await io.pwritev(drv.file, slice_offset, table.astype(">u8").tobytes())


async def _write_zero_clusters(drv: Qcow2Driver, offsets: np.ndarray) -> None:
    """Zero the host clusters at ``offsets`` (sorted), one request per contiguous run."""
    cs = drv.header.cluster_size
    breaks = np.flatnonzero(np.diff(offsets) != cs) + 1
    for run in np.split(offsets, breaks):
        start, length = int(run[0]), len(run) * cs
        await drv.overlap_check(start, length)
        await io.pwrite_zeroes(drv.file, start, length)
    await io.flush(drv.file.node)


# -- refcount width --------------------------------------------------------------------------
async def _check_refcounts_fit(refs: Refcounts, new_bits: int) -> None:
    """walk_over_reftable()'s refusal: the first cluster whose refcount needs more bits."""
    if new_bits >= 64:
        return
    limit = (1 << new_bits) - 1
    for rt in np.flatnonzero(refs.table & _U64(REFT_OFFSET_MASK)).tolist():
        block = await refs.block(rt)
        if block is None:
            continue
        over = np.flatnonzero(block > limit)
        if len(over):
            i = int(over[0])
            offset = (rt * refs.rb_entries + i) * refs.cluster_size
            raise InvalidArgument(f"Cannot decrease refcount entry width to {new_bits} bits: "
                                  f"Cluster at offset {c_hex(offset)} has a refcount of "
                                  f"{int(block[i])}")


async def _new_block_counts(refs: Refcounts, k: int, new_rbe: int) -> np.ndarray:
    """The refcounts new refcount block ``k`` will hold, from the old structures."""
    covered = len(refs.table) * refs.rb_entries
    start = k * new_rbe
    counts = np.zeros(new_rbe, dtype=_U64)
    n = min(new_rbe, covered - start)
    if n > 0:
        counts[:n] = await refs.get_refcounts(start, n)
    return counts


async def _allocation_walk(refs: Refcounts, new_table: list[int], new_rbe: int,
                           status: Status, index: int, total: int) -> bool:
    """One walk of alloc_refblock(): a new block for every non-empty range that has none.

    The blocks are visited in order and each is judged by the refcounts at that moment, as
    allocating may fill holes that were passed already (hence the repeated walks).
    Returns whether anything was allocated.
    """
    cs, rbe = refs.cluster_size, refs.rb_entries
    allocated = False
    k = 0
    while k * new_rbe < len(refs.table) * rbe:
        status(index * len(refs.table) + k * new_rbe // rbe, total * len(refs.table))
        lo, hi = k * new_rbe // rbe, ((k + 1) * new_rbe - 1) // rbe
        used = np.flatnonzero(refs.table[lo:] & _U64(REFT_OFFSET_MASK))
        if not len(used):
            break
        if lo + int(used[0]) > hi:
            # No old refcount block in this range: every refcount in it is 0.
            k = (lo + int(used[0])) * rbe // new_rbe
            continue
        if (await _new_block_counts(refs, k, new_rbe)).any():
            if k >= len(new_table):
                size = -(-(k + 1) // (cs // 8)) * (cs // 8)
                if size > QCOW_MAX_REFTABLE_SIZE // 8:
                    raise NotSupported("This operation would make the refcount table grow "
                                       "beyond the maximum size supported by QEMU, aborting")
                new_table.extend([0] * (size - len(new_table)))
            if not new_table[k]:
                new_table[k] = await refs.alloc_clusters(1)
                allocated = True
        k += 1
    return allocated


async def change_refcount_order(drv: Qcow2Driver, order: int, status: Status) -> None:
    """qcow2_change_refcount_order(): rewrite the refcount structures with 2^order bits."""
    h = drv.header
    cs = h.cluster_size
    new_bits = 1 << order
    new_rbe = cs * 8 // new_bits
    _, encode = refblock_codec(new_bits)
    async with drv.lock:
        await drv.flush_caches()
        refs = drv.refcounts
        await _check_refcounts_fit(refs, new_bits)
        new_table: list[int] = []
        table_offset = table_size = 0
        walk = 0
        try:
            while True:
                total = max(walk + 2, 3)
                grew = await _allocation_walk(refs, new_table, new_rbe, status, walk, total)
                walk += 1
                if not grew:
                    break
                if table_offset:
                    await refs.free(table_offset, table_size * 8, "never")
                table_offset = await refs.alloc_clusters(-(-len(new_table) * 8 // cs))
                table_size = len(new_table)
            await _write_new_structures(drv, refs, new_table, table_offset, new_rbe, encode)
            old_order = h.refcount_order
            old_offset, old_clusters = h.refcount_table_offset, h.refcount_table_clusters
            h.refcount_order = order
            h.refcount_table_offset = table_offset
            h.refcount_table_clusters = len(new_table) * 8 // cs
            try:
                await drv.update_header()
                await io.flush(drv.file.node)
            except QBlockError as e:
                h.refcount_order = old_order
                h.refcount_table_offset, h.refcount_table_clusters = old_offset, old_clusters
                raise QBlockError(f"Failed to update the qcow2 header: {e}",
                                  errno=e.errno) from None
        except BaseException:
            # Give back what the new structures took; the old ones are still in use.
            for offset in filter(None, new_table):
                await refs.free(offset, cs, "other")
            if table_offset:
                await refs.free(table_offset, table_size * 8, "other")
            raise
        new = Refcounts(drv, refs.cache.size)
        await new.load()
        new.free_cluster_index = refs.free_cluster_index
        drv.refcounts = new
        drv.tables_changed()
        # The old blocks and table are now leaked clusters of the new structures: free them.
        for rt in np.flatnonzero(refs.table & _U64(REFT_OFFSET_MASK)).tolist():
            await new.free(int(refs.table[rt]) & REFT_OFFSET_MASK, cs, "other")
        await new.free(old_offset, old_clusters * cs, "other")
        await new.cache.flush()
    status(walk + 1, walk + 1)


async def _write_new_structures(drv: Qcow2Driver, refs: Refcounts, new_table: list[int],
                                table_offset: int, new_rbe: int,
                                encode: Callable[[np.ndarray], bytes]) -> None:
    """flush_refblock() for every new block, then the new table; all durable."""
    for k, offset in enumerate(new_table):
        if not offset:
            continue
        data = encode(await _new_block_counts(refs, k, new_rbe))
        await drv.overlap_check(offset, len(data))
        await io.pwritev(drv.file, offset, data)
    raw = np.array(new_table, dtype=_U64).astype(">u8").tobytes()
    await drv.overlap_check(table_offset, len(raw))
    await io.pwritev(drv.file, table_offset, raw)
    await refs.cache.flush()
    await io.flush(drv.file.node)

