"""``qblock img bench``: qemu-img bench (qemu-img.c img_bench, bench_cb).

``count`` requests of ``-s`` bytes, ``-d`` of them in flight through one BlockBackend, at
offsets advancing by ``-S`` (default: the buffer size) from ``-o`` and wrapping at the image
end; ``-w`` writes buffers filled with the ``--pattern`` byte.  With ``--flush-interval=N``
a flush is sent each time the number of requests not yet sent is a multiple of N, after the
queue drained unless ``--no-drain``.  Output lines and messages are qemu-img 7.2's.

Each of the ``depth`` slots is a coroutine with its own buffer, reused for every request.
"""
from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from typing import Any

from qblock import api
from qblock.block.buffer import blockalign
from qblock.cli.imgdd import INT_MAX, cvtnum, cvtnum_full, image_opts_dict
from qblock.cli.imgerr import error, error_exit, getopt_args
from qblock.drivers.base import ReqFlags
from qblock.errors import QBlockError

# block.c bdrv_parse_cache_mode(): mode -> (cache.direct, writethrough, no-flush)
CACHE_MODES = {"off": (True, False, False), "none": (True, False, False),
               "directsync": (True, True, False), "writeback": (False, False, False),
               "unsafe": (False, False, True), "writethrough": (False, True, False)}
AIO_MODES = ("threads", "native", "io_uring")  # block.c bdrv_parse_aio()
# strtoul() base 0: optional blanks and sign, then hex, octal or decimal digits
_ULONG = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_LONG = ["help", "flush-interval=", "image-opts", "pattern=", "no-drain", "force-share"]


class RequestFailed(Exception):
    """A request of the run failed; the message is qemu-img's."""


def _strtoul(text: str, limit: int) -> int | None:
    """qemu_strtoul(text, NULL, 0, &res) with an upper bound; None when invalid."""
    m = _ULONG.fullmatch(text)
    if m is None:
        return None
    digits = m.group(2)
    value = int(digits, 16 if digits[:2].lower() == "0x" else 8 if digits[0] == "0" else 10)
    if m.group(1) == "-" and value:
        return None  # strtoul() negates: far above any limit
    return value if value <= limit else None


class Bench:
    """BenchData: the request stream and its flush schedule."""

    def __init__(self, disk: api.AsyncDisk, *, count: int, depth: int, bufsize: int,
                 step: int, offset: int, write: bool, pattern: int, flush_interval: int,
                 drain_on_flush: bool, writethrough: bool, no_flush: bool) -> None:
        self.blk = disk.blk
        self.image_size = disk.size
        self.n = count                  # requests not completed yet
        self.in_flight = 0
        self.nrreq = depth
        self.bufsize = bufsize
        self.step = step
        self.offset = offset
        self.write = write
        self.pattern = pattern
        self.flush_interval = flush_interval
        self.drain_on_flush = drain_on_flush
        self.flags = ReqFlags.FUA if writethrough else ReqFlags.NONE
        self.no_flush = no_flush
        self.failure: str | None = None
        self._resume = asyncio.Event()
        self._resume.set()
        self._flushes: set[asyncio.Task[None]] = set()

    async def _flush(self) -> None:
        if not self.no_flush:  # cache=unsafe: BDRV_O_NO_FLUSH makes flushes no-ops
            await self.blk.flush()

    async def _undrained_flush(self) -> None:
        try:
            await self._flush()
        except QBlockError as e:
            self.failure = self.failure or f"Failed flush request: {os.strerror(e.errno)}"

    def _completed(self) -> bool:
        """bench_cb() after a request: count it; True when a flush is due now."""
        remaining = self.n - self.in_flight
        self.n -= 1
        self.in_flight -= 1
        return bool(self.flush_interval) and remaining % self.flush_interval == 0

    async def _flush_due(self) -> None:
        """Flush beside the queue (``--no-drain``), or stop sending until it drained and the
        last request to finish flushed."""
        if not self.drain_on_flush:
            task = asyncio.ensure_future(self._undrained_flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
            return
        self._resume.clear()
        if self.in_flight:
            return
        try:
            await self._flush()
        except QBlockError as e:
            raise RequestFailed(f"Failed request: {os.strerror(e.errno)}") from None
        finally:
            self._resume.set()

    async def _slot(self) -> None:
        """One request in flight at a time, always from the same buffer."""
        buf = blockalign(self.bufsize)
        buf[:] = bytes([self.pattern]) * self.bufsize
        request = self.blk.pwritev if self.write else self.blk.preadv
        flags = self.flags if self.write else ReqFlags.NONE
        resume = self._resume
        try:
            while True:
                if not resume.is_set():
                    await resume.wait()
                if self.failure is not None or self.n <= self.in_flight:
                    return
                offset = self.offset
                self.in_flight += 1
                self.offset += self.step
                if self.image_size:
                    self.offset %= self.image_size
                try:
                    await request(offset, buf, flags)
                except QBlockError as e:
                    self.in_flight -= 1
                    raise RequestFailed(f"Failed request: {os.strerror(e.errno)}") from None
                if self._completed():
                    await self._flush_due()
        except RequestFailed as e:
            self.failure = self.failure or str(e)
            resume.set()

    async def run(self) -> None:
        """Send every request; raise RequestFailed with qemu-img's message on a failure."""
        slots = min(self.nrreq, self.n)
        await asyncio.gather(*(self._slot() for _ in range(slots)))
        if self._flushes:
            await asyncio.gather(*self._flushes)
        if self.failure is not None:
            raise RequestFailed(self.failure)


async def _open(filename: str, fmt: str | None, *, image_opts: bool, write: bool,
                share: bool, direct: bool, aio: str) -> api.AsyncDisk | None:
    """img_open() with the bench's flags."""
    try:
        if aio == "native" and not direct:
            raise QBlockError("aio=native was specified, but it requires cache.direct=on, "
                              "which was not specified.")
        if image_opts:
            options = image_opts_dict(filename)
            if options is None:
                return None
            if direct:
                options["cache"] = {"direct": True}
            if share:
                options["force-share"] = True
            return await api.open_async(options, read_only=not write)
        if fmt is not None and fmt not in ("raw", "qcow2"):
            raise QBlockError(f"Unknown driver '{fmt}'")
        return await api.open_async(filename, driver=fmt, read_only=not write,
                                    cache_direct=direct, share=share)
    except OSError as e:
        error(f"Could not open '{filename}': Could not open '{filename}': "
              f"{os.strerror(e.errno or 0)}")
    except QBlockError as e:
        error(f"Could not open '{filename}': {e}")
    return None


async def cmd_bench(argv: list[str]) -> int:
    """Entry point of ``qblock img bench``; exit status 0 or 1 like qemu-img."""
    opts, args = getopt_args(argv, "hc:d:f:ni:o:qs:S:t:wU", _LONG)
    fmt, image_opts, write, share, drain = None, False, False, False, True
    count, depth, offset, bufsize, pattern, step, flush_interval = 75000, 64, 0, 4096, 0, 0, 0
    cache, aio = "writeback", "threads"
    for o, v in opts:
        if o in ("-h", "--help"):
            print(f"usage: qblock img bench [options] filename\n\n{__doc__}")
            return 0
        if o in ("-c", "-d", "--pattern", "--flush-interval"):
            limit = 0xFF if o == "--pattern" else INT_MAX
            value = _strtoul(v, limit)
            if value is None:
                what = {"-c": "request count", "-d": "queue depth", "--pattern": "pattern byte",
                        "--flush-interval": "flush interval"}[o]
                error(f"Invalid {what} specified")
                return 1
            if o == "-c":
                count = value
            elif o == "-d":
                depth = value
            elif o == "--pattern":
                pattern = value
            else:
                flush_interval = value
        elif o == "-f":
            fmt = v
        elif o == "-n":
            aio = "native"
        elif o == "-i":
            if v not in AIO_MODES:
                error(f"Invalid aio option: {v}")
                return 1
            aio = v
        elif o in ("-o", "-s", "-S"):
            if o == "-o":
                number = cvtnum("offset", v)
            else:
                number = cvtnum_full("buffer size" if o == "-s" else "step_size", v, 0, INT_MAX)
            if number is None:
                return 1
            if o == "-o":
                offset = number
            elif o == "-s":
                bufsize = number
            else:
                step = number
        elif o == "-t":
            if v not in CACHE_MODES:
                error("Invalid cache mode")
                return 1
            cache = v
        elif o == "-w":
            write = True
        elif o in ("-U", "--force-share"):
            share = True
        elif o == "--no-drain":
            drain = False
        elif o == "--image-opts":
            image_opts = True
    if len(args) != 1:
        raise error_exit("Expecting one image file name")
    if not write and flush_interval:
        error("--flush-interval is only available in write tests")
        return 1
    if flush_interval and flush_interval < depth:
        error("Flush interval can't be smaller than depth")
        return 1
    direct, writethrough, no_flush = CACHE_MODES[cache]
    disk = await _open(args[0], fmt, image_opts=image_opts, write=write, share=share,
                       direct=direct, aio=aio)
    if disk is None:
        return 1
    try:
        return await _run(disk, count=count, depth=depth, bufsize=bufsize, step=step or bufsize,
                          offset=offset, write=write, pattern=pattern,
                          flush_interval=flush_interval, drain_on_flush=drain,
                          writethrough=writethrough, no_flush=no_flush)
    finally:
        await disk.close()


async def _run(disk: api.AsyncDisk, **params: Any) -> int:
    """Print the plan, send the requests, print the time taken."""
    bench = Bench(disk, **params)
    print(f"Sending {bench.n} {'write' if bench.write else 'read'} requests, "
          f"{bench.bufsize} bytes each, {bench.nrreq} in parallel (starting at offset "
          f"{bench.offset}, step size {bench.step})")
    if bench.flush_interval:
        print(f"Sending flush every {bench.flush_interval} requests")
    sys.stdout.flush()
    t1 = time.monotonic()
    try:
        await bench.run()
    except RequestFailed as e:
        error(str(e))
        return 1
    print("Run completed in %3.3f seconds." % (time.monotonic() - t1))
    return 0
