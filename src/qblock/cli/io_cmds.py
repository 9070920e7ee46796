"""qemu-io's commands (qemu-io-cmds.c) over an open qblock image.

Each command takes its argv (command name first), prints what qemu-io prints and returns
0 or a negative errno, as qemuio_command() does.
"""
from __future__ import annotations

import asyncio
import errno
import getopt
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from qblock import api
from qblock.cli import imgfmt
from qblock.cli.io_fmt import cvtnum, cvtnum_error, cvtstr, dump_buffer, report
from qblock.drivers.base import ReqFlags, Status
from qblock.errors import QBlockError

PROG = "qblock-io"


class _Fail(Exception):
    """A command failed after printing why; ``code`` is its negative errno."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class CacheMode:
    """bdrv_parse_cache_mode(): O_DIRECT, writeback cache, flushes ignored."""

    direct: bool = False
    writeback: bool = False
    no_flush: bool = False


CACHE_MODES = {"none": CacheMode(True, True), "off": CacheMode(True, True),
               "writeback": CacheMode(False, True), "writethrough": CacheMode(),
               "directsync": CacheMode(True, False), "unsafe": CacheMode(False, True, True)}


class Session:
    """The state of one qemu-io run: the open image and the AIO requests in flight."""

    def __init__(self, cache: CacheMode) -> None:
        self.disk: api.AsyncDisk | None = None
        self.cache = cache
        self.aio: set[asyncio.Task[int]] = set()
        self.aio_error = 0
        self.quit = False

    async def open(self, target: str | dict[str, Any], fmt: str | None, read_only: bool,
                   share: bool, cache: CacheMode) -> bool:
        """openfile(): open the image or print qemu-io's error."""
        name = target if isinstance(target, str) else target.get("file", {}).get("filename", "")
        try:
            if isinstance(target, str):
                fmt = fmt or api.probe_format(target)
            self.disk = await api.open_async(target, driver=fmt, read_only=read_only,
                                             cache_direct=cache.direct, share=share)
        except OSError as e:
            print(f"{PROG}: can't open device {name}: Could not open '{name}': "
                  f"{os.strerror(e.errno or 0)}", file=sys.stderr)
            return False
        except QBlockError as e:
            print(f"{PROG}: can't open device {name}: {e}", file=sys.stderr)
            return False
        self.cache = cache
        return True

    async def drain(self) -> None:
        """Wait for every AIO request (blk_drain_all)."""
        while self.aio:
            await asyncio.gather(*list(self.aio))

    async def close(self) -> None:
        await self.drain()
        if self.disk is not None:
            disk, self.disk = self.disk, None
            await disk.close()


def _num(text: str) -> int:
    try:
        value = cvtnum(text)
    except (ValueError, OverflowError):
        print(cvtnum_error(text))
        raise _Fail(-errno.EINVAL) from None
    return value


def _pattern(text: str) -> int:
    """parse_pattern(): a byte given in decimal, hex (0x) or octal."""
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= 255:
        print(f"{text} is not a valid pattern byte")
        raise _Fail(-errno.EINVAL)
    return value


def _lengths(args: list[str]) -> list[int]:
    return [_num(a) for a in args]


async def _timed(op: Awaitable[None]) -> float:
    start = time.perf_counter()
    await op
    return time.perf_counter() - start


def _write_flags(s: Session, fua: bool) -> ReqFlags:
    # writethrough caches add FUA to every write (blk_co_pwritev_part, enable_write_cache)
    return ReqFlags.FUA if fua or not s.cache.writeback else ReqFlags.NONE


def _io_error(what: str, e: QBlockError) -> _Fail:
    """Print qemu-io's "<op> failed: <strerror>" and return the failure to raise."""
    print(f"{what} failed: {os.strerror(e.errno)}")
    return _Fail(-e.errno)


# -- commands -------------------------------------------------------------------------------
async def read_f(s: Session, disk: api.AsyncDisk, opts: dict[str, str], args: list[str]) -> int:
    """read [-qv] [-P pattern [-s off] [-l len]] off len"""
    offset, count = _num(args[0]), _num(args[1])
    buf = bytearray(count)
    try:
        secs = await _timed(disk.blk.preadv(offset, memoryview(buf)))
    except QBlockError as e:
        raise _io_error("read", e) from None
    ret = 0
    if "-P" in opts:
        pattern = _pattern(opts["-P"])
        p_off = _num(opts["-s"]) if "-s" in opts else 0
        p_len = _num(opts["-l"]) if "-l" in opts else count - p_off
        if buf[p_off:p_off + p_len] != bytes([pattern]) * p_len:
            print(f"Pattern verification failed at offset {offset + p_off}, {p_len} bytes")
            ret = -errno.EINVAL
    return _read_report(opts, buf, offset, secs, ret)


async def readv_f(s: Session, disk: api.AsyncDisk, opts: dict[str, str],
                  args: list[str]) -> int:
    """readv [-qv] [-P pattern] off len [len..]"""
    offset, count = _num(args[0]), sum(_lengths(args[1:]))
    buf = bytearray(count)
    try:
        secs = await _timed(disk.blk.preadv(offset, memoryview(buf)))
    except QBlockError as e:
        raise _io_error("readv", e) from None
    ret = 0
    if "-P" in opts and buf != bytes([_pattern(opts["-P"])]) * count:
        print(f"Pattern verification failed at offset {offset}, {count} bytes")
        ret = -errno.EINVAL
    return _read_report(opts, buf, offset, secs, ret)


def _read_report(opts: dict[str, str], buf: bytearray, offset: int, secs: float,
                 ret: int) -> int:
    """What read and readv print after the data came in (-v dump, the timing line; -q none)."""
    if "-q" not in opts:
        if "-v" in opts:
            sys.stdout.write(dump_buffer(buf, offset))
        sys.stdout.write(report("read", secs, offset, len(buf), len(buf), 1))
    return ret


async def _do_write(s: Session, disk: api.AsyncDisk, opts: dict[str, str], offset: int,
                    count: int, what: str) -> float:
    flags = _write_flags(s, "-f" in opts)
    if "-z" in opts:
        if "-u" in opts:
            flags |= ReqFlags.MAY_UNMAP
        op = disk.blk.pwrite_zeroes(offset, count, flags)
    else:
        if "-c" in opts:
            flags |= ReqFlags.WRITE_COMPRESSED
        pattern = _pattern(opts["-P"]) if "-P" in opts else 0xcd
        op = disk.blk.pwritev(offset, bytes([pattern]) * count, flags)
    try:
        return await _timed(op)
    except QBlockError as e:
        raise _io_error(what, e) from None


def _check_write_opts(opts: dict[str, str]) -> None:
    if "-z" in opts and "-P" in opts:
        print("Only one of -z, -P, and -s can be specified at the same time")
        raise _Fail(-errno.EINVAL)
    if "-u" in opts and "-z" not in opts:
        print("-u requires -z to be specified")
        raise _Fail(-errno.EINVAL)
    if "-c" in opts and "-z" in opts:
        print("-c and -z cannot be specified at the same time")
        raise _Fail(-errno.EINVAL)


async def write_f(s: Session, disk: api.AsyncDisk, opts: dict[str, str],
                  args: list[str]) -> int:
    """write [-cfquz] [-P pattern] off len"""
    _check_write_opts(opts)
    offset, count = _num(args[0]), _num(args[1])
    secs = await _do_write(s, disk, opts, offset, count, "write")
    if "-q" not in opts:
        sys.stdout.write(report("wrote", secs, offset, count, count, 1))
    return 0


async def writev_f(s: Session, disk: api.AsyncDisk, opts: dict[str, str],
                   args: list[str]) -> int:
    """writev [-fq] [-P pattern] off len [len..]"""
    offset, count = _num(args[0]), sum(_lengths(args[1:]))
    secs = await _do_write(s, disk, opts, offset, count, "writev")
    if "-q" not in opts:
        sys.stdout.write(report("wrote", secs, offset, count, count, 1))
    return 0


async def discard_f(s: Session, disk: api.AsyncDisk, opts: dict[str, str],
                    args: list[str]) -> int:
    """discard [-q] off len"""
    offset, count = _num(args[0]), _num(args[1])
    try:
        secs = await _timed(disk.blk.pdiscard(offset, count))
    except QBlockError as e:
        raise _io_error("discard", e) from None
    if "-q" not in opts:
        sys.stdout.write(report("discard", secs, offset, count, count, 1))
    return 0


async def flush_f(s: Session, disk: api.AsyncDisk, opts: dict[str, str],
                  args: list[str]) -> int:
    """flush"""
    if not s.cache.no_flush:
        await disk.flush()
    return 0


async def aio_flush_f(s: Session, disk: api.AsyncDisk, opts: dict[str, str],
                      args: list[str]) -> int:
    """aio_flush: wait for the AIO requests, then flush"""
    await s.drain()
    return await flush_f(s, disk, opts, args)


def _spawn(s: Session, coro: Awaitable[int]) -> int:
    async def run() -> int:
        try:
            ret = await coro
        except _Fail as e:
            ret = e.code
        if ret < 0:
            s.aio_error = ret
        return ret

    task = asyncio.ensure_future(run())
    s.aio.add(task)
    task.add_done_callback(s.aio.discard)
    return 0


async def aio_read_f(s: Session, disk: api.AsyncDisk, opts: dict[str, str],
                     args: list[str]) -> int:
    """aio_read [-qv] [-P pattern] off len [len..]: completes in the background"""
    _lengths(args)
    return _spawn(s, readv_f(s, disk, opts, args))


async def aio_write_f(s: Session, disk: api.AsyncDisk, opts: dict[str, str],
                      args: list[str]) -> int:
    """aio_write [-fquz] [-P pattern] off len [len..]: completes in the background"""
    _check_write_opts(opts)
    offset, count = _num(args[0]), sum(_lengths(args[1:]))

    async def run() -> int:
        secs = await _do_write(s, disk, opts, offset, count, "aio_write")
        if "-q" not in opts:
            sys.stdout.write(report("wrote", secs, offset, count, count, 1))
        return 0

    return _spawn(s, run())


async def length_f(s: Session, disk: api.AsyncDisk, opts: dict[str, str],
                   args: list[str]) -> int:
    """length: the image's virtual size"""
    print(cvtstr(disk.size))
    return 0


async def info_f(s: Session, disk: api.AsyncDisk, opts: dict[str, str],
                 args: list[str]) -> int:
    """info: format, cluster size, VM state offset, format specific information"""
    node = disk.node
    print(f"format name: {node.drv.format_name}")
    cluster_size = vm_state = 0
    specific = None
    if node.drv.format_name == "qcow2":
        from qblock.block.qapi import qcow2_specific

        h = node.drv.header
        cluster_size = h.cluster_size
        # qcow2_vm_state_offset(): past the guest area an L1 table can map
        l2_bits = h.cluster_bits - (4 if h.extended_l2 else 3)
        span = 1 << (h.cluster_bits + l2_bits)
        vm_state = -(-h.size // span) * span
        specific = await qcow2_specific(node.file, h)
    print(f"cluster size: {cvtstr(cluster_size)}")
    print(f"vm state offset: {cvtstr(vm_state)}")
    if specific is not None:
        out = ["Format specific information:\n"]
        imgfmt.dump_qobject(specific["data"], 1, out)
        sys.stdout.write("".join(out))
    return 0


async def _is_allocated(disk: api.AsyncDisk, offset: int, length: int) -> tuple[bool, int]:
    """bdrv_is_allocated() of the top node."""
    from qblock.block import io

    st = await io.block_status(disk.node, offset, length)
    return bool(st.status & Status.ALLOCATED), st.pnum


async def alloc_f(s: Session, disk: api.AsyncDisk, opts: dict[str, str],
                  args: list[str]) -> int:
    """alloc off [len]: how much of the range the top layer allocates"""
    start = offset = _num(args[0])
    count = remaining = _num(args[1]) if len(args) > 1 else 512
    allocated = 0
    while remaining:
        ret, num = await _is_allocated(disk, offset, remaining)
        offset += num
        remaining -= num
        if ret:
            allocated += num
        if num == 0:
            count -= remaining
            remaining = 0
    print(f"{allocated}/{count} bytes allocated at offset {cvtstr(start)}")
    return 0


async def map_f(s: Session, disk: api.AsyncDisk, opts: dict[str, str],
                args: list[str]) -> int:
    """map: allocated and unallocated runs of the top layer (map_is_allocated merges them)"""
    offset, end = 0, disk.size
    while offset < end:
        first, num = await _is_allocated(disk, offset, end - offset)
        total = num
        while num and offset + total < end:
            ret, num = await _is_allocated(disk, offset + total, end - offset - total)
            if ret != first or not num:
                break
            total += num
        state = "    allocated" if first else "not allocated"
        print(f"{cvtstr(total)} (0x{total:x}) bytes {state} at offset {cvtstr(offset)} "
              f"(0x{offset:x})")
        if not total:
            break
        offset += total
    return 0


Handler = Callable[[Session, api.AsyncDisk, dict[str, str], list[str]], Awaitable[int]]


@dataclass
class Command:
    """cmdinfo_t: the handler, getopt string, argument bounds and whether it writes."""

    func: Handler
    optstr: str
    argmin: int
    argmax: int
    writes: bool = False


COMMANDS: dict[str, Command] = {
    "read": Command(read_f, "l:P:qs:v", 2, -1),
    "readv": Command(readv_f, "P:qv", 2, -1),
    "write": Command(write_f, "cfP:quz", 2, -1, True),
    "writev": Command(writev_f, "fqP:", 2, -1, True),
    "aio_read": Command(aio_read_f, "P:qv", 2, -1),
    "aio_write": Command(aio_write_f, "fqP:uz", 2, -1, True),
    "aio_flush": Command(aio_flush_f, "", 0, 0),
    "flush": Command(flush_f, "", 0, 0),
    "discard": Command(discard_f, "q", 2, -1, True),
    "length": Command(length_f, "", 0, 0),
    "info": Command(info_f, "", 0, 0),
    "map": Command(map_f, "", 0, 0),
    "alloc": Command(alloc_f, "", 1, 2),
}
ALIASES = {"r": "read", "w": "write", "f": "flush", "l": "length", "i": "info",
           "d": "discard", "a": "alloc", "q": "quit", "o": "open", "c": "close",
           "aio_discard": "discard"}


def _count_ok(name: str, cmd_min: int, cmd_max: int, argc: int) -> bool:
    """init_check_command(): qemu-io's argument count messages."""
    if argc >= cmd_min and (cmd_max == -1 or argc <= cmd_max):
        return True
    if cmd_max == -1:
        expect = f"at least {cmd_min} arguments"
    elif cmd_min == cmd_max:
        expect = f"{cmd_min} arguments"
    else:
        expect = f"between {cmd_min} and {cmd_max} arguments"
    print(f"bad argument count {argc} to {name}, expected {expect}", file=sys.stderr)
    return False


async def open_f(s: Session, argv: list[str]) -> int:
    """open [-rnU] [-t cache] [-o options] [file]"""
    if s.disk is not None:
        print(f"{PROG}: file open already, try 'help close'", file=sys.stderr)
        return -errno.EBUSY
    try:
        opts, args = getopt.gnu_getopt(argv[1:], "rnUt:o:")
    except getopt.GetoptError as e:
        print(f"open: {e.msg}", file=sys.stderr)
        return -errno.EINVAL
    flags = dict(opts)
    cache = CACHE_MODES[flags["-t"]] if flags.get("-t") in CACHE_MODES else (
        CACHE_MODES["none"] if "-n" in flags else CACHE_MODES["writethrough"])
    options: dict[str, str] = {}
    for key, value in ((k, v) for o, v in opts if o == "-o" for k, _, v in [v.partition("=")]):
        options[key] = value
    fmt = options.pop("driver", None)
    if len(args) != 1:
        print("open: expecting a file name", file=sys.stderr)
        return -errno.EINVAL
    ok = await s.open(args[0], fmt, "-r" in flags, "-U" in flags, cache)
    return 0 if ok else -errno.EINVAL


async def run_command(s: Session, line: str) -> int:
    """qemuio_command(): split the line, check it, run the command."""
    argv = line.split()
    if not argv:
        return 0
    name = ALIASES.get(argv[0], argv[0])
    if name == "quit":
        s.quit = True
        return 0
    if name == "open":
        return await open_f(s, argv)
    if name == "close":
        await s.close()
        return 0
    cmd = COMMANDS.get(name)
    if cmd is None:
        print(f'command "{argv[0]}" not found', file=sys.stderr)
        return -errno.EINVAL
    if not _count_ok(argv[0], cmd.argmin, cmd.argmax, len(argv) - 1):
        return -errno.EINVAL
    if s.disk is None:
        print("no file open, try 'help open'", file=sys.stderr)
        return -errno.EINVAL
    if cmd.writes and s.disk.blk.node.read_only:
        print(f"{PROG}: Block node is read-only", file=sys.stderr)
        return -errno.EACCES
    try:
        opts, args = getopt.gnu_getopt(argv[1:], cmd.optstr)
    except getopt.GetoptError as e:
        print(f"{argv[0]}: {e.msg}", file=sys.stderr)
        return -errno.EINVAL
    if cmd.argmin and len(args) < cmd.argmin:
        print(f"bad argument count {len(args)} to {argv[0]}", file=sys.stderr)
        return -errno.EINVAL
    try:
        return await cmd.func(s, s.disk, dict(opts), args)
    except _Fail as e:
        return e.code
