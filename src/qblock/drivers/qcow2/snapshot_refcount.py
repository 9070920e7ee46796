"""qcow2_update_snapshot_refcount() (QEMU block/qcow2-refcount.c): one more or one less
reference to every cluster an L1 table reaches, and the COPIED flags set again.

qcow2.txt "Cluster mapping": COPIED is set exactly where the refcount is 1.  The refcounts of
all clusters reached are gathered and changed with table operations, one refcount block at a
time; then every L2 slice gets its COPIED flags from the new refcounts.
"""
from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import numpy as np

from qblock.block import io
from qblock.drivers.qcow2.cluster import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED,
                                          OFLAG_COPIED, c_hex)
from qblock.drivers.qcow2.refcount import REFT_OFFSET_MASK, RefcountError

if TYPE_CHECKING:
    from qblock.drivers.qcow2.driver import Qcow2Driver

_U64 = np.uint64
_COPIED = _U64(OFLAG_COPIED)


async def _refcounts_of(drv: Qcow2Driver, clusters: np.ndarray) -> np.ndarray:
    """Current refcounts of the given cluster indices, one refcount block at a time."""
    refs = drv.refcounts
    out = np.zeros(len(clusters), dtype=np.uint64)
    if not len(clusters):
        return out
    rt = clusters // refs.rb_entries
    for block in np.unique(rt).tolist():
        sel = rt == block
        tbl = await refs.block(block)
        if tbl is not None:
            out[sel] = tbl[clusters[sel] % refs.rb_entries]
    return out


async def _add_refcounts(drv: Qcow2Driver, clusters: np.ndarray, addend: int) -> None:
    """Add ``addend`` times the multiplicity of each cluster index in ``clusters``.

    Like update_refcount(): every refcount block is checked before any is changed, so a
    failure (overflow, underflow) changes nothing.  Freed clusters are discarded in the file
    with pass-discard-snapshot.
    """
    refs = drv.refcounts
    if not len(clusters) or addend == 0:
        return
    uniq, counts = np.unique(clusters, return_counts=True)
    delta = counts.astype(np.uint64) * _U64(abs(addend))
    rt = uniq // refs.rb_entries
    if addend < 0:
        # An L2 entry that dropped a cluster must be on disk before its refcount drops.
        await refs.cache.set_dependency(drv.l2_cache)
    parts = []
    for block in np.unique(rt).tolist():
        sel = np.flatnonzero(rt == block)
        offset = int(refs.table[block]) & REFT_OFFSET_MASK if block < len(refs.table) else 0
        if not offset:
            raise RefcountError(f"Refcount of cluster {c_hex(int(uniq[sel[0]]))} would "
                                "become negative" if addend < 0 else "Refcount block missing",
                                errno=errno.EINVAL)
        tbl = await refs.cache.get(offset)
        idx = uniq[sel] % refs.rb_entries
        cur = tbl[idx].astype(np.uint64)
        if addend > 0 and (cur > _U64(refs.refcount_max) - delta[sel]).any():
            # update_refcount() reports an overflow as -EINVAL too
            raise RefcountError("Refcount overflow", errno=errno.EINVAL)
        if addend < 0 and (cur < delta[sel]).any():
            bad = int(uniq[sel][np.argmax(cur < delta[sel])])
            raise RefcountError(f"Refcount of cluster {c_hex(bad)} would become negative",
                                errno=errno.EINVAL)
        parts.append((offset, idx, sel))
    freed = []
    for offset, idx, sel in parts:
        tbl = await refs.cache.get(offset)
        if addend > 0:
            tbl[idx] = (tbl[idx].astype(np.uint64) + delta[sel]).astype(tbl.dtype)
        else:
            tbl[idx] = (tbl[idx].astype(np.uint64) - delta[sel]).astype(tbl.dtype)
            gone = uniq[sel][tbl[idx] == 0]
            if len(gone):
                freed.append(gone)
        refs.cache.mark_dirty(offset, tbl)
    if freed:
        gone = np.concatenate(freed)
        refs.free_cluster_index = min(refs.free_cluster_index, int(gone.min()))
        offsets = gone.astype(np.int64) * refs.cluster_size
        drv.clusters_freed(offsets)
        await drv.discard_freed(offsets, "snapshot")


def _l2_offsets(drv: Qcow2Driver, l1: np.ndarray) -> list[tuple[int, int]]:
    """(L1 index, L2 table offset) of the allocated entries; corruption if unaligned."""
    cs = drv.header.cluster_size
    offsets = (l1 & _U64(L1E_OFFSET_MASK)).astype(np.int64)
    out = []
    for i in np.flatnonzero(offsets).tolist():
        off = int(offsets[i])
        if off % cs:
            raise drv.corruption(f"L2 table offset {c_hex(off)} unaligned (L1 index: "
                                 f"{c_hex(i)})")
        out.append((i, off))
    return out


async def _slices(drv: Qcow2Driver,
                  l2_offset: int) -> AsyncIterator[tuple[int, int, np.ndarray]]:
    """(slice offset, first entry index, table) of each slice of one L2 table."""
    slice_bytes = drv.l2_cache.entry_size
    per_slice = slice_bytes // drv.header.l2_entry_size
    for k in range(drv.header.cluster_size // slice_bytes):
        offset = l2_offset + k * slice_bytes
        yield offset, k * per_slice, await drv.l2_cache.get(offset)


def _classify(drv: Qcow2Driver, e0: np.ndarray, l2_offset: int,
              first: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask of entries with an own host cluster, mask of compressed entries).

    qcow2_get_cluster_type(): NORMAL and ZERO_ALLOC hold a host cluster; an unaligned one is
    corruption.
    """
    cs = drv.header.cluster_size
    comp = (e0 & _U64(OFLAG_COMPRESSED)) != 0
    host = (e0 & _U64(L2E_OFFSET_MASK)).astype(np.int64)
    normal = ~comp & (host != 0)
    bad = np.flatnonzero(normal & (host % cs != 0))
    if len(bad):
        j = int(bad[0])
        raise drv.corruption(f"Cluster allocation offset {c_hex(int(host[j]))} unaligned "
                             f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(first + j)})")
    return normal, comp


def _compressed_clusters(drv: Qcow2Driver, entries: np.ndarray) -> np.ndarray:
    """Every host cluster the compressed extents of ``entries`` touch, once per entry
    (qcow2.txt "Compressed Clusters Descriptor"; update_refcount() counts each cluster the
    byte range touches)."""
    m, cs = drv.map, drv.header.cluster_size
    coffset = (entries & _U64(m.coffset_mask)).astype(np.int64)
    sectors = ((entries >> _U64(m.csize_shift)) & _U64(m.csize_mask)).astype(np.int64) + 1
    first = coffset // cs
    count = (coffset + sectors * 512 - (coffset & 511) - 1) // cs - first + 1
    starts = np.repeat(np.cumsum(count) - count, count)
    return np.repeat(first, count) + np.arange(int(count.sum()), dtype=np.int64) - starts


async def update_snapshot_refcount(drv: Qcow2Driver, l1: np.ndarray, l1_offset: int,
                                   addend: int) -> None:
    """qcow2_update_snapshot_refcount(): add ``addend`` (-1, 0, 1) to every cluster the L1
    table ``l1`` reaches, then set COPIED exactly where the refcount is 1.

    ``l1`` is modified in place; with ``addend >= 0`` a changed L1 is written to
    ``l1_offset`` (the active one is ``drv.map.l1``).  Ends with the caches flushed.
    """
    cs = drv.header.cluster_size
    ext = drv.header.extended_l2
    tables = _l2_offsets(drv, l1)
    if addend:
        data: list[np.ndarray] = []
        for _, l2_offset in tables:
            async for slice_offset, first, table in _slices(drv, l2_offset):
                e0 = table[:, 0] if ext else table
                normal, comp = _classify(drv, e0, l2_offset, first)
                data.append((e0[normal] & _U64(L2E_OFFSET_MASK)).astype(np.int64) // cs)
                data.append(_compressed_clusters(drv, e0[comp]))
        data.append(np.array([off // cs for _, off in tables], dtype=np.int64))
        await _add_refcounts(drv, np.concatenate(data), addend)
    if addend > 0:
        await drv.l2_cache.set_dependency(drv.refcounts.cache)
    l2_refs = await _refcounts_of(drv, np.array([off // cs for _, off in tables],
                                                dtype=np.int64))
    l1_changed = False
    for (i, l2_offset), l2_ref in zip(tables, l2_refs.tolist()):
        if l2_ref == 0:
            continue  # freed together with the snapshot: nothing to flag
        async for slice_offset, first, table in _slices(drv, l2_offset):
            e0 = table[:, 0] if ext else table
            normal, _ = _classify(drv, e0, l2_offset, first)
            hosts = (e0[normal] & _U64(L2E_OFFSET_MASK)).astype(np.int64) // cs
            copied = np.zeros(len(e0), dtype=bool)
            copied[np.flatnonzero(normal)] = await _refcounts_of(drv, hosts) == 1
            new = np.where(copied, e0 | _COPIED, e0 & ~_COPIED)
            if (new != e0).any():
                if ext:
                    table[:, 0] = new
                else:
                    table[:] = new
                drv.l2_cache.mark_dirty(slice_offset, table)
        entry = l2_offset | (OFLAG_COPIED if l2_ref == 1 else 0)
        if int(l1[i]) != entry:
            l1[i] = _U64(entry)
            l1_changed = True
    await drv.flush_caches()
    if addend >= 0 and l1_changed:
        active = l1_offset == drv.map.l1_offset
        if active:
            drv.tables_changed()
        await drv.overlap_check(l1_offset, len(l1) * 8,
                                ignore="active-l1" if active else "inactive-l1")
        await io.pwritev(drv.file, l1_offset, l1.astype(">u8").tobytes())
        await io.flush(drv.file.node)
