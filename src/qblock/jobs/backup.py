"""The backup job (block/backup.c, QEMU 7.2; REFERENCE 4.6).

A copy-before-write filter goes above the source; the job then copies every cluster its copy
bitmap marks, while guest writes copy the old data of the clusters they touch first.  So the
target ends as the source was when the job started.  sync=full copies everything, top only
what the source's top layer allocates, bitmap the dirty granules of a dirty bitmap, none
nothing but what guest writes overwrite (the job runs until cancelled).

With a sync bitmap the bitmap is frozen (busy, not recording) and a successor records the
writes while the job runs; at the end (backup_cleanup_sync_bitmap) either the successor takes
its place ("sync") or is merged back into it, and a failed ``always`` job also merges the
clusters it did not copy.

A failed copy follows on-source-error (a read) or on-target-error (a write) as
backup_error_action() does: report ends the job with the error, ignore retries the range that
stayed dirty, stop (enospc/auto for ENOSPC) pauses the job with its io-status set until
block-job-resume, then retries; meanwhile guest writes still copy their old data through the
filter.  compress=true writes every data cluster compressed, one cluster per request.
"""
from __future__ import annotations

from typing import Any

from qblock.block import io
from qblock.block.dirty_bitmap import CHECK_BUSY, CHECK_DEFAULT, DirtyBitmap, check_bitmap
from qblock.block.node import BlockNode, unref_if_unused
from qblock.block.perm import PERM_ALL, PERM_NONE
from qblock.drivers.base import Status
from qblock.drivers.qcow2.driver import Qcow2Driver
from qblock.errors import QBlockError
from qblock.jobs.blockjob import SLICE_TIME, BlockJob
from qblock.jobs.cbw import CopyBeforeWriteDriver, CopyError, cbw_append, cbw_drop, cbw_undo

CLUSTER_SIZE_DEFAULT = 64 * 1024  # block-copy.c BLOCK_COPY_CLUSTER_SIZE_DEFAULT


def copy_cluster_size(target: BlockNode) -> int:
    """block_copy_calculate_cluster_size(): the target's cluster size, at least 64 KiB."""
    header = getattr(target.drv, "header", None)
    return max(CLUSTER_SIZE_DEFAULT, getattr(header, "cluster_size", 0))


def supports_compressed_writes(node: BlockNode) -> bool:
    """bdrv_supports_compressed_writes(): the driver has compressed writes (qcow2 here), and
    so has the node below a filter."""
    if isinstance(node.drv, Qcow2Driver):
        return True
    edge = node.file if node.drv.is_filter else None
    return edge is not None and supports_compressed_writes(edge.node)


class BackupJob(BlockJob):
    """blockdev-backup: point-in-time copy of ``source`` to ``target``."""

    job_type = "backup"

    def __init__(self, job_id: str, jobs: dict[str, Any], events: Any, source: BlockNode,
                 target: BlockNode, *, sync: str, bitmap: DirtyBitmap | None = None,
                 bitmap_mode: str = "on-success", filter_node_name: str | None = None,
                 on_source_error: str = "report", on_target_error: str = "report",
                 compress: bool = False, **kw: Any) -> None:
        if source is target:
            raise QBlockError("Source and target cannot be the same")
        if source.length() != target.length():
            raise QBlockError("Source and target image have different sizes")
        if bitmap is not None:
            check_bitmap(bitmap, CHECK_DEFAULT if bitmap_mode != "never" else CHECK_BUSY)
        self.source, self.target, self.sync = source, target, sync
        self.sync_bitmap, self.bitmap_mode = bitmap, bitmap_mode
        self.successor: DirtyBitmap | None = None
        self.on_source_error, self.on_target_error = on_source_error, on_target_error
        self.cbw = cbw_append(source, target, filter_node_name, copy_cluster_size(target), [],
                              compress)
        drv = self.cbw.drv
        assert isinstance(drv, CopyBeforeWriteDriver)
        self.bcs = drv.bcs
        try:
            super().__init__(job_id, jobs, events, self.cbw, PERM_NONE, PERM_ALL, **kw)
        except Exception:
            cbw_undo(self.cbw)
            raise
        try:
            self.add_node(target, "target", PERM_NONE, PERM_ALL)
        except Exception:
            self.remove_nodes()
            cbw_undo(self.cbw)
            self.jobs.pop(self.id, None)
            raise
        if bitmap is not None:
            self._create_successor(bitmap)
        if sync == "bitmap":
            # now, before any guest write reaches the filter (backup_init_bcs_bitmap)
            assert bitmap is not None
            self.bcs.copy_bitmap.clear()
            self.bcs.copy_bitmap.set_ranges(*bitmap.extent_arrays())
        self.progress_total = self.bcs.length
        self.bcs.progress = self._copied

    def _copied(self, nbytes: int) -> None:
        self.progress_current += nbytes

    # -- sync bitmap (block/dirty-bitmap.c successor handling) --------------------------------
    def _create_successor(self, bitmap: DirtyBitmap) -> None:
        """bdrv_dirty_bitmap_create_successor(): freeze ``bitmap``, record into a new one."""
        successor = DirtyBitmap(None, bitmap.size, bitmap.granularity, enabled=bitmap.enabled)
        bitmap.enabled = False
        bitmap.busy = True
        self.source.dirty_bitmaps.append(successor)
        self.successor = successor

    def _cleanup_sync_bitmap(self, ok: bool) -> None:
        """backup_cleanup_sync_bitmap()."""
        bitmap, successor = self.sync_bitmap, self.successor
        if bitmap is None or successor is None:
            return
        self.successor = None
        self.source.dirty_bitmaps.remove(successor)
        if (ok or self.bitmap_mode == "always") and self.bitmap_mode != "never":
            bitmap.words[:] = successor.words  # bdrv_dirty_bitmap_abdicate()
        else:
            bitmap.merge(successor)  # bdrv_reclaim_dirty_bitmap()
        bitmap.enabled = successor.enabled
        bitmap.busy = False
        if not ok and self.bitmap_mode == "always":
            bitmap.set_ranges(*self.bcs.copy_bitmap.extent_arrays())

    # -- running ------------------------------------------------------------------------------
    async def _init_copy_bitmap(self) -> None:
        """For sync=top, block_copy_reset_unallocated(); then the progress total."""
        copy = self.bcs.copy_bitmap
        if self.sync == "top":
            offset, length = 0, self.bcs.length
            while offset < length:
                st = await io.block_status(self.source, offset, length - offset)
                n = max(st.pnum, 1)
                if not st.status & Status.ALLOCATED:
                    copy.reset_range(offset, n)
                offset += n
        # copies in flight count once done: wait for them, then nothing is in between
        await self.bcs.wait_in_flight(0, self.bcs.length)
        self.progress_total = copy.count() + self.progress_current

    def _chunk(self) -> int:
        """Bytes per copy request: with a speed limit, what one slice allows (whole
        clusters), so the limit spreads the copying instead of pausing after it."""
        size = self.bcs.copy_size
        if not self.speed:
            return size
        cs = self.bcs.cluster_size
        return max(cs, min(size, int(self.speed * SLICE_TIME) // cs * cs))

    async def run(self) -> None:
        if self.sync == "none":
            while True:  # only guest writes copy; the job ends when cancelled
                await self.pause_point()
                await self.sleep(3600)
        await self._init_copy_bitmap()
        copy = self.bcs.copy_bitmap
        offset = 0
        while True:
            await self.pause_point()
            start = copy.next_dirty(offset)
            if start < 0:
                break
            n = min(self._chunk(), self.bcs.length - start)
            try:
                await self.bcs.copy(start, n)
            except CopyError as e:
                self._copy_failed(e)
                offset = start  # backup_loop(): retry what stayed dirty
                continue
            await self.ratelimit(n)
            offset = start + n
        await io.flush(self.target)

    def _copy_failed(self, e: CopyError) -> None:
        """backup_error_action(): report ends the job with the error; stop pauses it before
        the retry (the loop's pause point), ignore retries at once."""
        policy = self.on_source_error if e.is_read else self.on_target_error
        if self.error_action(policy, e.is_read, e.cause) == "report":
            raise e.cause from None

    # -- completion ---------------------------------------------------------------------------
    async def prepare(self) -> None:
        self._cleanup_sync_bitmap(True)

    async def abort(self) -> None:
        self._cleanup_sync_bitmap(False)

    async def clean(self) -> None:
        """backup_clean(): drop the filter, release the job's edges."""
        held = self.remove_nodes()
        await cbw_drop(self.cbw, [])
        for node in held:
            if node is not self.cbw:
                await unref_if_unused(node)
