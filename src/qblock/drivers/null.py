"""The ``null-co`` and ``null-aio`` protocol drivers (block/null.c): a sink of given size."""
from __future__ import annotations

from typing import Any

from qblock.drivers.base import BlockDriver, BlockStatus, ReqFlags, Status
from qblock.drivers.options import pop_bool, pop_int

DEFAULT_SIZE = 1 << 30


class NullDriver(BlockDriver):
    format_name = "null-co"
    is_protocol = True

    async def open(self, node: Any, options: dict[str, Any]) -> None:
        await super().open(node, options)
        self.size = pop_int(options, "size", DEFAULT_SIZE)
        self.read_zeroes = pop_bool(options, "read-zeroes", False)
        pop_int(options, "latency-ns", 0)
        node.filename = "null-co://"

    def getlength(self) -> int:
        return self.size

    async def co_preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        if self.read_zeroes:
            buf[:] = bytes(len(buf))

    async def co_pwritev(self, offset: int, data: memoryview, flags: ReqFlags) -> None:
        return

    async def co_pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        return

    async def co_block_status(self, offset: int, length: int) -> BlockStatus:
        """null.c null_co_block_status(): zero with read-zeroes, otherwise nothing allocated."""
        status = Status.OFFSET_VALID | (Status.ZERO if self.read_zeroes else Status.NONE)
        return BlockStatus(status, length, offset, self.node)

    def allocated_file_size(self) -> int | None:
        """null.c null_allocated_file_size(): nothing is stored."""
        return 0


class NullAioDriver(NullDriver):
    format_name = "null-aio"
