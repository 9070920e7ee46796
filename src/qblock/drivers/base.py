"""The interface every block driver implements (QEMU's BlockDriver callbacks).

A driver instance is the per-node state (QEMU's ``bs->opaque``); ``self.node`` is its node.
Requests reach a driver only through block/io.py, already checked and aligned to
``node.request_alignment``; buffers are memoryviews the driver fills or consumes whole.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any, ClassVar

from qblock.block.perm import Perm, Role
from qblock.errors import NotSupported

if TYPE_CHECKING:
    from qblock.block.graph import BdrvChild
    from qblock.block.node import BlockNode


class ReqFlags(enum.IntFlag):
    """BDRV_REQ_* request flags (include/block/block-common.h)."""

    NONE = 0
    COPY_ON_READ = 0x1
    ZERO_WRITE = 0x2
    MAY_UNMAP = 0x4
    FUA = 0x10
    WRITE_COMPRESSED = 0x20
    WRITE_UNCHANGED = 0x40
    SERIALISING = 0x80
    NO_FALLBACK = 0x100
    PREFETCH = 0x200


class Status(enum.IntFlag):
    """BDRV_BLOCK_* block-status bits."""

    NONE = 0
    DATA = 0x01
    ZERO = 0x02
    OFFSET_VALID = 0x04
    RAW = 0x08
    ALLOCATED = 0x10
    EOF = 0x20
    RECURSE = 0x40
    COMPRESSED = 0x80


@dataclasses.dataclass(frozen=True)
class BlockStatus:
    """The status of ``pnum`` bytes from the queried offset (bdrv_co_block_status)."""

    status: Status
    pnum: int
    map: int = 0
    file: BlockNode | None = None


class BlockDriver:
    """Base class; subclasses override what their format or protocol supports."""

    format_name: ClassVar[str] = ""
    is_protocol: ClassVar[bool] = False
    is_filter: ClassVar[bool] = False
    supports_backing: ClassVar[bool] = False

    node: BlockNode

    async def open(self, node: BlockNode, options: dict[str, Any]) -> None:
        """Open the node; consume the driver's own keys from ``options``."""
        self.node = node

    async def close(self) -> None:
        """Write back anything cached and release resources."""

    def getlength(self) -> int:
        raise NotImplementedError

    async def co_preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        raise NotSupported(f"Driver '{self.format_name}' cannot read")

    async def co_read_view(self, offset: int, length: int) -> memoryview | None:
        """The bytes at ``offset`` as a read-only view of memory that already holds them (a
        page cache mapping), or None: the caller reads them into a buffer instead."""
        return None

    async def co_pwritev(self, offset: int, data: memoryview, flags: ReqFlags) -> None:
        raise NotSupported(f"Driver '{self.format_name}' cannot write")

    async def co_pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        """Write zeroes efficiently; NotSupported makes the caller write a zero buffer."""
        raise NotSupported("efficient zero writes not supported")

    async def co_pdiscard(self, offset: int, length: int) -> None:
        """Drop data (advisory); the default does nothing, as QEMU's does without a callback."""

    async def co_flush_to_os(self) -> None:
        """Write cached metadata down to the child nodes."""

    async def co_flush_to_disk(self) -> None:
        """Make written data durable (protocol drivers)."""

    async def co_block_status(self, offset: int, length: int) -> BlockStatus:
        """Allocation status from ``offset``; the default says 'all data, go below'."""
        child = self.node.storage_child()
        if child is None:
            return BlockStatus(Status.DATA | Status.ALLOCATED, length)
        return BlockStatus(Status.RAW | Status.OFFSET_VALID, length, offset, child.node)

    async def co_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        raise NotSupported("Image format driver does not support resize")  # io.c bdrv_co_truncate

    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        return self.node.default_child_perms(edge, perm, shared)

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        """Refuse permissions the driver cannot take (file locking); nothing is kept yet."""

    def abort_perm(self) -> None:
        """Undo what ``check_perm`` prepared."""

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Apply the node's new cumulative permissions."""

    def reopen_read_only(self, read_only: bool) -> None:
        """Switch between read-only and read-write (bdrv_reopen)."""

    def allocated_file_size(self) -> int | None:
        """Host bytes allocated (ImageInfo actual-size); None when unknown.

        block.c bdrv_sum_allocated_file_size(): the sum over children holding data or metadata.
        """
        total = None
        for edge in self.node.children.values():
            if edge.role & (Role.DATA | Role.METADATA | Role.FILTERED):
                size = edge.node.drv.allocated_file_size()
                if size is not None:
                    total = (total or 0) + size
        return total
