"""``qblock img convert``: qemu-img convert (qemu-img.c img_convert, convert_co_do_copy).

Sources are concatenated; each range is classified by block status as data, zeroes or (with
``-B``) left to the target's backing file.  Data is read in chunks of up to 2 MiB by ``-m``
workers at once; a chunk the page cache holds in one run of a read-only source file is taken
as a view of those pages (BlockBackend.read_view) and written from there, without the copy
into a buffer that qemu-img makes.  Zero runs of at least ``-S`` bytes inside data are not
written when the new target reads as zeroes already.  With ``-c`` the chunks are whole
clusters, which the qcow2 driver compresses in parallel.  The target's cache mode is ``-t``,
``unsafe`` unless given (qemu-img's default for convert: flushes are no-ops).

Write order: qemu-img keeps writes in order (wr_in_order, unless ``-W``) so that a format
target allocates its clusters in guest order.  Here that holds for a qcow2 target only, and
only for the allocation: the next chunk's write starts once the qcow2 driver has allocated the
previous one's clusters (io.write_allocated), while that data is still being written; the
layout is the one qemu-img gets.  A raw target's bytes are the same whatever order the writes
land in, so its writes are never held back.
"""
from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from qblock import api
from qblock.block import io
from qblock.block.buffer import blockalign
from qblock.cli import imgcreate, imgfmt
from qblock.cli.imgerr import error, getopt_args
from qblock.cli.imgprogress import Progress
from qblock.drivers.base import ReqFlags, Status
from qblock.errors import QBlockError

SECTOR = 512
IO_BUF_SECTORS = 2 * 1024 * 1024 // SECTOR  # qemu-img.c IO_BUF_SIZE
MAX_BUF_SECTORS = 32768
MAX_COROUTINES = 16
_ST_ZERO, _ST_DATA = int(Status.ZERO), int(Status.DATA)
# block.c bdrv_parse_cache_mode(): mode -> (cache.direct, writethrough, cache.no-flush)
CACHE_MODES = {"off": (True, False, False), "none": (True, False, False),
               "directsync": (True, True, False), "writeback": (False, False, False),
               "unsafe": (False, False, True), "writethrough": (False, True, False)}


class Kind(enum.Enum):
    """ImgConvertBlockStatus."""

    DATA = 0
    ZERO = 1
    BACKING_FILE = 2


class ConvertError(Exception):
    """Conversion failed; the message is qemu-img's (without the program name)."""


@dataclass
class Converter:
    """ImgConvertState: the sources, the target and the copy cursor."""

    sources: list[api.AsyncDisk]
    target: api.AsyncDisk
    min_sparse: int = 8          # sectors; 0 = fully allocate (-S 0)
    num_workers: int = 8
    in_order: bool = True
    compressed: bool = False
    target_has_backing: bool = False
    has_zero_init: bool = False
    writethrough: bool = False  # -t writethrough/directsync: every data write is FUA
    cluster_sectors: int = 0
    alignment: int = 1
    progress: bool = False
    src_sectors: list[int] = field(default_factory=list)
    total_sectors: int = 0
    buf_sectors: int = IO_BUF_SECTORS

    def __post_init__(self) -> None:
        self.src_sectors = [-(-s.size // SECTOR) for s in self.sources]
        self.total_sectors = sum(self.src_sectors)
        self._next_status = 0
        self._status = Kind.DATA
        self._cursor = 0
        self._wr_offs = 0
        self._lock = asyncio.Lock()
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._error: str | None = None
        self._allocated = self._done = 0
        self._progress = Progress(self.progress)

    def _select(self, sector: int) -> tuple[int, int]:
        """convert_select_part(): the source holding ``sector`` and where that source starts."""
        start = 0
        for i, n in enumerate(self.src_sectors):
            if sector - start < n:
                return i, start
            start += n
        raise AssertionError("sector past the end of the sources")

    async def _iteration_sectors(self, sector: int) -> int:
        """convert_iteration_sectors(): the length and kind of the next chunk."""
        idx, start = self._select(sector)
        n = self.total_sectors - sector
        if self._next_status <= sector:
            src = self.sources[idx].node
            offset = (sector - start) * SECTOR
            count = min(n, self.src_sectors[idx] - (sector - start)) * SECTOR
            count = min(count, self.sources[idx].size - offset) or SECTOR
            try:
                if self.target_has_backing:
                    st = await io.block_status(src, offset, count)
                else:
                    st, _ = await io.block_status_above(src, None, offset, count)
            except QBlockError as e:
                raise ConvertError(f"error while reading block status at offset {offset}: "
                                   f"{os.strerror(e.errno)}") from None
            n = max(-(-st.pnum // SECTOR), 1)
            status = int(st.status)  # plain int: IntFlag arithmetic is slow per chunk
            if status & _ST_ZERO:
                self._status = Kind.ZERO
            elif status & _ST_DATA:
                self._status = Kind.DATA
            else:
                self._status = Kind.BACKING_FILE if self.target_has_backing else Kind.DATA
            self._next_status = sector + n
        n = min(n, self._next_status - sector)
        if self._status is Kind.DATA:
            n = min(n, self.buf_sectors)
        if self.compressed:
            # whole clusters only: a short hole inside one is copied as data
            if n < self.cluster_sectors:
                n = min(self.cluster_sectors, self.total_sectors - sector)
                self._status = Kind.DATA
            else:
                n -= n % self.cluster_sectors
        return n

    async def _read(self, sector: int, n: int, buf: memoryview) -> None:
        """convert_co_read() into ``buf``: across sources; a partial last sector reads as
        zeroes."""
        pos = 0
        while pos < n:
            idx, start = self._select(sector + pos)
            src = self.sources[idx]
            chunk = min(n - pos, self.src_sectors[idx] - (sector + pos - start))
            offset = (sector + pos - start) * SECTOR
            length = min(chunk * SECTOR, src.size - offset)
            await src.blk.preadv(offset, buf[pos * SECTOR:pos * SECTOR + length])
            if length < chunk * SECTOR:
                buf[pos * SECTOR + length:(pos + chunk) * SECTOR] = bytes(chunk * SECTOR - length)
            pos += chunk

    async def _read_view(self, sector: int, n: int) -> memoryview | None:
        """The chunk as a view of the source's cached pages, when one source holds all of it
        and its drivers can hand one out (BlockBackend.read_view): no read copy.  qemu-img
        always reads into its buffer; the bytes written are the same."""
        idx, start = self._select(sector)
        src = self.sources[idx]
        offset = (sector - start) * SECTOR
        if offset + n * SECTOR > src.size:
            return None
        return await src.blk.read_view(offset, n * SECTOR)

    @staticmethod
    def _nonzero_sectors(buf: memoryview, n: int) -> np.ndarray:
        """Per sector, whether it holds a non-zero byte (buffer_is_zero() of each sector).

        Like buffer_is_zero(), a sector is settled by its first non-zero word: data sectors
        almost always have one at the start, so only the others are scanned in full.
        """
        words = np.frombuffer(buf, dtype=np.uint64, count=n * (SECTOR // 8)).reshape(n, -1)
        nonzero = words[:, 0] != 0
        if np.count_nonzero(nonzero) == n:
            return nonzero
        todo = np.flatnonzero(~nonzero)
        if len(todo) * 8 > n:
            return np.bitwise_or.reduce(words, axis=1) != 0
        nonzero[todo] = np.bitwise_or.reduce(words[todo], axis=1) != 0
        return nonzero

    def _runs(self, buf: memoryview, sector: int, n: int) -> list[tuple[bool, int]]:
        """is_allocated_sectors_min() applied until the chunk is used up: (is_data, sectors)."""
        nonzero = self._nonzero_sectors(buf, n)
        changes = np.flatnonzero(nonzero[1:] != nonzero[:-1]) + 1
        if not len(changes):
            return [(bool(nonzero[0]), n)]

        def allocated(pos: int, end: int) -> tuple[bool, int]:
            """is_allocated_sectors(): the run at ``pos``, its end aligned to the target."""
            is_data = bool(nonzero[pos])
            k = int(np.searchsorted(changes, pos, side="right"))
            run_end = int(changes[k]) if k < len(changes) else n
            if run_end >= end:
                return is_data, end - pos
            i = run_end - pos
            tail = (sector + pos + i) & (self.alignment - 1)
            if tail:
                if not is_data and i <= tail:
                    is_data = True  # a zero area that is only a short tail counts as data
                if is_data:
                    i = min(i + self.alignment - tail, end - pos)
                else:
                    i -= tail
            return is_data, i

        out: list[tuple[bool, int]] = []
        pos = 0
        while pos < n:
            is_data, num = allocated(pos, n)
            if is_data:
                used = checked = num
                minimum = min(self.min_sparse, n - pos)
                while pos + checked < n:
                    d, num = allocated(pos + checked, n)
                    checked += num
                    if d:
                        used = checked
                    elif num >= minimum:
                        break
                num = used
            out.append((is_data, num))
            pos += num
        return out

    def _data_runs(self, buf: memoryview, sector: int, n: int) -> list[tuple[bool, int]]:
        """What convert_co_write() writes of a data chunk: (is_data, sectors) pieces."""
        if not self.min_sparse:
            return [(True, n)]
        if self.compressed:
            return self._cluster_runs(buf, n)
        return self._runs(buf, sector, n)

    def _cluster_runs(self, buf: memoryview, n: int) -> list[tuple[bool, int]]:
        """Compressed: a cluster is written unless it is all zeroes (buffer_is_zero() of
        the cluster); consecutive clusters to write go in one request."""
        cl = self.cluster_sectors
        clusters = -(-n // cl)
        nonzero = np.zeros(clusters * cl, dtype=bool)
        nonzero[:n] = self._nonzero_sectors(buf, n)
        data = nonzero.reshape(clusters, cl).any(axis=1)
        edges = np.flatnonzero(data[1:] != data[:-1]) + 1
        bounds = [0, *(edges * cl).tolist(), n]
        return [(bool(data[a // cl]), b - a) for a, b in zip(bounds[:-1], bounds[1:])]

    async def _write(self, sector: int, n: int, kind: Kind, buf: memoryview | None,
                     runs: list[tuple[bool, int]],
                     on_allocated: Callable[[], None] | None = None) -> None:
        """convert_co_write(); ``runs`` are the data chunk's pieces (see _data_runs()).

        ``on_allocated`` is handed to the target's driver with the chunk's last request when
        that is a data write (io.write_allocated): the driver calls it once the write's
        clusters are allocated, before its data is written.
        """
        blk = self.target.blk
        if kind is Kind.BACKING_FILE:
            return
        if kind is Kind.DATA and buf is not None:
            flags = ReqFlags.WRITE_COMPRESSED if self.compressed else ReqFlags.NONE
            if self.writethrough:
                flags |= ReqFlags.FUA
            pos = 0
            last = len(runs) - 1
            for i, (is_data, num) in enumerate(runs):
                if is_data:
                    view = buf[pos * SECTOR:(pos + num) * SECTOR]
                    if i == last and on_allocated is not None:
                        token = io.write_allocated.set(on_allocated)
                        try:
                            await blk.pwritev((sector + pos) * SECTOR, view, flags)
                        finally:
                            io.write_allocated.reset(token)
                    else:
                        await blk.pwritev((sector + pos) * SECTOR, view, flags)
                elif not self.has_zero_init:
                    await blk.pwrite_zeroes((sector + pos) * SECTOR, num * SECTOR,
                                            ReqFlags.MAY_UNMAP)
                pos += num
            return
        if not self.has_zero_init:
            await blk.pwrite_zeroes(sector * SECTOR, n * SECTOR,
                                    ReqFlags.MAY_UNMAP if self.min_sparse else ReqFlags.NONE)

    def _report(self) -> None:
        """convert_co_do_copy()'s progress: the share of the allocated sectors copied."""
        self._progress.fraction(self._done, self._allocated)

    def _fail(self, msg: str) -> None:
        """Record the first error and release every worker waiting for its turn."""
        if self._error is None:
            self._error = msg
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def _wait_turn(self, sector: int) -> None:
        """In-order writes: wait until every sector before ``sector`` is written."""
        if self._wr_offs == sector or self._error is not None:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters[sector] = fut
        await fut

    def _pass_turn(self, end: int) -> None:
        """Written (or, for a qcow2 target, allocated) up to ``end``: wake the worker whose
        chunk starts there (wait_sector_num).  Called again when the write completes."""
        if end <= self._wr_offs:
            return
        self._wr_offs = end
        fut = self._waiters.pop(end, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _worker(self) -> None:
        """convert_co_do_copy(), with one buffer per worker (qemu-img's blk_blockalign)."""
        buf = blockalign(self.buf_sectors * SECTOR)
        while True:
            async with self._lock:
                if self._error is not None or self._cursor >= self.total_sectors:
                    return
                sector = self._cursor
                try:
                    n = await self._iteration_sectors(sector)
                except ConvertError as e:
                    self._fail(str(e))
                    return
                kind = self._status
                if not self.min_sparse and kind is Kind.ZERO:
                    n = min(n, self.buf_sectors)
                self._cursor += n
            if kind is Kind.DATA or (not self.min_sparse and kind is Kind.ZERO):
                self._done += n
                self._report()
            data = None
            runs: list[tuple[bool, int]] = []
            if kind is Kind.DATA:
                try:
                    data = await self._read_view(sector, n)
                    if data is None:
                        data = buf[:n * SECTOR]
                        await self._read(sector, n, data)
                except QBlockError as e:
                    self._fail(f"error while reading at byte {sector * SECTOR}: "
                               f"{os.strerror(e.errno)}")
                else:
                    # the zero scan depends on the data alone: done before waiting for the turn
                    runs = self._data_runs(data, sector, n)
            if self.in_order:
                await self._wait_turn(sector)
            if self._error is None:
                try:
                    await self._write(sector, n, kind, data, runs,
                                      partial(self._pass_turn, sector + n)
                                      if self.in_order else None)
                except QBlockError as e:
                    self._fail(f"error while writing at byte {sector * SECTOR}: "
                               f"{os.strerror(e.errno)}")
            if self.in_order:
                self._pass_turn(sector + n)

    async def run(self) -> None:
        """convert_do_copy(): size the work (for progress only), then run the workers."""
        if self.compressed:
            # qemu-img copies one cluster at a time; whole clusters of a 2 MiB buffer give
            # the driver several to compress in parallel, stored in the same order
            self.buf_sectors = max(self.cluster_sectors,
                                   IO_BUF_SECTORS - IO_BUF_SECTORS % self.cluster_sectors)
        sector = 0
        while self.progress and sector < self.total_sectors:
            n = await self._iteration_sectors(sector)
            if self._status is Kind.DATA or (not self.min_sparse and self._status is Kind.ZERO):
                self._allocated += n
            sector += n
        self._next_status = 0
        self._progress.start()
        await asyncio.gather(*(self._worker() for _ in range(self.num_workers)))
        if self._error is not None:
            raise ConvertError(self._error)
        self._progress.end()


@dataclass
class Options:
    """The parsed command line."""

    fmt: str | None = None
    out_fmt: str = "raw"
    backing: str | None = None
    backing_fmt: str | None = None
    compressed: bool = False
    create_opts: dict[str, str] = field(default_factory=dict)
    has_opts: bool = False
    min_sparse: int = 8
    progress: bool = False
    quiet: bool = False
    skip_create: bool = False
    cache: str = "unsafe"  # qemu-img convert's default for the target
    src_cache: str = "writeback"
    num_workers: int = 8
    in_order: bool = True
    share: bool = False
    target_is_zero: bool = False
    args: list[str] = field(default_factory=list)


def parse(argv: list[str]) -> Options | None:
    """img_convert()'s getopt loop and checks; None after printing an error."""
    pairs, args = getopt_args(argv, "hf:O:B:b:F:co:S:pt:T:qnm:WU",
                              ["help", "force-share", "target-is-zero"])
    o = Options(args=args)
    for opt, val in pairs:
        if opt == "-f":
            o.fmt = val
        elif opt == "-O":
            o.out_fmt = val
        elif opt in ("-B", "-b"):
            o.backing = val
        elif opt == "-F":
            o.backing_fmt = val
        elif opt == "-c":
            o.compressed = True
        elif opt == "-o":
            o.has_opts = True
            for item in filter(None, val.split(",")):
                key, _, value = item.partition("=")
                o.create_opts[key] = value
        elif opt == "-S":
            try:
                sval = imgfmt.parse_size(val)
            except (ValueError, OverflowError):
                error(f"Invalid buffer size for sparse output specified: '{val}'")
                return None
            if sval % SECTOR or sval // SECTOR > MAX_BUF_SECTORS:
                error("Invalid buffer size for sparse output specified. Valid sizes are "
                      f"multiples of {SECTOR} up to {MAX_BUF_SECTORS * SECTOR}. Select 0 to "
                      "disable sparse detection (fully allocates output).")
                return None
            o.min_sparse = sval // SECTOR
        elif opt in ("-t", "-T") and val not in CACHE_MODES:
            error(f"Invalid {'source ' if opt == '-T' else ''}cache option: {val}")
            return None
        elif opt == "-t":
            o.cache = val
        elif opt == "-T":
            o.src_cache = val
        elif opt == "-p":
            o.progress = True
        elif opt == "-q":
            o.quiet = True
        elif opt == "-n":
            o.skip_create = True
        elif opt == "-m":
            try:
                o.num_workers = int(val, 0)
            except ValueError:
                o.num_workers = 0
            if not 1 <= o.num_workers <= MAX_COROUTINES:
                error("Invalid number of coroutines. Allowed number of coroutines is "
                      f"between 1 and {MAX_COROUTINES}")
                return None
        elif opt == "-W":
            o.in_order = False
        elif opt in ("-U", "--force-share"):
            o.share = True
        elif opt == "--target-is-zero":
            o.target_is_zero = True
        elif opt in ("-h", "--help"):
            print(__doc__)
            return None
    if o.skip_create and o.has_opts:
        error("-o has no effect when skipping image creation")
        return None
    if o.target_is_zero and not o.skip_create:
        error("--target-is-zero requires use of -n flag")
        return None
    if len(o.args) < 2:
        error("Must specify image file name")
        return None
    o.progress = Progress.wanted(o.progress, o.quiet)
    return o


async def _open(filename: str, fmt: str | None, *, read_only: bool, cache: str,
                share: bool = False) -> api.AsyncDisk:
    """Open a source or the target with a -T/-t cache mode (unsafe: flushes are no-ops)."""
    try:
        fmt = fmt or api.probe_format(filename)
        if fmt not in ("raw", "qcow2"):
            raise ConvertError(f"Unknown file format '{fmt}'")
        direct, _, no_flush = CACHE_MODES[cache]
        options = api.image_options(filename, driver=fmt, cache_direct=direct)
        if no_flush:
            options["cache"] = {**options.get("cache", {}), "no-flush": True}
        return await api.open_async(options, read_only=read_only, share=share)
    except OSError as e:
        raise ConvertError(f"Could not open '{filename}': Could not open '{filename}': "
                           f"{os.strerror(e.errno or 0)}") from None
    except QBlockError as e:
        raise ConvertError(f"Could not open '{filename}': {e}") from None


async def _create(o: Options, filename: str, size: int) -> None:
    """bdrv_create() of the target with the -o options and -B/-F backing."""
    if o.out_fmt not in ("raw", "qcow2"):
        raise ConvertError(f"Unknown file format '{o.out_fmt}'")
    backing = o.backing or o.create_opts.get("backing_file")
    if backing is not None and not (o.backing_fmt or o.create_opts.get("backing_fmt")):
        raise ConvertError("Use of backing file requires explicit backing format")
    if o.compressed and o.out_fmt != "qcow2":
        raise ConvertError("Compression not supported for this file format")
    if o.out_fmt == "raw":
        for key in o.create_opts:
            if key != "size":
                raise ConvertError(f"Invalid parameter '{key}'")
        if backing is not None:
            raise ConvertError(f"{filename}: error while converting raw: Backing file not "
                               "supported for file format 'raw'")
        try:
            with open(filename, "wb") as f:
                f.truncate(size)
                # file-posix allocate_first_block(): a new file's first block is written so
                # that alignment probing works; it shows as data in qemu-img map
                f.write(bytes(min(size, 4096)))
        except OSError as e:
            raise ConvertError(f"{filename}: error while converting raw: "
                               f"Could not create '{filename}': {os.strerror(e.errno or 0)}"
                               ) from None
        return
    from qblock.drivers.qcow2.create import create

    try:
        kwargs = imgcreate.qcow2_create_kwargs(o.create_opts)
    except imgcreate.CreateOptionError as e:
        raise ConvertError(str(e)) from None
    kwargs.pop("size", None)
    if o.backing is not None:
        kwargs["backing_file"] = o.backing
    if o.backing_fmt is not None:
        kwargs["backing_fmt"] = o.backing_fmt
    reason = imgcreate.unsupported(kwargs)
    if reason is not None:
        raise ConvertError(f"{filename}: error while converting qcow2: {reason}")
    for key in ("nocow", "extent_size_hint"):
        kwargs.pop(key, None)
    try:
        await create(filename, size, **kwargs)
    except (QBlockError, OSError) as e:
        msg = os.strerror(e.errno or 0) if isinstance(e, OSError) else str(e)
        raise ConvertError(f"{filename}: error while converting qcow2: {msg}") from None


async def _convert(o: Options) -> None:
    *src_names, out_name = o.args
    sources: list[api.AsyncDisk] = []
    target: api.AsyncDisk | None = None
    try:
        for name in src_names:
            sources.append(await _open(name, o.fmt, read_only=True, cache=o.src_cache,
                                       share=o.share))
        total = sum(-(-s.size // SECTOR) for s in sources) * SECTOR
        backing = o.backing or o.create_opts.get("backing_file")
        if backing is not None and len(sources) > 1:
            raise ConvertError("Having a backing file for the target makes no sense when "
                               "concatenating multiple input images")
        if not o.skip_create:
            await _create(o, out_name, total)
        target = await _open(out_name, o.out_fmt, read_only=False, cache=o.cache)
        if o.skip_create and target.size < total:
            raise ConvertError("output file is smaller than input file")
        is_qcow2 = target.node.drv.format_name == "qcow2"
        if o.compressed and not is_qcow2:
            raise ConvertError("Compression not supported for this file format")
        conv = Converter(sources, target, min_sparse=o.min_sparse,
                         num_workers=o.num_workers, in_order=o.in_order and is_qcow2,
                         compressed=o.compressed, target_has_backing=backing is not None,
                         writethrough=CACHE_MODES[o.cache][1], progress=o.progress)
        conv.has_zero_init = o.target_is_zero or (
            not o.skip_create and bool(o.min_sparse) and backing is None)
        conv.cluster_sectors = (target.node.drv.header.cluster_size // SECTOR if is_qcow2
                                else 0)
        # qemu-img.c: align writes to -S (a power of two) and the target's request alignment
        sparse_pow2 = 1 << (o.min_sparse.bit_length() - 1) if o.min_sparse else 1
        conv.alignment = max(sparse_pow2, -(-target.node.request_alignment // SECTOR))
        await conv.run()
    finally:
        if target is not None:
            await target.close()
        for src in sources:
            await src.blk.close()  # read-only: no flush (bdrv_co_flush skips read-only nodes)


async def cmd_convert(argv: list[str]) -> int:
    """Entry point of ``qblock img convert``; exit status 0 or 1 like qemu-img."""
    o = parse(argv)
    if o is None:
        return 0 if "-h" in argv or "--help" in argv else 1
    try:
        await _convert(o)
    except ConvertError as e:
        error(str(e))
        return 1
    return 0
