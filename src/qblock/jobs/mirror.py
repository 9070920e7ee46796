"""Mirror and active commit (block/mirror.c; REFERENCE 4.3 and 5 "Active commit / mirror").

A ``mirror_top`` filter goes above the source; guest writes pass through it and mark a dirty
bitmap.  The job copies the dirty chunks (first: what ``sync`` selects) into the target, goes
READY when the target is in sync and keeps mirroring.  job-complete drains the filter, copies
the last dirty chunks and pivots every parent onto the target; a soft cancel of a READY job
ends it without the pivot, the target then holds a consistent copy.
"""
from __future__ import annotations

import enum
from typing import Any

import numpy as np

from qblock.block import io
from qblock.block.backend import BlockBackend
from qblock.block.buffer import blockalign
from qblock.block.graph import detach_child, refresh_perms, replace_node
from qblock.block.node import BlockNode, unref_if_unused
from qblock.block.perm import PERM_ALL, PERM_NONE, Perm
from qblock.drivers.base import ReqFlags, Status
from qblock.errors import InvalidArgument, QBlockError
from qblock.jobs.blockjob import BlockJob
from qblock.jobs.commit import chain_between
from qblock.jobs.filter import FilterTopDriver, insert_filter, remove_filter, undo_insert

MAX_IO_BYTES = 1 << 20  # mirror.c MAX_IO_BYTES
DEFAULT_MIRROR_BUF_SIZE = 1 << 20  # mirror.c DEFAULT_MIRROR_BUF_SIZE


class _Method(enum.Enum):
    """mirror.c MirrorMethod."""

    COPY = "copy"
    ZERO = "zero"
    DISCARD = "discard"


class _TargetError(QBlockError):
    """A request on the mirror target failed (the cause is the original error)."""


class BackingMode(enum.Enum):
    """mirror.c MirrorBackingMode: what the target's backing is after the job."""

    SOURCE_BACKING_CHAIN = "source"  # the target gets the source's backing (drive-mirror)
    OPEN_BACKING_CHAIN = "open"  # the target opens its header's (drive-mirror, existing)
    LEAVE_BACKING_CHAIN = "leave"  # the target keeps its own (blockdev-mirror)


def default_granularity(node: BlockNode) -> int:
    """mirror.c: the cluster size clamped to 4K..64K, 64K without one (REFERENCE 4.3)."""
    header = getattr(node.drv, "header", None)
    if header is None:
        return 65536
    return min(max(header.cluster_size, 4096), 65536)


def check_granularity(granularity: int) -> None:
    """blockdev.c blockdev_mirror_common(): a power of 2 in [512B, 64MB]."""
    if granularity != 0 and not 512 <= granularity <= 64 << 20:
        raise InvalidArgument("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise InvalidArgument("Parameter 'granularity' expects a power of 2")


class MirrorJob(BlockJob):
    """Copy ``source`` into ``target`` while writes go on; READY, then pivot on complete."""

    job_type = "mirror"

    def __init__(self, job_id: str, jobs: dict[str, Any], events: Any, source: BlockNode,
                 target: BlockNode, *, base: BlockNode | None = None, sync_none: bool = False,
                 backing_mode: BackingMode = BackingMode.LEAVE_BACKING_CHAIN,
                 to_replace: BlockNode | None = None, granularity: int = 0,
                 buf_size: int = 0, zero_target: bool = False, unmap: bool = True,
                 filter_node_name: str | None = None, on_source_error: str = "report",
                 on_target_error: str = "report", **kw: Any) -> None:
        if buf_size < 0:
            raise InvalidArgument("Invalid parameter 'buf-size'")
        self.top, self.target_node, self.base = source, target, base
        self.is_commit = target is base and base is not None
        self.sync_none, self.backing_mode = sync_none, backing_mode
        self.to_replace = to_replace or source
        self.zero_target, self.unmap = zero_target, unmap
        self.buf_size = buf_size or DEFAULT_MIRROR_BUF_SIZE
        self.on_source_error, self.on_target_error = on_source_error, on_target_error
        self.filter = insert_filter("mirror_top", source, filter_node_name, takes_perms=True,
                                    keep=[])
        assert isinstance(self.filter.drv, FilterTopDriver)
        self.filter.drv.is_commit = self.is_commit
        self.target_read_only = target.read_only
        self.target: BlockBackend | None = None
        self.pivoted = False
        try:
            super().__init__(job_id, jobs, events, self.filter, Perm.CONSISTENT_READ,
                             Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED, **kw)
        except Exception:
            undo_insert(self.filter)
            raise
        try:
            if self.target_read_only:
                target.set_read_only(False)
            perm, shared = Perm.WRITE, Perm.WRITE_UNCHANGED
            if self.is_commit:
                if target.length() < source.length():
                    perm |= Perm.RESIZE
                shared |= Perm.CONSISTENT_READ | Perm.WRITE
            self.target = BlockBackend(target, perm, shared, desc=self.parent_desc())
            self.backends.append(self.target)
            self.add_node(source, "source", PERM_NONE,
                          Perm.WRITE_UNCHANGED | Perm.WRITE | Perm.CONSISTENT_READ)
            if self.is_commit:
                for node in chain_between(source, target)[1:]:
                    self.add_node(node, "intermediate node", PERM_NONE,
                                  Perm.WRITE_UNCHANGED | Perm.WRITE)
            self.add_node(target, "target", PERM_NONE, PERM_ALL)
        except Exception:
            self.remove_nodes()
            if self.target is not None and self.target.root is not None:
                detach_child(self.target.root)
                self.target.root = None
            if self.target_read_only:
                target.set_read_only(True)
            undo_insert(self.filter)
            self.jobs.pop(self.id, None)
            raise
        self.granularity = granularity or default_granularity(target)
        self.dirty = np.zeros(-(-source.length() // self.granularity), dtype=bool)
        self._buffer: memoryview | None = None  # one copy at a time: one buffer, reused
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
        """mirror_dirty_init(): zero the target if asked, then mark what sync selects."""
        assert self.target is not None
        if self.zero_target:
            # bdrv_can_write_zeroes_with_unmap(): only a node opened with discard=unmap
            if not self.target_node.unmap:
                self._mark_dirty(0, length)
                return
            for offset in range(0, length, MAX_IO_BYTES):
                await self.target.pwrite_zeroes(offset, min(MAX_IO_BYTES, length - offset),
                                                ReqFlags.MAY_UNMAP)
                await self.pause_point()
        if self.sync_none:
            return
        offset = 0
        while offset < length:
            st, depth = await io.block_status_above(self.top, self.base, offset, length - offset)
            if depth > 0:
                self._mark_dirty(offset, st.pnum)
            offset += st.pnum
            await self.pause_point()

    async def _copy_next(self, length: int) -> None:
        """mirror_iteration(): one run of contiguous dirty chunks, at most buf-size bytes."""
        assert self.target is not None
        g = self.granularity
        first = int(np.argmax(self.dirty))
        limit = min(len(self.dirty), first + max(1, min(MAX_IO_BYTES, self.buf_size) // g))
        clean = np.flatnonzero(~self.dirty[first:limit])
        end = first + int(clean[0]) if len(clean) else limit
        self.dirty[first:end] = False
        offset, n = first * g, min(end * g, length) - first * g
        try:
            await self._copy_range(offset, n)
        except QBlockError as e:
            # mirror.c mirror_read_complete/mirror_write_complete: the range stays dirty
            self.dirty[first:end] = True
            is_read = not isinstance(e, _TargetError)
            cause = e.__cause__ if isinstance(e, _TargetError) else e
            assert isinstance(cause, Exception)
            policy = self.on_source_error if is_read else self.on_target_error
            if self.error_action(policy, is_read, cause) == "report":
                raise cause from None
            await self.pause_point()
            return
        self.progress_current += n
        self.progress_total = self.progress_current + self._remaining()
        await self.ratelimit(n)

    async def _copy_range(self, offset: int, n: int) -> None:
        """mirror_iteration()'s inner loop: the range in runs of one block status each, copied,
        zeroed or discarded on the target; a target failure is wrapped in _TargetError."""
        assert self.target is not None
        end = offset + n
        while offset < end:
            method, io_bytes = await self._method(offset, end - offset)
            io_bytes = min(io_bytes, end - offset)  # mirror_clip_bytes()
            if method is _Method.COPY:
                if self._buffer is None or len(self._buffer) < io_bytes:
                    self._buffer = blockalign(max(io_bytes, MAX_IO_BYTES))
                buf = self._buffer[:io_bytes]
                await io.node_preadv(self.top, offset, buf)
            try:
                if method is _Method.COPY:
                    await self.target.pwritev(offset, buf)
                elif method is _Method.ZERO:
                    await self.target.pwrite_zeroes(
                        offset, io_bytes, ReqFlags.MAY_UNMAP if self.unmap else ReqFlags.NONE)
                else:
                    await self.target.pdiscard(offset, io_bytes)
            except QBlockError as e:
                raise _TargetError(str(e)) from e
            offset += io_bytes

    async def _method(self, offset: int, n: int) -> tuple[_Method, int]:
        """mirror_iteration(): how to mirror the run at ``offset`` and its length.

        The status is of the whole source chain; a data run is copied, a run without data
        covering whole chunks (and whole target clusters) is zeroed, or discarded when it
        does not read as zeroes; anything shorter than a chunk is copied as one chunk.
        """
        g = self.granularity
        try:
            st, _depth = await io.block_status_above(self.top, None, offset, n)
        except QBlockError:
            return _Method.COPY, min(n, MAX_IO_BYTES)
        io_bytes = min(st.pnum, MAX_IO_BYTES) if st.status & Status.DATA else st.pnum
        io_bytes -= io_bytes % g
        if io_bytes < g:
            return _Method.COPY, g
        if not st.status & Status.DATA and self._target_cluster_aligned(offset, io_bytes):
            return (_Method.ZERO if st.status & Status.ZERO else _Method.DISCARD), io_bytes
        return _Method.COPY, io_bytes

    def _target_cluster_aligned(self, offset: int, n: int) -> bool:
        """bdrv_round_to_clusters() on the target leaves the range as it is."""
        header = getattr(self.target_node.drv, "header", None)
        cs = header.cluster_size if header is not None else 0
        return not cs or (offset % cs == 0 and n % cs == 0)

    async def run(self) -> None:
        assert self.target is not None
        length = self.top.length()
        if self.is_commit:
            if self.target_node.length() < length:
                await self.target.truncate(length)
        elif self.target_node.length() != length:
            raise QBlockError("Source and target image have different sizes")
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
        """mirror_exit_common(): the target's backing, then every parent onto the target."""
        # the filter stops forwarding permissions: the source may become the target's backing
        self.filter_drv.stopped = True
        refresh_perms([self.filter])
        if self.backing_mode is BackingMode.SOURCE_BACKING_CHAIN:
            backing = self.top if self.sync_none else self.base
            if self.target_node.cow_child() is None and backing is not None:
                self.target_node.set_backing(backing)
        elif self.backing_mode is BackingMode.OPEN_BACKING_CHAIN:
            if self.target_node.cow_child() is None and hasattr(self.target_node.drv,
                                                                "_open_backing"):
                await self.target_node.drv._open_backing({})  # bdrv_open_backing_file()
        if self.cancelled:
            return  # soft cancel of a READY job: the target keeps a point-in-time copy
        assert self.target is not None
        # the job's own WRITE user goes first: the parents moving over may not share it
        await self.target.close()
        self.backends.clear()
        self.target_node.set_read_only(self.to_replace.read_only)
        if self.to_replace is self.top:
            replace_node(self.filter, self.target_node, keep=list(self.nodes))
        else:
            replace_node(self.to_replace, self.target_node, keep=list(self.nodes))
        self.filter_drv.release(self.target_node)
        self.pivoted = True

    async def clean(self) -> None:
        assert self.target is not None
        await self.target.close()
        self.backends.clear()
        held = self.remove_nodes()
        top = await remove_filter(self.filter, [])
        if not self.pivoted and self.target_read_only:
            self.target_node.set_read_only(True)
        for node in [top, *held]:
            await unref_if_unused(node)


class ActiveCommitJob(MirrorJob):
    """Commit of the active layer: READY once base is in sync, pivots on job-complete."""

    job_type = "commit"

    def __init__(self, job_id: str, jobs: dict[str, Any], events: Any, top: BlockNode,
                 base: BlockNode, *, filter_node_name: str | None = None, **kw: Any) -> None:
        super().__init__(job_id, jobs, events, top, base, base=base,
                         filter_node_name=filter_node_name, **kw)
