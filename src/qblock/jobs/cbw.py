"""The copy-before-write filter and its block-copy state (block/copy-before-write.c,
block/block-copy.c, QEMU 7.2; REFERENCE 4.6).

The filter sits above the backup source with two children: ``file`` (the source, FILTERED |
PRIMARY) and ``target``.  Before a guest write, discard or write-zeroes reaches the source, the
old data of every cluster it touches that the copy bitmap still marks dirty is copied to the
target, so the target stays a point-in-time image of the source.  The backup job copies the
remaining dirty clusters through the same ``BlockCopy``; a cluster is copied at most once.
"""
from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable

from qblock.block import io
from qblock.block.dirty_bitmap import DirtyBitmap
from qblock.block.graph import BdrvChild, replace_node
from qblock.block.node import BlockNode, close_node, registry
from qblock.block.perm import PERM_ALL, ROLE_FILTER, Perm, Role
from qblock.drivers.base import BlockDriver, BlockStatus, ReqFlags, Status
from qblock.errors import QBlockError
from qblock.jobs.filter import insert_node

MAX_COPY = 1 << 20  # block-copy.c BLOCK_COPY_MAX_BUFFER


class CopyError(QBlockError):
    """A copy request failed: ``is_read`` tells whether on the source (block_copy() error_is_read),
    the cause is the original error."""

    def __init__(self, cause: Exception, is_read: bool) -> None:
        super().__init__(str(cause))
        self.cause, self.is_read = cause, is_read
        self.errno = getattr(cause, "errno", None) or errno.EIO


class BlockCopy:
    """block-copy.c BlockCopyState: the copy bitmap and the copies in flight.

    With ``compress`` every data write carries BDRV_REQ_WRITE_COMPRESSED and is one whole
    cluster (block_copy_state_new(): COPY_READ_WRITE_CLUSTER); zeroes are written without it.
    """

    def __init__(self, source: BlockNode, target: BlockNode, cluster_size: int,
                 compress: bool = False) -> None:
        self.source, self.target = source, target
        self.cluster_size = cluster_size
        self.length = source.length()
        self.write_flags = ReqFlags.WRITE_COMPRESSED if compress else ReqFlags.NONE
        # block-copy.c: copy_size is one cluster when compressing, else the bounce buffer
        self.copy_size = cluster_size if compress else max(cluster_size, MAX_COPY)
        self.copy_bitmap = DirtyBitmap(None, self.length, cluster_size)
        self.copy_bitmap.set_all()
        self.in_flight: list[tuple[int, int, asyncio.Event]] = []
        self.progress: Callable[[int], None] | None = None

    def dirty_extents(self, offset: int, end: int) -> list[tuple[int, int]]:
        """The dirty (offset, end) extents of the copy bitmap inside [offset, end)."""
        out = []
        bitmap = self.copy_bitmap
        while offset < end:
            start = bitmap.next_dirty(offset)
            if start < 0 or start >= end:
                break
            stop = bitmap.next_clean(start)
            stop = end if stop < 0 else min(stop, end)
            out.append((start, stop))
            offset = stop
        return out

    async def wait_in_flight(self, offset: int, end: int) -> None:
        while True:
            busy = [ev for s, e, ev in self.in_flight if s < end and offset < e]
            if not busy:
                return
            await busy[0].wait()

    async def copy(self, offset: int, length: int) -> None:
        """Copy the dirty clusters touching [offset, offset + length) to the target, after
        any copy in flight over the same clusters finished (block_copy()).

        A failure raises CopyError; the clusters not copied are dirty again
        (block_copy_task_end()), those copied before it stay clean.
        """
        cs = self.cluster_size
        start = offset // cs * cs
        end = min(-(-(offset + length) // cs) * cs, self.length)
        await self.wait_in_flight(start, end)
        extents = self.dirty_extents(start, end)
        if not extents:
            return
        # claim the clusters before the first await: nobody else copies them
        done = asyncio.Event()
        for s, e in extents:
            self.copy_bitmap.reset_range(s, e - s)
            self.in_flight.append((s, e, done))
        entries = self.in_flight[-len(extents):]
        pending = list(extents)
        try:
            while pending:
                s, e = pending[0]
                n = min(e - s, self.copy_size)
                await self._copy_extent(s, n)
                pending[0] = (s + n, e)
                if s + n >= e:
                    pending.pop(0)
        except BaseException:
            for s, e in pending:
                self.copy_bitmap.set_range(s, e - s)
            raise
        finally:
            for entry in entries:
                self.in_flight.remove(entry)
            done.set()

    async def _status(self, offset: int, length: int) -> tuple[bool, int]:
        """block_copy_block_status(): (zeroes?, bytes) rounded to whole clusters; a run
        shorter than a cluster or an error copies one cluster as data."""
        cs = self.cluster_size
        try:
            st, _ = await io.block_status_above(self.source, None, offset, length)
        except QBlockError:
            return False, min(cs, length)
        n = min(st.pnum, length)
        if n < cs:
            return False, min(cs, length)
        if offset + n != self.length:
            n = n // cs * cs
        return bool(st.status & Status.ZERO), n

    async def _copy_extent(self, offset: int, length: int) -> None:
        """Contiguous requests: zeroes as write-zeroes, data as read + write
        (block_copy_do_copy())."""
        end = offset + length
        while offset < end:
            zeroes, n = await self._status(offset, end - offset)
            if zeroes:
                try:
                    await io.node_pwrite_zeroes(self.target, offset, n, ReqFlags.NONE)
                except QBlockError as e:
                    raise CopyError(e, False) from e
            else:
                buf = bytearray(n)
                try:
                    await io.node_preadv(self.source, offset, memoryview(buf))
                except QBlockError as e:
                    raise CopyError(e, True) from e
                try:
                    await io.node_pwritev(self.target, offset, memoryview(buf),
                                          self.write_flags)
                except QBlockError as e:
                    raise CopyError(e, False) from e
            if self.progress is not None:
                self.progress(n)
            offset += n


class CopyBeforeWriteDriver(BlockDriver):
    """block/copy-before-write.c: copy old data to ``target`` before a write goes to ``file``."""

    format_name = "copy-before-write"
    is_filter = True

    def __init__(self, bcs: BlockCopy) -> None:
        self.bcs = bcs
        self.active = True
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _source(self) -> BlockNode:
        edge = self.node.file
        assert edge is not None
        return edge.node

    def getlength(self) -> int:
        return self._source().length()

    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """cbw_child_perm()."""
        if edge.name == "target":
            # share writes to the target, but no resize: its size was checked once
            return Perm.WRITE, PERM_ALL & ~Perm.RESIZE
        nperm, nshared = self.node.default_child_perms(edge, perm, shared)
        if self.node.parents:
            if perm & Perm.WRITE:
                nperm |= Perm.CONSISTENT_READ
            nshared &= ~(Perm.WRITE | Perm.RESIZE)
        return nperm, nshared

    async def _tracked(self, offset: int, length: int,
                       write: Callable[[BlockNode], Awaitable[None]]) -> None:
        """cbw_do_copy_before_write(), then the request itself on the source.

        A failed copy fails the guest request with its error (copy-before-write.c
        on-cbw-error=break-guest-write, the default); the clusters stay dirty for the job.
        """
        self.in_flight += 1
        self._idle.clear()
        try:
            if self.active:
                try:
                    await self.bcs.copy(offset, length)
                except CopyError as e:
                    raise e.cause from None
            await write(self._source())
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    async def co_preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await io.node_preadv(self._source(), offset, buf, flags)

    async def co_pwritev(self, offset: int, data: memoryview, flags: ReqFlags) -> None:
        await self._tracked(offset, len(data),
                            lambda n: io.node_pwritev(n, offset, data, flags))

    async def co_pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        await self._tracked(offset, length,
                            lambda n: io.node_pwrite_zeroes(n, offset, length, flags))

    async def co_pdiscard(self, offset: int, length: int) -> None:
        await self._tracked(offset, length, lambda n: io.node_pdiscard(n, offset, length))

    async def co_flush_to_os(self) -> None:
        await io.flush(self._source())

    async def co_block_status(self, offset: int, length: int) -> BlockStatus:
        return BlockStatus(Status.RAW | Status.OFFSET_VALID, length, offset, self._source())

    async def drain(self) -> None:
        """Wait until no guest request is inside the filter."""
        while self.in_flight:
            await self._idle.wait()


def cbw_append(source: BlockNode, target: BlockNode, node_name: str | None,
               cluster_size: int, keep: list[BdrvChild], compress: bool = False) -> BlockNode:
    """bdrv_cbw_append(): the filter above ``source``; its parents (but ``keep``) move up."""
    return insert_node(CopyBeforeWriteDriver(BlockCopy(source, target, cluster_size, compress)),
                       "copy-before-write", source, node_name,
                       [(source, "file", ROLE_FILTER), (target, "target", Role.DATA)], keep)


def cbw_detach(node: BlockNode, keep: list[BdrvChild]) -> None:
    """Take the filter out of the graph: its parents (but ``keep``) go back to the source."""
    drv = node.drv
    assert isinstance(drv, CopyBeforeWriteDriver)
    drv.active = False
    source = drv._source()
    if node.parents:
        replace_node(node, source, keep=keep)
    node.remove_child("target")
    node.remove_child("file")


def cbw_undo(node: BlockNode) -> None:
    """Take back ``cbw_append`` when the job that wanted the filter could not be created."""
    cbw_detach(node, [])
    registry.remove(node)
    node.closed = True


async def cbw_drop(node: BlockNode, keep: list[BdrvChild]) -> None:
    """bdrv_cbw_drop(): after the guest requests inside drained, parents go back down."""
    drv = node.drv
    assert isinstance(drv, CopyBeforeWriteDriver)
    drv.active = False
    await drv.drain()
    cbw_detach(node, keep)
    await close_node(node)
