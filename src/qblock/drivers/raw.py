"""The ``raw`` format driver (block/raw-format.c): a window of ``size`` bytes at ``offset``."""
from __future__ import annotations

import errno
from typing import Any

from qblock.block import io
from qblock.block.graph import BdrvChild
from qblock.block.open import open_child
from qblock.block.perm import ROLE_FILTER, Perm, Role
from qblock.drivers.base import BlockDriver, BlockStatus, ReqFlags, Status
from qblock.drivers.options import pop_int
from qblock.errors import InvalidArgument, NotSupported


class RawDriver(BlockDriver):
    format_name = "raw"

    async def open(self, node: Any, options: dict[str, Any]) -> None:
        await super().open(node, options)
        self.offset = pop_int(options, "offset", 0)
        size = options.pop("size", None)
        self.has_size = size is not None
        role = Role.DATA | Role.PRIMARY if self.offset or self.has_size else ROLE_FILTER
        self.file = await open_child(node, options, "file", role)
        file_len = self.file.node.length()
        if self.offset < 0 or self.offset > file_len:
            raise InvalidArgument("The sum of offset (%d) and size (%d) has to be smaller or "
                                  "equal to the actual size of the containing file (%d)"
                                  % (self.offset, int(size or 0), file_len))
        self.size = int(size) if self.has_size else file_len - self.offset
        if self.offset + self.size > file_len:
            raise InvalidArgument("The sum of offset (%d) and size (%d) has to be smaller or "
                                  "equal to the actual size of the containing file (%d)"
                                  % (self.offset, self.size, file_len))
        node.filename = self.file.node.filename
        node.request_alignment = self.file.node.request_alignment

    def getlength(self) -> int:
        if self.has_size:
            return self.size
        return self.file.node.length() - self.offset

    def _range(self, offset: int, length: int) -> int:
        """raw_adjust_offset(): refuse requests beyond an explicit size window."""
        if self.has_size and (offset > self.size or length > self.size - offset):
            raise InvalidArgument("request past the end of the raw window", errno=errno.ENOSPC)
        return offset + self.offset

    async def co_preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await io.preadv(self.file, self._range(offset, len(buf)), buf, flags)

    async def co_read_view(self, offset: int, length: int) -> memoryview | None:
        return await io.read_view(self.file, self._range(offset, length), length)

    async def co_pwritev(self, offset: int, data: memoryview, flags: ReqFlags) -> None:
        await io.pwritev(self.file, self._range(offset, len(data)), data, flags)

    async def co_pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        await io.pwrite_zeroes(self.file, self._range(offset, length), length, flags)

    async def co_pdiscard(self, offset: int, length: int) -> None:
        await io.pdiscard(self.file, self._range(offset, length), length)

    async def co_block_status(self, offset: int, length: int) -> BlockStatus:
        return BlockStatus(Status.RAW | Status.OFFSET_VALID, length, offset + self.offset,
                           self.file.node)

    async def co_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        if self.has_size or self.offset:
            raise NotSupported("Cannot resize fixed-size raw disks")
        await io.truncate(self.file, length, exact=exact, prealloc=prealloc)

    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """raw_child_perm(): the defaults, but WRITE and RESIZE only if the parent takes them.

        A window (offset/size) is a DATA child, for which the defaults add RESIZE to WRITE;
        raw never grows its file on its own, so it drops what its parents did not ask for.
        """
        child_perm, child_shared = self.node.default_child_perms(edge, perm, shared)
        if edge.role & Role.DATA:
            wr = Perm.WRITE | Perm.RESIZE
            child_perm = (child_perm & ~wr) | (perm & wr)
        return child_perm, child_shared
