"""BlockBackend: the "root" user of a node held by exports, jobs and API callers.

block/block-backend.c: it owns the "root" edge with explicit permissions, checks every request
against the device length, and counts every request in BlockDeviceStats.
"""
from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from qblock import trace
from qblock.block import io
from qblock.block.accounting import AcctType, BlockAcctStats
from qblock.block.graph import BdrvChild, attach_child, detach_child, set_edge_perms
from qblock.block.node import BlockNode, unref_if_unused
from qblock.block.perm import PERM_ALL, Perm, Role
from qblock.drivers.base import BlockStatus, ReqFlags
from qblock.errors import OutOfBounds, QBlockError

if TYPE_CHECKING:
    from collections.abc import Awaitable

_t_preadv = trace.point("blk_co_preadv")
_t_pwritev = trace.point("blk_co_pwritev")


class BlockBackend:
    """A user of one node; ``name`` is the device name (empty in qemu-storage-daemon)."""

    def __init__(self, node: BlockNode, perm: Perm, shared: Perm = PERM_ALL, *,
                 name: str = "", desc: str | None = None) -> None:
        self.name = name
        self._desc = desc
        self.stats = BlockAcctStats()
        self.root: BdrvChild | None = attach_child(self, node, "root", Role.DATA | Role.PRIMARY,
                                                   perm, shared)

    # -- graph -------------------------------------------------------------------------------
    def parent_desc(self) -> str:
        """block-backend.c blk_root_get_parent_desc()."""
        if self._desc:
            return self._desc
        if self.name:
            return f"block device '{self.name}'"
        return "an unnamed block device"

    def child_perms(self, child: BdrvChild) -> tuple[Perm, Perm]:
        return child.perm, child.shared

    @property
    def edge(self) -> BdrvChild:
        if self.root is None:
            raise QBlockError("No medium inserted", errno=errno.ENOMEDIUM)
        return self.root

    @property
    def node(self) -> BlockNode:
        return self.edge.node

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        set_edge_perms(self.edge, perm, shared)

    async def close(self) -> None:
        """Detach from the node; an implicit node nobody else uses is closed."""
        if self.root is None:
            return
        edge, self.root = self.edge, None
        detach_child(edge)
        await unref_if_unused(edge.node)

    # -- requests ----------------------------------------------------------------------------
    def getlength(self) -> int:
        return self.node.length()

    def _check(self, kind: AcctType, offset: int, length: int) -> None:
        """blk_check_byte_request(): the whole request must lie inside the device."""
        size = self.getlength()
        if offset < 0 or length < 0 or offset > size or size - offset < length:
            self.stats.invalid(kind)
            raise OutOfBounds(f"Request of {length} bytes at offset {offset} is outside the "
                              f"device of {size} bytes", errno=errno.EIO)

    async def _account(self, kind: AcctType, nbytes: int, op: Awaitable[None]) -> None:
        start = self.stats.start()
        try:
            await op
        except BaseException:
            self.stats.failed(kind, start)
            raise
        self.stats.done(kind, nbytes, start)

    async def preadv(self, offset: int, buf: memoryview, flags: ReqFlags = ReqFlags.NONE) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (blk_co_preadv)."""
        length = len(buf)
        if _t_preadv.enabled:
            _t_preadv(blk=self.parent_desc(), bs=self.node.node_name, offset=offset,
                      bytes=length, flags=int(flags))
        self._check(AcctType.READ, offset, length)
        await self._account(AcctType.READ, length,
                            io.preadv(self.edge, offset, buf, flags))

    async def read_view(self, offset: int, length: int) -> memoryview | None:
        """``length`` bytes at ``offset`` as a read-only view, without a copy where the nodes
        below can hand one out (io.read_view), else None: read them with preadv() instead.
        A view returned counts as a read in the statistics."""
        self._check(AcctType.READ, offset, length)
        start = self.stats.start()
        try:
            view = await io.read_view(self.edge, offset, length)
        except BaseException:
            self.stats.failed(AcctType.READ, start)
            raise
        if view is not None:
            self.stats.done(AcctType.READ, length, start)
            if _t_preadv.enabled:
                _t_preadv(blk=self.parent_desc(), bs=self.node.node_name, offset=offset,
                          bytes=length, flags=0)
        return view

    async def pread(self, offset: int, length: int) -> bytearray:
        if length < 0:
            self._check(AcctType.READ, offset, length)  # refuse before allocating a buffer
        buf = bytearray(length)
        await self.preadv(offset, memoryview(buf))
        return buf

    async def pwritev(self, offset: int, data: bytes | bytearray | memoryview,
                      flags: ReqFlags = ReqFlags.NONE) -> None:
        """Write ``data`` at ``offset`` (blk_co_pwritev)."""
        view = memoryview(data).cast("B")
        length = len(view)
        if _t_pwritev.enabled:
            _t_pwritev(blk=self.parent_desc(), bs=self.node.node_name, offset=offset,
                       bytes=length, flags=int(flags))
        self._check(AcctType.WRITE, offset, length)
        await self._account(AcctType.WRITE, length,
                            io.pwritev(self.edge, offset, view, flags))

    async def pwrite_zeroes(self, offset: int, length: int,
                            flags: ReqFlags = ReqFlags.NONE) -> None:
        self._check(AcctType.WRITE, offset, length)
        await self._account(AcctType.WRITE, length,
                            io.pwrite_zeroes(self.edge, offset, length, flags))

    async def pdiscard(self, offset: int, length: int) -> None:
        self._check(AcctType.UNMAP, offset, length)
        await self._account(AcctType.UNMAP, length,
                            io.pdiscard(self.edge, offset, length))

    async def flush(self) -> None:
        await self._account(AcctType.FLUSH, 0, io.flush(self.node))

    async def truncate(self, length: int, *, exact: bool = True, prealloc: str = "off") -> None:
        await io.truncate(self.edge, length, exact=exact, prealloc=prealloc)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return await io.block_status(self.node, offset, length)
