"""block-commit of an intermediate layer (block/commit.c; REFERENCE 4.3 and 5 "Commit").

A ``commit_top`` filter goes above ``top``; the job copies every range allocated in
top..above-base into base.  On success the overlay above ``top`` gets ``base`` as backing, with
its header's backing-file string rewritten, and the layers in between are dropped.
"""
from __future__ import annotations

from typing import Any

from qblock.block import io
from qblock.block.backend import BlockBackend
from qblock.block.graph import detach_child, replace_node
from qblock.block.node import BlockNode, unref_if_unused
from qblock.block.perm import PERM_ALL, PERM_NONE, Perm
from qblock.drivers.base import Status
from qblock.errors import QBlockError
from qblock.jobs.blockjob import BlockJob
from qblock.jobs.filter import insert_filter, remove_filter, undo_insert
from qblock.jobs.stream import set_backing_string

COMMIT_BUFFER_SIZE = 512 * 1024  # commit.c COMMIT_BUFFER_SIZE


def chain_between(top: BlockNode, base: BlockNode) -> list[BlockNode]:
    """``top`` and every node below it down to ``base`` (exclusive)."""
    chain = top.backing_chain()
    return chain[:chain.index(base)]


class CommitJob(BlockJob):
    """Intermediate commit: finishes by itself once base holds top's data."""

    job_type = "commit"

    def __init__(self, job_id: str, jobs: dict[str, Any], events: Any, device: BlockNode,
                 top: BlockNode, base: BlockNode, *, backing_file: str | None = None,
                 backing_mask_protocol: bool = False, filter_node_name: str | None = None,
                 on_error: str = "report", **kw: Any) -> None:
        super().__init__(job_id, jobs, events, device, PERM_NONE, PERM_ALL, **kw)
        self.top, self.base, self.backing_file = top, base, backing_file
        self.on_error = on_error
        self.backing_mask_protocol = backing_mask_protocol
        self.base_read_only = base.read_only
        self.base_blk: BlockBackend | None = None
        self.filter: BlockNode | None = None
        try:
            # the filter first: the overlay above top then reads through commit_top, which
            # takes nothing from top, so the job's edges can refuse others' reads
            self.filter = insert_filter("commit_top", top, filter_node_name, takes_perms=False,
                                        keep=list(self.nodes))
            for node in chain_between(top, base):
                self.add_node(node, "intermediate node", PERM_NONE,
                              Perm.WRITE | Perm.WRITE_UNCHANGED)
            self.add_node(base, "base", PERM_NONE, PERM_ALL)
            if self.base_read_only:
                base.set_read_only(False)
            perm = Perm.CONSISTENT_READ | Perm.WRITE
            if base.length() < top.length():
                perm |= Perm.RESIZE
            self.base_blk = BlockBackend(base, perm, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED,
                                         desc=self.parent_desc())
            self.backends.append(self.base_blk)
            self._freeze(True)
        except Exception:
            self.remove_nodes()
            if self.filter is not None:
                undo_insert(self.filter)
            if self.base_blk is not None and self.base_blk.root is not None:
                detach_child(self.base_blk.root)
                self.base_blk.root = None
            if self.base_read_only:
                base.set_read_only(True)
            self.jobs.pop(self.id, None)
            raise

    def _freeze(self, frozen: bool) -> None:
        """bdrv_freeze_backing_chain(commit_top, base)."""
        assert self.filter is not None
        node = self.filter
        while node is not self.base:
            edge = node.backing
            assert edge is not None
            edge.frozen = frozen
            node = edge.node

    async def run(self) -> None:
        assert self.base_blk is not None
        length = self.top.length()
        self.progress_total = length
        if self.base.length() < length:
            await self.base_blk.truncate(length)
        offset = 0
        while offset < length:
            await self.pause_point()
            st, depth = await io.block_status_above(self.top, self.base, offset,
                                                    min(COMMIT_BUFFER_SIZE, length - offset))
            n = st.pnum
            if depth > 0:
                if not await self._copy(offset, n, bool(st.status & Status.ZERO)):
                    continue  # commit.c commit_run(): ignore and stop retry the same range
                await self.ratelimit(n)
            offset += n
            self.progress_current += n
        await self.base_blk.flush()

    async def _copy(self, offset: int, n: int, zero: bool) -> bool:
        """Copy one allocated range into base; False when it failed and must be retried."""
        assert self.base_blk is not None
        is_read = True
        try:
            if zero:
                is_read = False
                await self.base_blk.pwrite_zeroes(offset, n)
            else:
                buf = bytearray(n)
                await io.node_preadv(self.top, offset, memoryview(buf))
                is_read = False
                await self.base_blk.pwritev(offset, buf)
        except QBlockError as e:
            if self.error_action(self.on_error, is_read, e) == "report":
                raise
            return False
        return True

    async def prepare(self) -> None:
        """commit_prepare() -> bdrv_drop_intermediate(commit_top, base)."""
        assert self.filter is not None
        self._freeze(False)
        name = self.backing_file if self.backing_file is not None else self.base.filename
        fmt = self.base.drv.format_name
        if self.backing_mask_protocol and self.base.drv.is_protocol:
            fmt = "raw"  # REFERENCE 5: a protocol node is recorded as format raw
        for edge in list(self.filter.parents):
            if edge.name == "backing" and isinstance(edge.parent, BlockNode):
                await set_backing_string(edge.parent, name, fmt)
        replace_node(self.filter, self.base, keep=list(self.nodes))

    async def clean(self) -> None:
        assert self.filter is not None and self.base_blk is not None
        if self.filter.backing is not None and self.filter.backing.frozen:
            self._freeze(False)
        await self.base_blk.close()
        self.backends.clear()
        top = await remove_filter(self.filter, list(self.nodes))
        await super().clean()
        if self.base_read_only and not self.base.closed:
            self.base.set_read_only(True)
        await unref_if_unused(top)
