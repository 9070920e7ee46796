"""block-stream (block/stream.c, block/copy-on-read.c; REFERENCE 4.3 and 5 "Stream").

A ``copy-on-read`` filter goes above the device node ``top``.  The job reads every range that
is unallocated in ``top`` but allocated in a layer above ``base`` through the filter, which
writes what it read into ``top``.  On success ``top`` gets ``base`` as backing (or none) and
its header's backing-file string and format are rewritten; the layers in between are dropped.
"""
from __future__ import annotations

import asyncio
from typing import Any

from qblock.block import io
from qblock.block.graph import BdrvChild, replace_node
from qblock.block.node import BlockNode, close_node, registry, unref_if_unused
from qblock.block.perm import PERM_ALL, PERM_NONE, ROLE_FILTER, Perm
from qblock.drivers.base import BlockDriver, BlockStatus, ReqFlags, Status
from qblock.errors import QBlockError
from qblock.jobs.blockjob import BlockJob
from qblock.jobs.filter import insert_node

STREAM_CHUNK = 512 * 1024  # stream.c STREAM_CHUNK
BASIC_FLAGS = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED  # stream.c basic_flags


def filter_or_cow(node: BlockNode) -> BlockNode | None:
    """block.c bdrv_filter_or_cow_bs()."""
    edge = node.filtered_child() or node.cow_child()
    return edge.node if edge is not None else None


class CopyOnReadDriver(BlockDriver):
    """copy-on-read.c: reads of ranges allocated between ``file``'s backing and ``bottom``
    (included) are written back into ``file`` (BDRV_REQ_COPY_ON_READ)."""

    format_name = "copy-on-read"
    is_filter = True

    def __init__(self, bottom: BlockNode) -> None:
        self.below_bottom = filter_or_cow(bottom)
        # a copy (status, read, write-back) must not interleave with a write through the
        # filter, or stale backing data could land over new data (io.c: COR is serialising)
        self.lock = asyncio.Lock()

    def _file(self) -> BdrvChild:
        edge = self.node.file
        assert edge is not None
        return edge

    def getlength(self) -> int:
        return self._file().node.length()

    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # cor_child_perm(): pass through, and always allow copying data into the child
        child_perm, child_shared = self.node.default_child_perms(edge, perm, shared)
        return child_perm | Perm.WRITE_UNCHANGED, child_shared

    async def co_preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        top = self._file().node
        end = offset + len(buf)
        pos = offset
        while pos < end:
            st, depth = await io.block_status_above(top, self.below_bottom, pos, end - pos)
            if depth > 1:  # unallocated in top, allocated above bottom's backing
                async with self.lock:
                    pos += await self._copy(top, pos, end, buf[pos - offset:])
                continue
            await io.node_preadv(top, pos, buf[pos - offset:pos - offset + st.pnum])
            pos += st.pnum

    async def _copy(self, top: BlockNode, pos: int, end: int, buf: memoryview) -> int:
        """Read [pos, ...) into ``buf`` and write it into ``top`` if still unallocated
        there; returns the bytes handled (the status is asked again under the lock)."""
        st, depth = await io.block_status_above(top, self.below_bottom, pos, end - pos)
        n = st.pnum
        part = buf[:n]
        await io.node_preadv(top, pos, part)
        if depth > 1:
            if st.status & Status.ZERO:
                await io.pwrite_zeroes(self._file(), pos, n, ReqFlags.WRITE_UNCHANGED)
            else:
                await io.pwritev(self._file(), pos, part, ReqFlags.WRITE_UNCHANGED)
        return n

    async def co_pwritev(self, offset: int, data: memoryview, flags: ReqFlags) -> None:
        async with self.lock:
            await io.pwritev(self._file(), offset, data, flags)

    async def co_pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        async with self.lock:
            await io.pwrite_zeroes(self._file(), offset, length, flags)

    async def co_pdiscard(self, offset: int, length: int) -> None:
        async with self.lock:
            await io.pdiscard(self._file(), offset, length)

    async def co_flush_to_os(self) -> None:
        await io.flush(self._file().node)

    async def co_block_status(self, offset: int, length: int) -> BlockStatus:
        return BlockStatus(Status.RAW | Status.OFFSET_VALID, length, offset, self._file().node)


def insert_cor_filter(top: BlockNode, bottom: BlockNode, node_name: str | None) -> BlockNode:
    """bdrv_insert_node(): a copy-on-read node above ``top`` takes over its parents."""
    return insert_node(CopyOnReadDriver(bottom), "copy-on-read", top, node_name,
                       [(top, "file", ROLE_FILTER)], [])


async def drop_cor_filter(node: BlockNode) -> None:
    """bdrv_cor_filter_drop(): parents go back to the filtered node; the filter closes."""
    edge = node.file
    assert edge is not None
    if node.parents:
        replace_node(node, edge.node)
    node.remove_child("file")
    await close_node(node)


async def set_backing_string(node: BlockNode, filename: str | None, fmt: str | None) -> None:
    """bdrv_change_backing_file() on a qcow2 node; other formats keep no backing name."""
    if node.drv.format_name == "qcow2":
        await node.drv.change_backing_file(filename, fmt)  # type: ignore[attr-defined]


class StreamJob(BlockJob):
    """Copy the layers between ``top`` and ``base`` into ``top``; finishes by itself."""

    job_type = "stream"

    def __init__(self, job_id: str, jobs: dict[str, Any], events: Any, top: BlockNode,
                 base: BlockNode | None, bottom: BlockNode, *, backing_file: str | None = None,
                 filter_node_name: str | None = None, on_error: str = "report",
                 **kw: Any) -> None:
        self.top, self.base, self.bottom = top, base, bottom
        self.on_error = on_error
        self.backing_file = backing_file
        self.top_read_only = top.read_only
        if self.top_read_only:
            top.set_read_only(False)
        try:
            self.filter = insert_cor_filter(top, bottom, filter_node_name)
        except Exception:
            if self.top_read_only:
                top.set_read_only(True)
            raise
        try:
            super().__init__(job_id, jobs, events, self.filter, PERM_NONE, PERM_ALL, **kw)
        except Exception:
            self._undo_start()
            raise
        try:
            self.add_node(top, "active node", PERM_NONE, BASIC_FLAGS | Perm.WRITE)
            node = filter_or_cow(top)
            while node is not None and node is not base:
                self.add_node(node, "intermediate node", PERM_NONE, BASIC_FLAGS)
                node = filter_or_cow(node)
            self._freeze(True)
        except Exception:
            self.remove_nodes()
            self._undo_start()
            self.jobs.pop(self.id, None)
            raise

    def _undo_start(self) -> None:
        replace_node(self.filter, self.top)
        self.filter.remove_child("file")
        registry.remove(self.filter)
        self.filter.closed = True
        if self.top_read_only:
            self.top.set_read_only(True)

    def _freeze(self, frozen: bool) -> None:
        """bdrv_freeze_backing_chain(top, above_base)."""
        node = self.top
        while node is not self.bottom:
            edge = node.cow_child() or node.filtered_child()
            assert edge is not None
            edge.frozen = frozen
            node = edge.node

    async def run(self) -> None:
        """stream_run(): chunk by chunk, copy what top lacks and the layers above base hold."""
        if self.top is self.bottom:
            return  # nothing to stream
        length = self.top.length()
        self.progress_total = length
        below = filter_or_cow(self.bottom)
        offset = 0
        error: QBlockError | None = None
        while offset < length:
            await self.pause_point()
            st, depth = await io.block_status_above(self.top, below, offset,
                                                    min(STREAM_CHUNK, length - offset))
            n = st.pnum or length - offset
            if depth > 1:
                try:
                    await io.node_preadv(self.filter, offset, memoryview(bytearray(n)),
                                         ReqFlags.PREFETCH)
                except QBlockError as e:
                    # stream.c stream_run(): every error counts as a read; stop retries the
                    # range, ignore goes on but the job still fails with the first error
                    action = self.error_action(self.on_error, True, e)
                    if action == "stop":
                        continue
                    error = error or e
                    if action == "report":
                        raise
                await self.ratelimit(n)
            offset += n
            self.progress_current += n
        if error is not None:
            raise error

    async def prepare(self) -> None:
        """stream_prepare(): top's backing becomes base; its header names base."""
        self._freeze(False)
        edge = self.top.cow_child()
        if edge is None or edge.node is self.base:
            return
        name = fmt = None
        if self.base is not None:
            name = self.backing_file if self.backing_file is not None else self.base.filename
            fmt = self.base.drv.format_name
        self.top.set_backing(self.base)
        await set_backing_string(self.top, name, fmt)

    async def clean(self) -> None:
        if self.top.backing is not None and self.top.backing.frozen:
            self._freeze(False)
        await drop_cor_filter(self.filter)
        held = self.remove_nodes()
        if self.top_read_only and not self.top.closed:
            self.top.set_read_only(True)
        for node in held:
            await unref_if_unused(node)
