"""The ``file`` protocol driver (block/file-posix.c): a regular file or block device.

Data moves with os.preadv/os.pwritev on a thread pool (QEMU's aio=threads), so the GIL is
released while the kernel copies; buffered writes to one file queue for one worker at a time
(WriteQueue) and reads of cached pages are made inline.  ``cache.direct=on`` opens with
O_DIRECT and bounces through page-aligned buffers.  A read-only file that nobody may resize
also hands out views of its cached pages (co_read_view): a copy needs no read copy.  Image
locking uses OFD locks on the bytes QEMU uses, so qblock and QEMU processes see each other's
locks.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qblock import trace
from qblock.block.perm import PERM_NAMES, Perm
from qblock.drivers.base import BlockDriver, BlockStatus, ReqFlags, Status
from qblock.errors import InvalidArgument, LockError, NotSupported, QBlockError

# file-posix.c: a shared lock on byte 100+bit for each permission taken, on byte 200+bit for
# each permission not shared.
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
# linux/falloc.h
FALLOC_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
FALLOC_ZERO_RANGE = 0x10
_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on Linux x86-64/aarch64

_pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="qblock-io")

_t_preadv = trace.point("file_co_preadv")
_t_pwritev = trace.point("file_co_pwritev")


def thread_pool() -> ThreadPoolExecutor:
    """The worker pool of blocking I/O calls (QEMU's thread-pool.c, 64 workers)."""
    return _pool


def _settle(fut: asyncio.Future[Any], exc: BaseException | None, result: Any) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _outcome(fn: Any, *args: Any) -> tuple[BaseException | None, Any]:
    """Call ``fn``; (exception, None) or (None, result), to hand to a waiting coroutine."""
    try:
        return None, fn(*args)
    except BaseException as e:  # handed to the waiting coroutine
        return e, None


def _post(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    """From a worker thread: run ``callback(*args)`` on the loop, unless the loop closed
    meanwhile (then nobody waits for the outcome)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


def _settle_all(futs: list[asyncio.Future[Any]], exc: BaseException | None,
                result: Any) -> None:
    for fut in futs:
        _settle(fut, exc, result)


async def run_in_pool(fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` on the pool; its result or exception comes back to the caller.

    Lighter than loop.run_in_executor() (no concurrent future chained to an asyncio one): the
    worker hands the outcome straight to the loop, one call_soon_threadsafe() per request.
    """
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def job() -> None:
        _post(loop, _settle, fut, *_outcome(fn, *args))

    work = _pool.submit(job)
    try:
        return await fut
    except asyncio.CancelledError:
        work.cancel()  # not started yet: it never runs
        raise


# Merging queued writes: at most this many buffers (Linux UIO_MAXIOV is 1024); no more are
# added once a run holds this many bytes.
MERGE_MAX_BUFFERS = 64
MERGE_MAX_BYTES = 16 * 1024 * 1024


class WriteQueue:
    """Buffered writes to one file, made one after another by a single pool worker.

    The kernel serialises buffered writes to a file (ext4, xfs and tmpfs take the inode lock
    for each), so writers on several threads gain nothing: they spin on that lock and take
    CPU from everything else.  Queued writes are made back to back by whichever worker drains
    the queue, without a trip through the event loop between them; writes queued one right
    after the other in the file go in one pwritev (like QEMU's request merging), so a busy
    queue costs one system call and one GIL hand-over per run rather than per write.  A merged
    write that fails fails every write in it.  O_DIRECT writes do run in parallel and keep
    using the pool directly.
    """

    def __init__(self, write: Callable[[int, list[memoryview]], None]) -> None:
        self._write = write
        self._queue: deque[list[Any]] = deque()
        self._lock = threading.Lock()
        self._draining = False

    async def write(self, offset: int, data: memoryview) -> None:
        """Queue one write and wait until it is made; its OSError comes back to the caller."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        entry = [loop, fut, offset, data]
        with self._lock:
            self._queue.append(entry)
            start, self._draining = not self._draining, True
        if start:
            _pool.submit(self._drain)
        try:
            await fut
        except asyncio.CancelledError:
            with self._lock:
                for i, queued in enumerate(self._queue):
                    if queued is entry:
                        del self._queue[i]  # not started: it is never made
                        break
            raise

    def _next_run(self) -> list[list[Any]] | None:
        """Take the first queued write and those that continue it in the file."""
        with self._lock:
            if not self._queue:
                self._draining = False
                return None
            run = [self._queue.popleft()]
            end = run[0][2] + len(run[0][3])
            size = len(run[0][3])
            while (self._queue and len(run) < MERGE_MAX_BUFFERS
                   and self._queue[0][2] == end and size < MERGE_MAX_BYTES):
                entry = self._queue.popleft()
                run.append(entry)
                end += len(entry[3])
                size += len(entry[3])
            return run

    def _drain(self) -> None:
        while (run := self._next_run()) is not None:
            outcome = _outcome(self._write, run[0][2], [entry[3] for entry in run])
            by_loop: dict[Any, list[asyncio.Future[Any]]] = {}
            for loop, fut, _, _ in run:
                by_loop.setdefault(loop, []).append(fut)
            for loop, futs in by_loop.items():
                _post(loop, _settle_all, futs, *outcome)


def _os_error(e: OSError, what: str) -> QBlockError:
    return QBlockError(f"{what}: {os.strerror(e.errno or errno.EIO)}", errno=e.errno or errno.EIO)


class _Locks:
    """OFD byte locks of one file descriptor (file-posix.c raw_apply_lock_bytes)."""

    def __init__(self, fd: int, filename: str) -> None:
        self.fd = fd
        self.filename = filename
        self.held: set[int] = set()

    def _fcntl(self, cmd: int, ltype: int, byte: int) -> int:
        res = fcntl.fcntl(self.fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, byte, 1, 0))
        return _FLOCK.unpack(res)[0]

    def wanted(self, perm: Perm, shared: Perm) -> set[int]:
        out = set()
        for bit in PERM_NAMES:
            i = bit.bit_length() - 1
            if perm & bit:
                out.add(LOCK_PERM_BASE + i)
            if not shared & bit:
                out.add(LOCK_SHARED_BASE + i)
        return out

    def apply(self, want: set[int]) -> None:
        """Take read locks on ``want`` and release the other bytes we held."""
        for byte in sorted(want - self.held):
            try:
                self._fcntl(fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
            except OSError as e:
                raise self._lock_error(byte, e) from None
            self.held.add(byte)
        for byte in sorted(self.held - want):
            self._fcntl(fcntl.F_OFD_SETLK, fcntl.F_UNLCK, byte)
            self.held.discard(byte)

    def check(self, perm: Perm, shared: Perm) -> None:
        """Fail if another process unshares what we take, or takes what we unshare.

        file-posix.c raw_check_lock_bytes(): every permission taken is checked before any
        permission unshared, so the first error names the same lock as QEMU's.
        """
        for bit, name in PERM_NAMES.items():
            if perm & bit and self._taken(LOCK_SHARED_BASE + bit.bit_length() - 1):
                raise LockError(f'Failed to get "{name}" lock\n'
                                f"Is another process using the image [{self.filename}]?")
        for bit, name in PERM_NAMES.items():
            if not shared & bit and self._taken(LOCK_PERM_BASE + bit.bit_length() - 1):
                raise LockError(f'Failed to get shared "{name}" lock\n'
                                f"Is another process using the image [{self.filename}]?")

    def _taken(self, byte: int) -> bool:
        return self._fcntl(fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK

    def _lock_error(self, byte: int, e: OSError) -> LockError:
        names = list(PERM_NAMES.values())
        name = names[(byte - LOCK_PERM_BASE) % 100]
        return LockError(f'Failed to lock byte {byte} ("{name}"): {os.strerror(e.errno or 0)}')


class FileDriver(BlockDriver):
    """Protocol driver for POSIX files (driver name ``file``)."""

    format_name = "file"
    is_protocol = True

    async def open(self, node: Any, options: dict[str, Any]) -> None:
        await super().open(node, options)
        filename = options.pop("filename", None)
        if not filename:
            raise InvalidArgument("Parameter 'filename' is missing")
        self.filename = str(filename)
        self.aio = options.pop("aio", "threads")
        if self.aio not in ("threads", "native", "io_uring"):
            raise InvalidArgument(f"Parameter 'aio' does not accept value '{self.aio}'")
        locking = options.pop("locking", "auto")
        if locking not in ("auto", "on", "off"):
            raise InvalidArgument(f"Parameter 'locking' does not accept value '{locking}'")
        for key in ("aio-max-batch", "drop-cache", "pr-manager", "x-check-cache-dropped"):
            options.pop(key, None)
        flags = os.O_RDONLY if node.read_only else os.O_RDWR
        flags |= os.O_CLOEXEC
        if node.cache_direct:
            flags |= os.O_DIRECT
        try:
            self.fd = await run_in_pool(os.open, self.filename, flags)
        except OSError as e:
            raise QBlockError(f"Could not open '{self.filename}': {os.strerror(e.errno or 0)}",
                              errno=e.errno or errno.EIO) from None
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self.size = self._query_size()
        node.filename = self.filename
        node.request_alignment = 512 if node.cache_direct else 1
        self.locks = _Locks(self.fd, self.filename) if locking != "off" else None
        self.nowait = hasattr(os, "RWF_NOWAIT")
        self.writes = WriteQueue(self._write_vector)
        self._lock_backup: set[int] | None = None
        self._resize_shared = True  # until set_perm() says otherwise
        self.cached_pages = CachedPages() if not self.is_block_device else None

    def _query_size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def getlength(self) -> int:
        return self.size

    async def close(self) -> None:
        if getattr(self, "cached_pages", None) is not None:
            self.cached_pages.release()
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)  # closing the fd drops its OFD locks
            self.fd = -1

    # -- permissions -> locks ----------------------------------------------------------------
    def check_perm(self, perm: Perm, shared: Perm) -> None:
        if self.locks is None:
            return
        self._lock_backup = set(self.locks.held)
        self.locks.apply(self.locks.held | self.locks.wanted(perm, shared))
        self.locks.check(perm, shared)

    def abort_perm(self) -> None:
        if self.locks is not None and self._lock_backup is not None:
            self.locks.apply(self._lock_backup)
            self._lock_backup = None

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        self._resize_shared = bool(shared & Perm.RESIZE)
        if self.locks is not None:
            self.locks.apply(self.locks.wanted(perm, shared))
            self._lock_backup = None

    def reopen_read_only(self, read_only: bool) -> None:
        if self.cached_pages is not None:
            self.cached_pages.release()
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if self.node.cache_direct:
            flags |= os.O_DIRECT
        fd = os.open(self.filename, flags)
        old, self.fd = self.fd, fd
        if self.locks is not None:
            held = set(self.locks.held)
            self.locks = _Locks(fd, self.filename)
            self.locks.apply(held)
        os.close(old)

    # -- I/O ---------------------------------------------------------------------------------
    def _direct_read(self, offset: int, buf: memoryview) -> int:
        if not self.node.cache_direct or _aligned(buf):
            return os.preadv(self.fd, [buf], offset)
        with mmap.mmap(-1, len(buf)) as bounce:
            n = os.preadv(self.fd, [bounce], offset)
            buf[:n] = bounce[:n]
            return n

    def _read_full(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            n = self._direct_read(offset + done, buf[done:])
            if n == 0:  # past EOF reads as zeroes
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    def _write_full(self, offset: int, data: memoryview) -> None:
        if self.node.cache_direct and not _aligned(data):
            with mmap.mmap(-1, len(data)) as bounce:
                bounce[:] = data
                self._write_all(offset, memoryview(bounce))
            return
        self._write_all(offset, data)

    def _write_vector(self, offset: int, buffers: list[memoryview]) -> None:
        """Write ``buffers`` one after the other from ``offset``, in one pwritev if it
        takes them all (a short write finishes buffer by buffer)."""
        done = os.pwritev(self.fd, buffers, offset)
        for buf in buffers:
            if done < len(buf):
                self._write_all(offset + max(done, 0), buf[max(done, 0):])
            offset += len(buf)
            done -= len(buf)

    def _write_all(self, offset: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.pwritev(self.fd, [data[done:]], offset + done)

    async def co_preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        if _t_preadv.enabled:
            _t_preadv(filename=self.filename, offset=offset, bytes=len(buf))
        try:
            done = self._read_cached(offset, buf)
            if done < len(buf):
                await run_in_pool(self._read_full, offset + done, buf[done:])
        except OSError as e:
            raise _os_error(e, f"read at {offset} of '{self.filename}'") from None

    def _read_cached(self, offset: int, buf: memoryview) -> int:
        """Read what the page cache holds without blocking (preadv2 RWF_NOWAIT).

        A hand-off to the thread pool costs far more than copying cached pages, so reads try
        the cache inline first and send only the rest to a worker.  Returns the bytes read.
        """
        if not self.nowait or self.node.cache_direct:
            return 0
        try:
            return os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self.nowait = False  # the filesystem does not support it
            return 0

    async def co_read_view(self, offset: int, length: int) -> memoryview | None:
        """The cached pages of [offset, offset+length) as a read-only view, or None.

        Only where the file cannot change size under the view (a read access to a page past
        a shrunk file's end is SIGBUS): the node is read-only, its locks are on and nobody
        shares the resize permission, as for the file of a read-only format node.  Only when
        every page is cached: a view must not stall the event loop on the disk.
        """
        if (self.cached_pages is None or not self.node.read_only or self.node.cache_direct
                or self.locks is None or self._resize_shared or not 0 < length
                or offset + length > self.size):
            return None
        try:
            view = self.cached_pages.view(self.fd, offset, length, self.size)
        except OSError as e:
            raise _os_error(e, f"read at {offset} of '{self.filename}'") from None
        if view is not None and _t_preadv.enabled:
            _t_preadv(filename=self.filename, offset=offset, bytes=length)
        return view

    async def co_pwritev(self, offset: int, data: memoryview, flags: ReqFlags) -> None:
        if _t_pwritev.enabled:
            _t_pwritev(filename=self.filename, offset=offset, bytes=len(data))
        try:
            if self.node.cache_direct:
                await run_in_pool(self._write_full, offset, data)
            else:
                await self.writes.write(offset, data)
            if flags & ReqFlags.FUA:
                await run_in_pool(os.fdatasync, self.fd)
        except OSError as e:
            raise _os_error(e, f"write at {offset} of '{self.filename}'") from None
        if offset + len(data) > self.size:
            self.size = offset + len(data)

    async def co_pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        """Punch a hole (may-unmap) or zero the range in place (fallocate)."""
        mode = FALLOC_PUNCH_HOLE if flags & ReqFlags.MAY_UNMAP else FALLOC_ZERO_RANGE
        if offset + length > self.size:
            mode = FALLOC_ZERO_RANGE  # growing the file: a hole punch would not extend it
        try:
            await run_in_pool(_fallocate, self.fd, mode, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise NotSupported("fallocate not supported") from None
            raise _os_error(e, f"zero write at {offset} of '{self.filename}'") from None
        if offset + length > self.size:
            self.size = offset + length

    async def co_pdiscard(self, offset: int, length: int) -> None:
        try:
            await run_in_pool(_fallocate, self.fd, FALLOC_PUNCH_HOLE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise _os_error(e, f"discard at {offset} of '{self.filename}'") from None

    async def co_flush_to_disk(self) -> None:
        try:
            await run_in_pool(os.fdatasync, self.fd)
        except OSError as e:
            raise _os_error(e, f"flush of '{self.filename}'") from None

    async def co_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        if self.is_block_device:
            if length > self.size:
                raise NotSupported("Cannot grow device files")
            return
        if prealloc not in ("off", "falloc", "full"):
            # file-posix.c handle_aiocb_truncate(): metadata preallocation is a format's job.
            raise NotSupported(f"Unsupported preallocation mode: {prealloc}")
        old = self.size
        if not exact and length <= old:
            return
        try:
            await run_in_pool(os.ftruncate, self.fd, length)
            if length > old and prealloc == "falloc":
                await run_in_pool(os.posix_fallocate, self.fd, old, length - old)
            elif length > old and prealloc == "full":
                await run_in_pool(self._write_all, old, memoryview(bytes(length - old)))
        except OSError as e:
            raise _os_error(e, f"Could not resize file '{self.filename}'") from None
        self.size = length

    async def co_block_status(self, offset: int, length: int) -> BlockStatus:
        """SEEK_DATA/SEEK_HOLE (file-posix.c find_allocation)."""
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset: a hole to EOF
                return BlockStatus(Status.ZERO | Status.OFFSET_VALID, length, offset, self.node)
            return BlockStatus(Status.DATA | Status.OFFSET_VALID, length, offset, self.node)
        if data > offset:
            return BlockStatus(Status.ZERO | Status.OFFSET_VALID, min(length, data - offset),
                               offset, self.node)
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return BlockStatus(Status.DATA | Status.OFFSET_VALID, min(length, max(hole - offset, 1)),
                           offset, self.node)

    def allocated_file_size(self) -> int | None:
        return os.fstat(self.fd).st_blocks * 512


class CachedPages:
    """A read-only shared mapping of a file, mapped on first use: views of its cached pages.

    mincore(2) tells which pages the page cache holds; a view is handed out only when it
    holds all of them, so reading the view faults in no disk I/O (short of the kernel
    evicting a page between the check and the access: the fault then reads it back).
    """

    def __init__(self) -> None:
        self._map: mmap.mmap | None = None
        self._address = 0

    def view(self, fd: int, offset: int, length: int, size: int) -> memoryview | None:
        """Bytes [offset, offset+length) of the file open as ``fd`` (``size`` bytes long),
        if all cached."""
        if self._map is None or len(self._map) < offset + length:
            self.release()
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            self._address = _buffer_address(self._map)
        first = offset - offset % mmap.PAGESIZE
        span = offset + length - first
        resident = ctypes.create_string_buffer(-(-span // mmap.PAGESIZE))
        if _libc.mincore(ctypes.c_void_p(self._address + first), ctypes.c_size_t(span),
                         resident):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if b"\0" in resident.raw:  # bit 0 of each byte: the page is resident
            return None
        return memoryview(self._map)[offset:offset + length]

    def release(self) -> None:
        """Unmap now, or once the last view handed out is gone."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # views still alive keep the mapping until they go
                pass
            self._map = None


def _buffer_address(buf: mmap.mmap) -> int:
    """The address of a read-only mapping (ctypes' from_buffer wants a writable one)."""
    import numpy as np  # imported on first use: it doubles the start-up time of every tool

    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def _aligned(buf: memoryview) -> bool:
    """Whether O_DIRECT can use ``buf`` as it is (page-aligned address, sector-sized)."""
    if buf.readonly or len(buf) % 512:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(buf)) % 4096 == 0


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, ctypes.c_int(mode), ctypes.c_int64(offset), ctypes.c_int64(length)):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
