"""Creating, applying and deleting internal snapshots (QEMU block/qcow2-snapshot.c; the
refcount walk is snapshot_refcount.py), and the generic entry points of block/snapshot.c
(bdrv_snapshot_create/goto/delete/list) that find the node doing the work.

qcow2.txt "Snapshots": a snapshot is a copy of the active L1 table; every cluster it reaches
gets one more reference, and the active tables lose their COPIED flags (qcow2.txt "Cluster
mapping": COPIED means refcount exactly 1), so the next write copies on write.  Order on disk
(crash safety, leaks at worst): the L1 copy and the raised refcounts are durable before the new
snapshot table, which is durable before the header switches to it in one write.

The operations run under quiesced(): no write in flight, the driver's lock held.
"""
from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from qblock.block import io
from qblock.drivers.qcow2.header import QCOW_MAX_L1_SIZE, QCOW_MAX_SNAPSHOTS
from qblock.drivers.qcow2.snapshot import SnapshotInfo, pack_table
from qblock.drivers.qcow2.snapshot_refcount import update_snapshot_refcount
from qblock.errors import NotSupported, QBlockError

if TYPE_CHECKING:
    from qblock.block.node import BlockNode
    from qblock.drivers.qcow2.driver import Qcow2Driver

T = TypeVar("T")
NAME_MAX = 255  # sizeof(QEMUSnapshotInfo.name) - 1


class SnapshotError(QBlockError):
    """A snapshot operation failed; ``errno`` is what QEMU's function returns."""


def _with_errno(prefix: str, e: QBlockError) -> SnapshotError:
    """error_setg_errno(): the message, then the strerror of the cause."""
    return SnapshotError(f"{prefix}: {os.strerror(e.errno or errno.EIO)}", errno=e.errno)


async def quiesced(drv: Qcow2Driver, coro: Coroutine[Any, Any, T]) -> T:
    """Run a snapshot operation like QEMU does inside bdrv_drained_begin(): no write is in
    flight on the node (one between its mapping lookup and its data write could land in a
    cluster the operation shares or frees), and new requests wait for the driver's lock.
    A corruption found on the way marks the image corrupt (the driver's request guard)."""
    node = drv.node

    async def drained() -> T:
        while True:
            pending = [req.done.wait() for req in node.tracked]
            if pending:
                await asyncio.gather(*pending)
            await drv.lock.acquire()
            if not node.tracked:
                break
            drv.lock.release()  # the writes queued for the lock get their turn first
            await asyncio.sleep(0)
        try:
            return await coro
        finally:
            drv.lock.release()

    if drv.unusable:
        coro.close()
    return await drv._guard(drained())


# -- the snapshot table -----------------------------------------------------------------------
async def write_snapshots(drv: Qcow2Driver, snapshots: list[SnapshotInfo]) -> None:
    """qcow2_write_snapshots(): the new table in new clusters, durable, then the header's
    nb_snapshots and snapshots_offset in one write, then the old table is freed."""
    refs = drv.refcounts
    cs = drv.header.cluster_size
    data = pack_table(snapshots)
    offset = 0
    if data:
        offset = await refs.alloc_clusters(-(-len(data) // cs))
    try:
        await refs.cache.flush()
        if data:
            # The header does not point here yet: these clusters must be free of metadata.
            await drv.overlap_check(offset, len(data))
            await io.pwritev(drv.file, offset, data)
        await io.flush(drv.file.node)
        old_offset, old_size = drv.header.snapshots_offset, drv.snapshots_size
        await drv.update_header_fields(nb_snapshots=len(snapshots), snapshots_offset=offset)
    except BaseException:
        if data:
            await refs.free(offset, len(data), "always")
        raise
    drv.snapshots = list(snapshots)
    drv.snapshots_size = len(data)
    if old_size:
        await refs.free(old_offset, old_size, "snapshot")


def find_by_id_and_name(drv: Qcow2Driver, id_str: str | None, name: str | None) -> int:
    """find_snapshot_by_id_and_name(): index of the first match, -1 if none."""
    for i, sn in enumerate(drv.snapshots):
        if (id_str is None or sn.id_str == id_str) and (name is None or sn.name == name) \
                and (id_str is not None or name is not None):
            return i
    return -1


def find_by_id_or_name(drv: Qcow2Driver, id_or_name: str) -> int:
    i = find_by_id_and_name(drv, id_or_name, None)
    return i if i >= 0 else find_by_id_and_name(drv, None, id_or_name)


def _new_id(drv: Qcow2Driver) -> str:
    """find_new_snapshot_id(): one more than the largest numeric id (strtoul prefix)."""
    best = 0
    for sn in drv.snapshots:
        digits = ""
        for ch in sn.id_str.lstrip():
            if not ch.isdigit():
                break
            digits += ch
        best = max(best, int(digits) if digits else 0)
    return str(best + 1)


def _validate_l1(drv: Qcow2Driver, sn: SnapshotInfo) -> None:
    """qcow2_validate_table() for a snapshot's L1 table."""
    if sn.l1_size > QCOW_MAX_L1_SIZE // 8:
        raise SnapshotError("Snapshot L1 table too large", errno=errno.EFBIG)
    if sn.l1_table_offset % drv.header.cluster_size or \
            sn.l1_table_offset + sn.l1_size * 8 > (1 << 63) - 1:
        raise SnapshotError("Snapshot L1 table offset invalid", errno=errno.EINVAL)


async def _read_l1(drv: Qcow2Driver, sn: SnapshotInfo, size: int) -> np.ndarray:
    raw = bytes(await io.pread(drv.file, sn.l1_table_offset, sn.l1_size * 8))
    l1 = np.zeros(size, dtype=np.uint64)
    l1[:sn.l1_size] = np.frombuffer(raw, dtype=">u8")
    return l1


# -- the operations ---------------------------------------------------------------------------
async def create(drv: Qcow2Driver, name: str, date_sec: int, date_nsec: int,
                 vm_clock_nsec: int = 0, icount: int = 0) -> SnapshotInfo:
    """qcow2_snapshot_create(): a new snapshot of the active state with the next free id."""
    if len(drv.snapshots) >= QCOW_MAX_SNAPSHOTS:
        raise SnapshotError("Too many snapshots", errno=errno.EFBIG)
    cs = drv.header.cluster_size
    active = drv.map.l1
    refs = drv.refcounts
    l1_offset = 0
    if len(active):
        l1_offset = await refs.alloc_clusters(-(-len(active) * 8 // cs))
        await refs.cache.flush()
    try:
        if len(active):
            await drv.overlap_check(l1_offset, len(active) * 8)
            await io.pwritev(drv.file, l1_offset, active.astype(">u8").tobytes())
        # The copy keeps the COPIED flags QEMU's copy keeps; only active tables are checked.
        await update_snapshot_refcount(drv, active, drv.map.l1_offset, 1)
    except BaseException:
        if len(active):
            await refs.free(l1_offset, len(active) * 8, "always")
        raise
    sn = SnapshotInfo(l1_offset, len(active), _new_id(drv), name, date_sec=date_sec,
                      date_nsec=date_nsec, vm_clock_nsec=vm_clock_nsec,
                      disk_size=-(-drv.header.size // 512) * 512, icount=icount)
    await write_snapshots(drv, [*drv.snapshots, sn])
    return sn


def _find_for_goto(drv: Qcow2Driver, id_or_name: str) -> SnapshotInfo:
    i = find_by_id_or_name(drv, id_or_name)
    if i < 0:
        raise SnapshotError("Failed to load snapshot", errno=errno.ENOENT)
    sn = drv.snapshots[i]
    _validate_l1(drv, sn)
    return sn


async def goto_with_size(drv: Qcow2Driver, id_or_name: str) -> None:
    """qcow2_snapshot_goto(): first the image gets the snapshot's size back (a resize through
    a temporary BlockBackend, as QEMU 7.2 does it), then goto()."""
    from qblock.block.backend import BlockBackend
    from qblock.block.perm import PERM_ALL, Perm

    sn = _find_for_goto(drv, id_or_name)
    if sn.disk_size != -(-drv.header.size // 512) * 512:
        blk = BlockBackend(drv.node, Perm.RESIZE, PERM_ALL)
        try:
            await blk.truncate(sn.disk_size, exact=True)
        finally:
            await blk.close()
    await quiesced(drv, goto(drv, id_or_name))


async def goto(drv: Qcow2Driver, id_or_name: str) -> None:
    """The active L1 becomes a copy of the snapshot's (the sizes already match)."""
    sn = _find_for_goto(drv, id_or_name)
    await drv.map.grow_l1(sn.l1_size, exact=True)
    new = await _read_l1(drv, sn, len(drv.map.l1))
    # Raise the refcounts of what the snapshot reaches before the active L1 points at it;
    # drop those of the old active tables only once the L1 on disk is overwritten.
    await update_snapshot_refcount(drv, new[:sn.l1_size].copy(), sn.l1_table_offset, 1)
    l1_offset = drv.map.l1_offset
    await drv.overlap_check(l1_offset, len(new) * 8, ignore="active-l1")
    await io.pwritev(drv.file, l1_offset, new.astype(">u8").tobytes())
    await io.flush(drv.file.node)
    old = drv.map.l1
    try:
        await update_snapshot_refcount(drv, old.copy(), -1, -1)
    finally:
        drv.map.l1 = new
        drv.tables_changed()
    await update_snapshot_refcount(drv, drv.map.l1, l1_offset, 0)


async def delete(drv: Qcow2Driver, id_str: str | None, name: str | None) -> SnapshotInfo:
    """qcow2_snapshot_delete(): drop the entry, then the references it held."""
    i = find_by_id_and_name(drv, id_str, name)
    if i < 0:
        raise SnapshotError("Can't find the snapshot", errno=errno.ENOENT)
    sn = drv.snapshots[i]
    _validate_l1(drv, sn)
    try:
        if drv.node.read_only:
            # bdrv_co_write_req_prepare(): writes to a read-only node fail with EPERM
            raise QBlockError("read-only node", errno=errno.EPERM)
        await write_snapshots(drv, drv.snapshots[:i] + drv.snapshots[i + 1:])
    except QBlockError as e:
        raise _with_errno("Failed to remove snapshot from snapshot list", e) from None
    # From here on a failure leaks clusters but loses nothing.
    try:
        l1 = await _read_l1(drv, sn, sn.l1_size)
        await update_snapshot_refcount(drv, l1, sn.l1_table_offset, -1)
        if sn.l1_size:
            await drv.refcounts.free(sn.l1_table_offset, sn.l1_size * 8, "snapshot")
    except QBlockError as e:
        raise _with_errno("Failed to free the cluster and L1 table", e) from None
    try:
        await update_snapshot_refcount(drv, drv.map.l1, drv.map.l1_offset, 0)
    except QBlockError as e:
        raise _with_errno("Failed to update snapshot status in disk", e) from None
    return sn


# -- block/snapshot.c: the generic layer ------------------------------------------------------
def snapshot_node(node: BlockNode) -> BlockNode | None:
    """The node whose driver does the snapshots: the node itself, or through the file child
    of raw and filters (bdrv_snapshot_fallback()); None if there is none."""
    while node is not None:
        if hasattr(node.drv, "snapshot_create"):
            return node
        if not (node.drv.is_filter or node.drv.format_name == "raw") or node.file is None:
            return None
        node = node.file.node
    return None


def now() -> tuple[int, int]:
    """(date_sec, date_nsec) with microsecond precision like g_get_real_time()."""
    us = time.time_ns() // 1000
    return us // 1_000_000, us % 1_000_000 * 1000


async def bdrv_snapshot_create(node: BlockNode, name: str, *, vm_clock_nsec: int = 0,
                               icount: int = 0) -> SnapshotInfo:
    """bdrv_snapshot_create(); NotSupported (ENOTSUP) where no driver takes snapshots."""
    target = snapshot_node(node)
    if target is None:
        raise NotSupported("Operation not supported", errno=errno.ENOTSUP)
    sec, nsec = now()
    return await target.drv.snapshot_create(name.encode()[:NAME_MAX].decode("utf-8", "ignore"),
                                            sec, nsec, vm_clock_nsec, icount)


async def bdrv_snapshot_goto(node: BlockNode, id_or_name: str) -> None:
    """bdrv_snapshot_goto(): refused while dirty bitmaps exist (they would not match)."""
    if node.dirty_bitmaps:
        raise SnapshotError("Device has active dirty bitmaps", errno=errno.EBUSY)
    target = snapshot_node(node)
    if target is None:
        raise NotSupported("Block driver does not support snapshots", errno=errno.ENOTSUP)
    try:
        await target.drv.snapshot_goto(id_or_name)
    except QBlockError as e:
        raise _with_errno("Failed to load snapshot", e) from None


async def bdrv_snapshot_delete(node: BlockNode, id_str: str | None,
                               name: str | None) -> SnapshotInfo:
    """bdrv_snapshot_delete()."""
    if id_str is None and name is None:
        raise SnapshotError("snapshot_id and name are both NULL", errno=errno.EINVAL)
    target = snapshot_node(node)
    if target is None:
        raise NotSupported(f"Block format '{node.drv.format_name}' used by device '' does not "
                           "support internal snapshot deletion", errno=errno.ENOTSUP)
    return await target.drv.snapshot_delete(id_str, name)


def bdrv_snapshot_list(node: BlockNode) -> list[SnapshotInfo]:
    """bdrv_snapshot_list(); NotSupported (ENOTSUP) where there are no snapshots to list."""
    target = snapshot_node(node)
    if target is None:
        raise NotSupported("Operation not supported", errno=errno.ENOTSUP)
    return list(target.drv.snapshots)


def bdrv_can_snapshot(node: BlockNode) -> bool:
    """bdrv_can_snapshot(): a writable node whose driver (or fallback) takes snapshots."""
    return not node.read_only and snapshot_node(node) is not None
