"""A minimal ``blkdebug`` filter (block/blkdebug.c): inject errors into requests of a child.

Only ``inject-error`` rules are supported.  In QEMU a rule is armed when the driver above fires
its ``event`` (blkdebug_debug_event(): the event's rules replace the active set), and an armed
rule fails a request whose I/O type is in its mask and whose range holds its sector
(rule_check()).  A format driver fires ``read_aio`` before each data read of its file and
``write_aio`` before each data write (raw_co_preadv/pwritev, qcow2), so this driver fires those
two events itself when a read or a write reaches it.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any

from qblock.block import io
from qblock.block.open import open_child
from qblock.block.perm import ROLE_FILTER
from qblock.drivers.base import BlockDriver, BlockStatus, ReqFlags, Status
from qblock.drivers.options import to_bool, to_int
from qblock.errors import InvalidArgument, QBlockError


class IOType(enum.IntEnum):
    """qapi/block-core.json BlkdebugIOType."""

    READ = 0
    WRITE = 1
    WRITE_ZEROES = 2
    DISCARD = 3
    FLUSH = 4
    BLOCK_STATUS = 5


_IOTYPE_NAMES = {"read": IOType.READ, "write": IOType.WRITE,
                 "write-zeroes": IOType.WRITE_ZEROES, "discard": IOType.DISCARD,
                 "flush": IOType.FLUSH, "block-status": IOType.BLOCK_STATUS}
# blkdebug.c add_rule(): without iotype a rule applies to every type but block-status
_DEFAULT_MASK = frozenset(_IOTYPE_NAMES.values()) - {IOType.BLOCK_STATUS}


@dataclass
class InjectRule:
    """One BlkdebugInjectErrorOptions entry."""

    event: str
    errno: int
    offset: int  # sector * 512, or -1 for any
    once: bool
    iotypes: frozenset[IOType]

    @classmethod
    def parse(cls, opts: dict[str, Any]) -> InjectRule:
        opts = dict(opts)
        event = opts.pop("event", None)
        if not isinstance(event, str):
            raise InvalidArgument("Parameter 'event' is missing")
        errno = to_int(opts.pop("errno", 5), "errno")  # default EIO
        sector = to_int(opts.pop("sector", -1), "sector")
        once = to_bool(opts.pop("once", False), "once")
        iotype = opts.pop("iotype", None)
        opts.pop("immediately", None)  # completion timing only
        if to_int(opts.pop("state", 0), "state"):
            raise InvalidArgument("blkdebug: qblock supports only rules without a state")
        if opts:
            raise InvalidArgument(f"Invalid parameter '{next(iter(opts))}'")
        if iotype is None:
            iotypes = _DEFAULT_MASK
        elif iotype in _IOTYPE_NAMES:
            iotypes = frozenset({_IOTYPE_NAMES[iotype]})
        else:
            raise InvalidArgument(f"Parameter 'iotype' does not accept value '{iotype}'")
        return cls(event, errno, sector * 512 if sector >= 0 else -1, once, iotypes)

    def matches(self, iotype: IOType, offset: int, length: int) -> bool:
        """rule_check(): the type is in the mask and the sector lies in the request."""
        if iotype not in self.iotypes:
            return False
        return self.offset < 0 or (length > 0 and offset <= self.offset < offset + length)


class BlkdebugDriver(BlockDriver):
    format_name = "blkdebug"
    is_filter = True

    async def open(self, node: Any, options: dict[str, Any]) -> None:
        await super().open(node, options)
        rules = options.pop("inject-error", [])
        if not isinstance(rules, list):
            raise InvalidArgument("Parameter 'inject-error' expects an array")
        self.rules = [InjectRule.parse(r) for r in rules]
        self.active: list[InjectRule] = []
        self.image = await open_child(node, options, "image", ROLE_FILTER)
        node.filename = self.image.node.filename
        node.request_alignment = self.image.node.request_alignment

    def getlength(self) -> int:
        return self.image.node.length()

    def _event(self, event: str) -> None:
        """blkdebug_debug_event(): an event with inject rules makes them the active set."""
        armed = [r for r in self.rules if r.event == event]
        if armed:
            self.active = armed

    def _check(self, iotype: IOType, offset: int, length: int) -> None:
        """rule_check(): fail the request with the first matching active rule's errno."""
        for rule in self.active:
            if rule.matches(iotype, offset, length):
                if rule.once:
                    self.active.remove(rule)
                    self.rules.remove(rule)
                raise QBlockError(os.strerror(rule.errno), errno=rule.errno)

    async def co_preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        self._event("read_aio")
        self._check(IOType.READ, offset, len(buf))
        await io.preadv(self.image, offset, buf, flags)

    async def co_pwritev(self, offset: int, data: memoryview, flags: ReqFlags) -> None:
        self._event("write_aio")
        self._check(IOType.WRITE, offset, len(data))
        await io.pwritev(self.image, offset, data, flags)

    async def co_pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        self._check(IOType.WRITE_ZEROES, offset, length)
        await io.pwrite_zeroes(self.image, offset, length, flags)

    async def co_pdiscard(self, offset: int, length: int) -> None:
        self._check(IOType.DISCARD, offset, length)
        await io.pdiscard(self.image, offset, length)

    async def co_flush_to_disk(self) -> None:
        self._check(IOType.FLUSH, 0, 0)

    async def co_block_status(self, offset: int, length: int) -> BlockStatus:
        """blkdebug_co_block_status(): the image's status, unless a rule fails it."""
        self._check(IOType.BLOCK_STATUS, offset, length)
        return BlockStatus(Status.RAW | Status.OFFSET_VALID, length, offset, self.image.node)

    async def co_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        await io.truncate(self.image, length, exact=exact, prealloc=prealloc)
