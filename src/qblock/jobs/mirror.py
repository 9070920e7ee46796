"""Active commit, mirror-style (block/mirror.c commit_active_start; REFERENCE 5 "Active commit").

A ``mirror_top`` filter goes above the active layer ``top``; guest writes pass through it and
mark a dirty bitmap.  The job copies the dirty chunks (first: everything allocated above base)
into base, goes READY when base is in sync and keeps mirroring.  job-complete drains the
filter, copies the last dirty chunks and pivots every parent onto base; a soft cancel of a READY
job ends it without the pivot.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from qblock.block import io
from qblock.block.backend import BlockBackend
from qblock.block.graph import detach_child, replace_node
from qblock.block.node import BlockNode, unref_if_unused
from qblock.block.perm import PERM_ALL, PERM_NONE, Perm
from qblock.drivers.base import Status
from qblock.jobs.blockjob import BlockJob
from qblock.jobs.commit import chain_between
from qblock.jobs.filter import FilterTopDriver, insert_filter, remove_filter, undo_insert

MAX_IO_BYTES = 1 << 20  # mirror.c MAX_IO_BYTES


def default_granularity(node: BlockNode) -> int:
    """mirror.c: the cluster size clamped to 4K..64K, 64K without one (REFERENCE 4.3)."""
    header = getattr(node.drv, "header", None)
    if header is None:
        return 65536
    return min(max(header.cluster_size, 4096), 65536)


class ActiveCommitJob(BlockJob):
    """Commit of the active layer: READY once base is in sync, pivots on job-complete."""

    job_type = "commit"

    def __init__(self, job_id: str, jobs: dict[str, Any], events: Any, top: BlockNode,
                 base: BlockNode, *, filter_node_name: str | None = None, **kw: Any) -> None:
        self.top, self.base = top, base
        self.filter = insert_filter("mirror_top", top, filter_node_name, takes_perms=True,
                                    keep=[])
        self.base_read_only = base.read_only
        self.target: BlockBackend | None = None
        self.pivoted = False
        try:
            super().__init__(job_id, jobs, events, self.filter, Perm.CONSISTENT_READ,
                             Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED, **kw)
        except Exception:
            undo_insert(self.filter)
            raise
        try:
            if self.base_read_only:
                base.set_read_only(False)
            perm = Perm.WRITE | (Perm.RESIZE if base.length() < top.length() else PERM_NONE)
            self.target = BlockBackend(base, perm, Perm.WRITE_UNCHANGED | Perm.CONSISTENT_READ
                                       | Perm.WRITE, desc=self.parent_desc())
            self.backends.append(self.target)
            self.add_node(top, "source", PERM_NONE,
                          Perm.WRITE_UNCHANGED | Perm.WRITE | Perm.CONSISTENT_READ)
            for node in chain_between(top, base)[1:]:
                self.add_node(node, "intermediate node", PERM_NONE,
                              Perm.WRITE_UNCHANGED | Perm.WRITE)
            self.add_node(base, "target", PERM_NONE, PERM_ALL)
        except Exception:
            self.remove_nodes()
            if self.target is not None and self.target.root is not None:
                detach_child(self.target.root)
                self.target.root = None
            if self.base_read_only:
                base.set_read_only(True)
            undo_insert(self.filter)
            self.jobs.pop(self.id, None)
            raise
        self.granularity = default_granularity(base)
        self.dirty = np.zeros(-(-top.length() // self.granularity), dtype=bool)
        drv = self.filter.drv
        assert isinstance(drv, FilterTopDriver)
        self.filter_drv = drv
        drv.on_write = self._mark_dirty

    def supports_complete(self) -> bool:
        return True

    def _mark_dirty(self, offset: int, length: int) -> None:
        g = self.granularity
        self.dirty[offset // g:-(-(offset + length) // g)] = True
        self.kick()

    def _remaining(self) -> int:
        return int(np.count_nonzero(self.dirty)) * self.granularity

    async def _init_dirty(self, length: int) -> None:
        """mirror_dirty_init(): everything allocated above base is dirty."""
        offset = 0
        while offset < length:
            st, depth = await io.block_status_above(self.top, self.base, offset, length - offset)
            if depth > 0:
                self._mark_dirty(offset, st.pnum)
            offset += st.pnum
            await self.pause_point()

    async def _copy_next(self, length: int) -> None:
        """mirror_iteration(): one run of contiguous dirty chunks, at most MAX_IO_BYTES."""
        assert self.target is not None
        g = self.granularity
        first = int(np.argmax(self.dirty))
        limit = min(len(self.dirty), first + MAX_IO_BYTES // g)
        clean = np.flatnonzero(~self.dirty[first:limit])
        end = first + int(clean[0]) if len(clean) else limit
        self.dirty[first:end] = False
        offset, n = first * g, min(end * g, length) - first * g
        st, depth = await io.block_status_above(self.top, self.base, offset, n)
        if depth > 0 and st.status & Status.ZERO and st.pnum == n:
            await self.target.pwrite_zeroes(offset, n)
        else:
            buf = bytearray(n)
            await io.node_preadv(self.top, offset, memoryview(buf))
            await self.target.pwritev(offset, buf)
        self.progress_current += n
        self.progress_total = self.progress_current + self._remaining()
        await self.ratelimit(n)

    async def run(self) -> None:
        assert self.target is not None
        length = self.top.length()
        if self.base.length() < length:
            await self.target.truncate(length)
        await self._init_dirty(length)
        self.progress_total = self._remaining()
        while True:
            await self.pause_point()
            if self.dirty.any():
                await self._copy_next(length)
                continue
            if not self.is_ready():
                await self.target.flush()
                self.set_ready()
            if self.should_complete or self.cancelled:
                await self.filter_drv.drain()
                while self.dirty.any():
                    await self._copy_next(length)
                await self.target.flush()
                return
            await self.sleep(1.0)

    async def prepare(self) -> None:
        """mirror_exit_common(): pivot every parent of the filter onto base."""
        if self.cancelled:
            return  # soft cancel of a READY job: base keeps a point-in-time copy
        self.base.set_read_only(self.top.read_only)
        replace_node(self.filter, self.base, keep=list(self.nodes))
        self.filter_drv.release(self.base)
        self.pivoted = True

    async def clean(self) -> None:
        assert self.target is not None
        await self.target.close()
        self.backends.clear()
        held = self.remove_nodes()
        top = await remove_filter(self.filter, [])
        if not self.pivoted and self.base_read_only:
            self.base.set_read_only(True)
        for node in [top, *held]:
            await unref_if_unused(node)
