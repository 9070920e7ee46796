"""The public Python face of qblock: open an image, read and write it, close it.

``open_async`` returns an AsyncDisk for asyncio programs; ``open`` returns a Disk whose methods
run the same coroutines on a private event loop, for scripts and the command line.
"""
from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from qblock.block.backend import BlockBackend
from qblock.block.node import BlockNode
from qblock.block.open import open_node
from qblock.block.perm import PERM_ALL, Perm
from qblock.block.probe import probe_format
from qblock.drivers.base import BlockStatus, ReqFlags
from qblock.errors import InvalidArgument

T = TypeVar("T")


def image_options(target: str | os.PathLike[str] | dict[str, Any], *, driver: str | None = None,
                  cache_direct: bool = False) -> dict[str, Any]:
    """Build BlockdevOptions for a path (format probed unless given) or pass a dict through."""
    if isinstance(target, dict):
        return dict(target)
    filename = os.fspath(target)
    fmt = driver or probe_format(filename)
    options: dict[str, Any] = {"driver": fmt,
                               "file": {"driver": "file", "filename": filename}}
    if fmt in ("file", "host_device"):
        options = {"driver": fmt, "filename": filename}
    if cache_direct:
        options["cache"] = {"direct": True}
    options["discard"] = "unmap"  # qemu-io opens with BDRV_O_UNMAP: discards are honoured
    return options


class AsyncDisk:
    """An opened image: a BlockBackend over the top node of its graph."""

    def __init__(self, blk: BlockBackend) -> None:
        self.blk = blk

    @property
    def node(self) -> BlockNode:
        return self.blk.node

    @property
    def size(self) -> int:
        return self.blk.getlength()

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(await self.blk.pread(offset, length))

    async def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        await self.blk.preadv(offset, memoryview(buf).cast("B"))

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *,
                    fua: bool = False) -> None:
        await self.blk.pwritev(offset, data, ReqFlags.FUA if fua else ReqFlags.NONE)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        await self.blk.pwrite_zeroes(offset, length,
                                     ReqFlags.MAY_UNMAP if may_unmap else ReqFlags.NONE)

    async def discard(self, offset: int, length: int) -> None:
        await self.blk.pdiscard(offset, length)

    async def flush(self) -> None:
        await self.blk.flush()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return await self.blk.block_status(offset, length)

    async def truncate(self, length: int) -> None:
        await self.blk.truncate(length)

    async def close(self) -> None:
        """Flush and close the image (and every node opened for it)."""
        if self.blk.root is not None:
            try:
                await self.blk.flush()
            finally:  # a failed flush is reported, but the image is released all the same
                await self.blk.close()

    async def __aenter__(self) -> AsyncDisk:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_async(target: str | os.PathLike[str] | dict[str, Any], *,
                     driver: str | None = None, read_only: bool = False,
                     cache_direct: bool = False, share: bool = False) -> AsyncDisk:
    """Open an image file (format probed) or a BlockdevOptions dict.

    Permissions and locks are qemu-io's (block-backend.c blk_new_open): the backend takes
    read (and write, resize) and shares everything; format drivers such as qcow2 still refuse
    a second writer of their file.  ``share`` is ``-U``: force-share on a read-only open.
    """
    options = image_options(target, driver=driver, cache_direct=cache_direct)
    if share:
        options["force-share"] = True
    node = await open_node(options, read_only=read_only, implicit=True)
    perm = Perm.CONSISTENT_READ if read_only else Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
    shared = PERM_ALL
    try:
        blk = BlockBackend(node, perm, shared)
    except BaseException:
        from qblock.block.node import close_node

        await close_node(node)
        raise
    return AsyncDisk(blk)


class _Runner:
    """One private event loop that runs the synchronous facade's coroutines."""

    loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def run(cls, coro: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise InvalidArgument("the synchronous qblock API cannot run inside an event loop; "
                                  "use qblock.open_async")
        if cls.loop is None or cls.loop.is_closed():
            cls.loop = asyncio.new_event_loop()
        return cls.loop.run_until_complete(coro)


class Disk:
    """Synchronous twin of AsyncDisk."""

    def __init__(self, disk: AsyncDisk) -> None:
        self._disk = disk

    @property
    def node(self) -> BlockNode:
        return self._disk.node

    @property
    def backend(self) -> BlockBackend:
        return self._disk.blk

    @property
    def size(self) -> int:
        return self._disk.size

    def read(self, offset: int, length: int) -> bytes:
        return _Runner.run(self._disk.read(offset, length))

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        _Runner.run(self._disk.readinto(offset, buf))

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        _Runner.run(self._disk.write(offset, data, fua=fua))

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        _Runner.run(self._disk.write_zeroes(offset, length, may_unmap=may_unmap))

    def discard(self, offset: int, length: int) -> None:
        _Runner.run(self._disk.discard(offset, length))

    def flush(self) -> None:
        _Runner.run(self._disk.flush())

    def block_status(self, offset: int, length: int) -> BlockStatus:
        return _Runner.run(self._disk.block_status(offset, length))

    def truncate(self, length: int) -> None:
        _Runner.run(self._disk.truncate(length))

    def close(self) -> None:
        _Runner.run(self._disk.close())

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(target: str | os.PathLike[str] | dict[str, Any], *, driver: str | None = None,  # noqa: A001
         read_only: bool = False, cache_direct: bool = False, share: bool = False) -> Disk:
    """Synchronous ``open_async``: returns a Disk (a context manager)."""
    return Disk(_Runner.run(open_async(target, driver=driver, read_only=read_only,
                                       cache_direct=cache_direct, share=share)))


async def create_async(filename: str | os.PathLike[str], size: int, fmt: str = "qcow2",
                       **options: Any) -> None:
    """Create an image as ``qemu-img create`` does: raw is a sparse file, qcow2 QEMU's layout.

    ``options`` are the qcow2 creation options with Python names (cluster_size, compat,
    extended_l2, compression_type, lazy_refcounts, refcount_bits, backing_file, backing_fmt,
    preallocation).
    """
    filename = os.fspath(filename)
    if fmt == "raw":
        if options:
            raise InvalidArgument(f"Invalid parameter '{next(iter(options))}'")
        with builtins.open(filename, "wb") as f:
            f.truncate(size)
    elif fmt == "qcow2":
        from qblock.drivers.qcow2.create import create

        await create(filename, size, **options)
    else:
        raise InvalidArgument(f"Unknown file format '{fmt}'")


def create(filename: str | os.PathLike[str], size: int, fmt: str = "qcow2",
           **options: Any) -> None:
    """Synchronous ``create_async``."""
    _Runner.run(create_async(filename, size, fmt, **options))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a qblock coroutine on the synchronous facade's loop (for tools built on it)."""
    return _Runner.run(coro)
