"""The generic request path every I/O passes before a driver (QEMU block/io.c).

Checks bounds and read-only state, pads unaligned requests (read-modify-write under
serialisation), tracks requests in flight, fires the write threshold, marks dirty bitmaps,
keeps ``wr_highest_offset`` and emits the ``bdrv_co_*`` trace points.
"""
from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

from qblock import trace
from qblock.block.graph import BdrvChild
from qblock.block.node import BlockNode
from qblock.drivers.base import BlockStatus, ReqFlags, Status
from qblock.errors import InvalidArgument, NotSupported, ReadOnlyError

# block/io.c BDRV_REQUEST_MAX_BYTES: requests stay below 2 GiB and aligned to 512.
REQUEST_MAX_BYTES = 0x7FFFFE00
MAX_ZERO_BUFFER = 1 << 20
_ZEROES = bytes(MAX_ZERO_BUFFER)

_t_preadv = trace.point("bdrv_co_preadv_part")
_t_pwritev = trace.point("bdrv_co_pwritev_part")
_t_zeroes = trace.point("bdrv_co_pwrite_zeroes")
_t_discard = trace.point("bdrv_co_pdiscard")
_t_flush = trace.point("bdrv_co_flush")
_t_threshold = trace.point("bdrv_write_threshold")

# Set by the monitor: called with (event name, data) for BLOCK_WRITE_THRESHOLD.
event_hook: Callable[[str, dict[str, Any]], None] | None = None

# Set by a caller that orders its writes by where a format allocates them (qemu-img convert's
# in-order writes): a format driver calls it once the last allocation of the current write is
# done and only its data remains to be written, so the caller's next write may start.
write_allocated: contextvars.ContextVar[Callable[[], None] | None] = \
    contextvars.ContextVar("write_allocated", default=None)


def notify_write_allocated() -> None:
    """Tell the caller of the current write that its allocation is done (write_allocated)."""
    hook = write_allocated.get()
    if hook is not None:
        hook()


class TrackedRequest:
    """A request in flight on a node (block/io.c BdrvTrackedRequest)."""

    __slots__ = ("offset", "end", "serialising", "done")

    def __init__(self, offset: int, length: int, serialising: bool) -> None:
        self.offset = offset
        self.end = offset + length
        self.serialising = serialising
        self.done = asyncio.Event()


async def _track(node: BlockNode, offset: int, length: int, serialising: bool) -> TrackedRequest:
    """Register a request and wait for earlier overlapping ones it must not race with."""
    req = TrackedRequest(offset, length, serialising)
    earlier = list(node.tracked)
    node.tracked.append(req)
    for other in earlier:
        if ((serialising or other.serialising) and other.offset < req.end
                and req.offset < other.end and not other.done.is_set()):
            await other.done.wait()
    return req


def _untrack(node: BlockNode, req: TrackedRequest) -> None:
    node.tracked.remove(req)
    req.done.set()


class _WriteRequest:
    """One write-type request in flight (bdrv_co_write_req_prepare/finish): tracked, the write
    threshold checked before, dirty bitmaps and wr_highest_offset updated after success.

    A class rather than an asynccontextmanager: it runs for every write."""

    __slots__ = ("node", "offset", "length", "serialising", "is_discard", "req")

    def __init__(self, node: BlockNode, offset: int, length: int, *, serialising: bool,
                 is_discard: bool = False) -> None:
        self.node = node
        self.offset = offset
        self.length = length
        self.serialising = serialising
        self.is_discard = is_discard

    async def __aenter__(self) -> None:
        node = self.node
        node.in_flight += 1
        try:
            self.req = await _track(node, self.offset, self.length, self.serialising)
        except BaseException:
            node.in_flight -= 1
            raise
        try:
            _threshold_check(node, self.offset, self.length)
        except BaseException:
            self._finish()
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is None:
                _write_done(self.node, self.offset, self.length, is_discard=self.is_discard)
        finally:
            self._finish()

    def _finish(self) -> None:
        _untrack(self.node, self.req)
        self.node.in_flight -= 1


def check_request(offset: int, length: int) -> None:
    """Reject negative or overflowing requests (block/io.c bdrv_check_request)."""
    if offset < 0:
        raise InvalidArgument(f"offset {offset} is negative")
    if length < 0:
        raise InvalidArgument(f"length {length} is negative")
    if offset + length > (1 << 63) - 1:
        raise InvalidArgument(f"request at {offset} of {length} bytes overflows")


def _check_writable(node: BlockNode) -> None:
    if node.read_only:
        raise ReadOnlyError(f"Block node '{node.node_name}' is read-only")
    if node.closed:
        raise InvalidArgument(f"Block node '{node.node_name}' is closed")


def _threshold_check(node: BlockNode, offset: int, length: int) -> None:
    """block/write-threshold.c: one event when a write ends past the threshold, then disarm."""
    threshold = node.write_threshold
    if threshold and offset + length > threshold:
        node.write_threshold = 0
        data = {"node-name": node.node_name, "amount-exceeded": offset + length - threshold,
                "write-threshold": threshold}
        if _t_threshold.enabled:
            _t_threshold(bs=node.node_name, **data)
        if event_hook is not None:
            event_hook("BLOCK_WRITE_THRESHOLD", data)


def _write_done(node: BlockNode, offset: int, length: int, *, is_discard: bool = False) -> None:
    if length:
        if not is_discard and offset + length > node.wr_highest_offset:
            node.wr_highest_offset = offset + length
        for bitmap in node.dirty_bitmaps:
            if bitmap.recording:
                bitmap.set_range(offset, length)


# -- reads ----------------------------------------------------------------------------------
async def _aligned_preadv(node: BlockNode, offset: int, buf: memoryview, flags: ReqFlags) -> None:
    """Read within the node; the part past its end reads as zeroes (bdrv_aligned_preadv)."""
    total = node.length()
    length = len(buf)
    if offset + length <= total:
        await node.drv.co_preadv(offset, buf, flags)
        return
    # Past-EOF reads stay aligned (O_DIRECT): the driver's short read zero-fills the tail.
    align = node.request_alignment
    inside = min(length, -(-max(0, total - offset) // align) * align)
    if inside:
        await node.drv.co_preadv(offset, buf[:inside], flags)
    buf[inside:] = bytes(length - inside)


async def node_preadv(node: BlockNode, offset: int, buf: memoryview,
                      flags: ReqFlags = ReqFlags.NONE) -> None:
    """Read ``len(buf)`` bytes at ``offset`` of ``node`` into ``buf``."""
    length = len(buf)
    check_request(offset, length)
    if _t_preadv.enabled:
        _t_preadv(bs=node.node_name, offset=offset, bytes=length, flags=int(flags))
    if not length:
        return
    align = node.request_alignment
    node.in_flight += 1
    try:
        if offset % align == 0 and length % align == 0:
            await _aligned_preadv(node, offset, buf, flags)
            return
        start = offset - offset % align
        end = -(-(offset + length) // align) * align
        bounce = bytearray(end - start)
        await _aligned_preadv(node, start, memoryview(bounce), flags)
        buf[:] = bounce[offset - start:offset - start + length]
    finally:
        node.in_flight -= 1


async def preadv(child: BdrvChild, offset: int, buf: memoryview,
                 flags: ReqFlags = ReqFlags.NONE) -> None:
    """Read through an edge (bdrv_co_preadv)."""
    await node_preadv(child.node, offset, buf, flags)


async def node_read_view(node: BlockNode, offset: int, length: int) -> memoryview | None:
    """``length`` bytes at ``offset`` of ``node`` as a read-only view without copying them
    (BlockDriver.co_read_view), or None where the drivers cannot: then read them instead."""
    check_request(offset, length)
    if offset + length > node.length():
        return None
    node.in_flight += 1
    try:
        view = await node.drv.co_read_view(offset, length)
    finally:
        node.in_flight -= 1
    if view is not None and _t_preadv.enabled:
        _t_preadv(bs=node.node_name, offset=offset, bytes=length, flags=0)
    return view


async def read_view(child: BdrvChild, offset: int, length: int) -> memoryview | None:
    """node_read_view() through an edge."""
    return await node_read_view(child.node, offset, length)


async def pread(child: BdrvChild, offset: int, length: int) -> bytearray:
    """Read ``length`` bytes into a new buffer."""
    buf = bytearray(length)
    await node_preadv(child.node, offset, memoryview(buf))
    return buf


# -- writes ---------------------------------------------------------------------------------
async def _padded_write(node: BlockNode, offset: int, data: memoryview, flags: ReqFlags) -> None:
    """Read-modify-write the aligned span around an unaligned write."""
    align = node.request_alignment
    start = offset - offset % align
    end = -(-(offset + len(data)) // align) * align
    bounce = bytearray(end - start)
    view = memoryview(bounce)
    await _aligned_preadv(node, start, view, ReqFlags.NONE)
    view[offset - start:offset - start + len(data)] = data
    await node.drv.co_pwritev(start, view, flags)


def is_zero(data: memoryview) -> bool:
    """True when every byte of ``data`` is zero (detect-zeroes, sparse detection)."""
    import numpy as np  # imported on first use: it doubles the start-up time of every tool

    return not np.frombuffer(data, dtype=np.uint8).any()


async def node_pwritev(node: BlockNode, offset: int, data: memoryview,
                       flags: ReqFlags = ReqFlags.NONE) -> None:
    """Write ``data`` at ``offset`` of ``node`` (bdrv_co_pwritev)."""
    length = len(data)
    check_request(offset, length)
    _check_writable(node)
    if _t_pwritev.enabled:
        _t_pwritev(bs=node.node_name, offset=offset, bytes=length, flags=int(flags))
    if not length:
        return
    if node.detect_zeroes != "off" and is_zero(data):
        zflags = flags | (ReqFlags.MAY_UNMAP if node.detect_zeroes == "unmap" else 0)
        await node_pwrite_zeroes(node, offset, length, zflags)
        return
    align = node.request_alignment
    aligned = offset % align == 0 and length % align == 0
    async with _WriteRequest(node, offset, length, serialising=not aligned):
        if aligned:
            await node.drv.co_pwritev(offset, data, flags)
        else:
            await _padded_write(node, offset, data, flags)


async def pwritev(child: BdrvChild, offset: int, data: memoryview | bytes | bytearray,
                  flags: ReqFlags = ReqFlags.NONE) -> None:
    """Write through an edge (bdrv_co_pwritev)."""
    await node_pwritev(child.node, offset, memoryview(data).cast("B"), flags)


async def _write_zero_buffers(node: BlockNode, offset: int, length: int, flags: ReqFlags) -> None:
    flags &= ~(ReqFlags.MAY_UNMAP | ReqFlags.NO_FALLBACK)
    end = offset + length
    while offset < end:
        n = min(end - offset, MAX_ZERO_BUFFER)
        await node.drv.co_pwritev(offset, memoryview(_ZEROES)[:n], flags)
        offset += n


async def node_pwrite_zeroes(node: BlockNode, offset: int, length: int,
                             flags: ReqFlags = ReqFlags.NONE) -> None:
    """Make a range read as zeroes, without writing data where the driver can (write -z)."""
    check_request(offset, length)
    _check_writable(node)
    if not node.unmap:  # block/io.c: MAY_UNMAP only where discard=unmap
        flags &= ~ReqFlags.MAY_UNMAP
    if _t_zeroes.enabled:
        _t_zeroes(bs=node.node_name, offset=offset, bytes=length, flags=int(flags))
    if not length:
        return
    align = node.request_alignment
    async with _WriteRequest(node, offset, length,
                              serialising=bool(offset % align or length % align)):
        head = -offset % align
        mid_start = offset + head
        mid_end = (offset + length) - (offset + length) % align
        if mid_end <= mid_start:
            await _padded_write(node, offset, memoryview(bytes(length)), flags)
        else:
            if head:
                await _padded_write(node, offset, memoryview(bytes(head)), flags)
            try:
                await node.drv.co_pwrite_zeroes(mid_start, mid_end - mid_start, flags)
            except NotSupported:
                if flags & ReqFlags.NO_FALLBACK:
                    raise
                await _write_zero_buffers(node, mid_start, mid_end - mid_start, flags)
            if mid_end < offset + length:
                await _padded_write(node, mid_end, memoryview(bytes(offset + length - mid_end)),
                                    flags)


async def pwrite_zeroes(child: BdrvChild, offset: int, length: int,
                        flags: ReqFlags = ReqFlags.NONE) -> None:
    await node_pwrite_zeroes(child.node, offset, length, flags)


async def node_pdiscard(node: BlockNode, offset: int, length: int) -> None:
    """Discard a range; unaligned head and tail are left alone (bdrv_co_pdiscard).

    Without discard=unmap on the node the request succeeds and does nothing, like QEMU.
    """
    check_request(offset, length)
    _check_writable(node)
    if _t_discard.enabled:
        _t_discard(bs=node.node_name, offset=offset, bytes=length)
    if not node.unmap:
        return
    align = node.request_alignment
    start = -(-offset // align) * align
    end = (offset + length) - (offset + length) % align
    if not length:
        return
    async with _WriteRequest(node, offset, length, serialising=False, is_discard=True):
        if end > start:
            await node.drv.co_pdiscard(start, end - start)


async def pdiscard(child: BdrvChild, offset: int, length: int) -> None:
    await node_pdiscard(child.node, offset, length)


async def flush(node: BlockNode) -> None:
    """Flush a node and everything below it (bdrv_co_flush)."""
    if _t_flush.enabled:
        _t_flush(bs=node.node_name)
    if node.closed:
        return
    await node.drv.co_flush_to_os()
    if not node.cache_no_flush:
        await node.drv.co_flush_to_disk()
    for edge in list(node.children.values()):
        await flush(edge.node)


async def truncate(child: BdrvChild, length: int, *, exact: bool = True,
                   prealloc: str = "off") -> None:
    """Resize a node (bdrv_co_truncate)."""
    node = child.node
    if length < 0:
        raise InvalidArgument("Image size cannot be negative")
    _check_writable(node)
    await node.drv.co_truncate(length, exact, prealloc)


# -- block status ---------------------------------------------------------------------------
# Status bits as plain ints: block status runs once per extent of a scan, and IntFlag
# arithmetic builds an enum member per operation.
_DATA, _ZERO, _ALLOCATED = int(Status.DATA), int(Status.ZERO), int(Status.ALLOCATED)
_RAW, _RECURSE, _EOF = int(Status.RAW), int(Status.RECURSE), int(Status.EOF)
_OFFSET_VALID = int(Status.OFFSET_VALID)


async def block_status(node: BlockNode, offset: int, length: int) -> BlockStatus:
    """Status of the range from ``offset`` in ``node`` alone (bdrv_co_block_status)."""
    total = node.length()
    if offset >= total:
        return BlockStatus(Status.EOF, 0)
    length = min(length, total - offset)
    if length == 0:
        return BlockStatus(Status.NONE, 0)
    st = await node.drv.co_block_status(offset, length)
    status, pnum = int(st.status), max(min(st.pnum, length), 0)
    bs_map, bs_file = st.map, st.file
    if status & _RAW:
        assert bs_file is not None
        inner = await block_status(bs_file, bs_map, pnum)
        status, pnum = int(inner.status) & ~_EOF, inner.pnum or pnum
        bs_map, bs_file = inner.map, inner.file
    else:
        if status & (_DATA | _ZERO):
            status |= _ALLOCATED
        elif node.drv.supports_backing:
            cow = node.cow_child()
            if cow is None or offset >= cow.node.length():
                status |= _ZERO
        if (status & _RECURSE and bs_file is not None and bs_file is not node
                and status & _DATA and not status & _ZERO and status & _OFFSET_VALID):
            inner = await block_status(bs_file, bs_map, pnum)
            inner_status = int(inner.status)
            if inner_status & _EOF and (not inner.pnum or inner_status & _ZERO):
                status |= _ZERO
            else:
                pnum = inner.pnum
                status |= inner_status & _ZERO
        status &= ~_RECURSE
    if offset + pnum == total:
        status |= _EOF
    return BlockStatus(Status(status), pnum, bs_map, bs_file)


async def block_status_above(node: BlockNode, base: BlockNode | None, offset: int,
                             length: int) -> tuple[BlockStatus, int]:
    """Status through the chain from ``node`` down to (excluding) ``base``.

    Returns the status and the depth of the layer that decided it: 1 for ``node`` itself,
    0 when nothing above ``base`` allocates the range (bdrv_co_common_block_status_above).
    """
    depth = 1
    current: BlockNode | None = node
    while current is not None and current is not base:
        st = await block_status(current, offset, length)
        if int(st.status) & _ALLOCATED or st.pnum == 0:
            return st, depth
        length = st.pnum
        edge = current.cow_child() or current.filtered_child()
        if edge is None:
            return st, 0
        if offset >= edge.node.length():
            if edge.node is base:
                return BlockStatus(st.status | Status.ZERO, st.pnum), 0
            # block/io.c: zeroes synthesized beyond the end of a short layer "behave as if
            # they were allocated at this layer"
            return BlockStatus(Status.ZERO | Status.ALLOCATED, st.pnum), depth + 1
        current = edge.node
        depth += 1
    return BlockStatus(Status.NONE, length), 0
