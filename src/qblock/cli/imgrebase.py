"""``qblock img rebase``: qemu-img rebase (qemu-img.c img_rebase, QEMU 7.2).

Safe mode keeps what the guest sees: every range not allocated in the image is read from the
old and the new backing file (2 MiB at a time, IO_BUF_SIZE) and the 512-byte sectors that
differ are written into the image, then the header gets the new backing name and format.
``-u`` only rewrites the header.  ``-b ""`` removes the backing file.
"""
from __future__ import annotations

import asyncio

import numpy as np

from qblock import api
from qblock.block import io
from qblock.block.backend import BlockBackend
from qblock.block.node import BlockNode
from qblock.block.open import open_node
from qblock.block.perm import PERM_ALL, Perm
from qblock.block.qapi import path_combine
from qblock.cli.imgerr import CommandFailed, error, error_exit, getopt_args
from qblock.cli.imgcommit import FORMATS, cache_direct, find_backing_image, open_rw
from qblock.cli.imgprogress import Progress
from qblock.drivers.base import Status
from qblock.errors import QBlockError

IO_BUF_SIZE = 2 * 1024 * 1024  # qemu-img.c IO_BUF_SIZE
SECTOR = 512  # compare_buffers() works in BDRV_SECTOR_SIZE units


def differing_runs(old: bytes | bytearray, new: bytes | bytearray) -> list[tuple[int, int]]:
    """qemu-img.c compare_buffers() applied over a buffer: (offset, length) of differing runs.

    Runs are made of whole 512-byte sectors (the last one may be short).
    """
    n = len(old)
    sectors = -(-n // SECTOR)
    pad = sectors * SECTOR - n
    a = np.frombuffer(bytes(old) + bytes(pad) if pad else old, dtype=np.uint8)
    b = np.frombuffer(bytes(new) + bytes(pad) if pad else new, dtype=np.uint8)
    diff = (a != b).reshape(sectors, SECTOR).any(axis=1)
    if not diff.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([False], diff, [False])).astype(np.int8)))
    return [(int(s) * SECTOR, min(int(e) * SECTOR, n) - int(s) * SECTOR)
            for s, e in zip(edges[::2], edges[1::2])]


async def _open_new_backing(top: BlockNode, name: str, fmt: str | None, share: bool,
                            direct: bool) -> tuple[BlockBackend, BlockNode | None]:
    """The new backing file: a node of the chain when it is one (prefix_chain_bs), or opened."""
    real = path_combine(top.filename, name)
    prefix = find_backing_image(top, real)
    if prefix is not None:
        return BlockBackend(prefix, Perm.CONSISTENT_READ, PERM_ALL), prefix
    try:
        opts = api.image_options(real, driver=fmt, cache_direct=direct)
        if share:
            opts["force-share"] = True
        node = await open_node(opts, read_only=True, implicit=True)
    except OSError as e:  # probing the format of a file that is not there
        msg = f"Could not open '{real}': {e.strerror}"
    except QBlockError as e:
        msg = str(e)
    else:
        return BlockBackend(node, Perm.CONSISTENT_READ, PERM_ALL), None
    error(f"Could not open new backing file '{name}': {msg}")
    raise CommandFailed()


async def _read(blk: BlockBackend | None, size: int, offset: int, n: int,
                what: str) -> bytearray:
    """One side of the comparison; zeroes past the end of the file (or without one)."""
    if blk is None or offset >= size:
        return bytearray(n)
    try:
        return await blk.pread(offset, n)
    except QBlockError:
        error(f"error while reading from {what} backing file")
        raise CommandFailed() from None


def cluster_groups(runs: list[tuple[int, int]], cluster: int) -> list[list[tuple[int, int]]]:
    """Runs (absolute offsets) grouped so that no two groups touch the same cluster."""
    groups: list[list[tuple[int, int]]] = []
    last = -1
    for start, length in runs:
        if groups and start // cluster <= last:
            groups[-1].append((start, length))
        else:
            groups.append([(start, length)])
        last = (start + length - 1) // cluster
    return groups


async def _write_back(disk: api.AsyncDisk, offset: int, buf_old: bytearray, old_zero: bool,
                      runs: list[tuple[int, int]], cluster: int) -> None:
    """Write the differing runs; runs in different clusters go in parallel."""
    async def write(group: list[tuple[int, int]]) -> None:
        for start, length in group:
            if old_zero:
                await disk.write_zeroes(start, length)
            else:
                await disk.write(start, memoryview(buf_old)[start - offset:
                                                            start - offset + length])

    groups = cluster_groups([(offset + s, n) for s, n in runs], cluster)
    try:
        await asyncio.gather(*(write(g) for g in groups))
    except QBlockError as e:
        error(f"Error while writing to COW image: {e}")
        raise CommandFailed() from None


async def _is_skipped(top: BlockNode, prefix: BlockNode | None, offset: int,
                      n: int) -> tuple[bool, int]:
    """Whether [offset, offset+n) keeps as it is, and for how many bytes that holds."""
    below = top.cow_child()
    try:
        st = await io.block_status(top, offset, n)
        n = st.pnum
        if st.status & Status.ALLOCATED:  # the image's own data stays
            return True, n
        if prefix is not None and below is not None:
            # unchanged since the new backing (a node of the chain): nothing to do
            st, depth = await io.block_status_above(below.node, prefix, offset, n)
            # past the end of a shorter intermediate (pnum 0) the two may differ: compare
            if st.pnum:
                return depth == 0, st.pnum
    except QBlockError as e:
        error(f"error while reading image metadata: {e}")
        raise CommandFailed() from None
    return False, n


async def safe_copy(disk: api.AsyncDisk, old: BlockBackend | None, new: BlockBackend | None,
                    prefix: BlockNode | None, progress: Progress) -> None:
    """The copy loop of img_rebase(): what differs between old and new goes into the image."""
    top = disk.node
    size = disk.size
    old_size = old.getlength() if old is not None else 0
    new_size = new.getlength() if new is not None else 0
    cluster = getattr(getattr(top.drv, "header", None), "cluster_size", SECTOR)
    step = 100 / (size / min(size, IO_BUF_SIZE)) if size else 0.0
    # one chunk's writes go on while the next chunk is read and compared (they never overlap)
    writing: asyncio.Task[None] | None = None
    offset = 0
    try:
        while offset < size:
            skip, n = await _is_skipped(top, prefix, offset, min(IO_BUF_SIZE, size - offset))
            if skip:
                offset += n
                continue
            # each side is read up to its own end only (qemu-img shortens n to it)
            for blk, end in ((old, old_size), (new, new_size)):
                if blk is not None and offset < end:
                    n = min(n, end - offset)
            buf_old, buf_new = await asyncio.gather(_read(old, old_size, offset, n, "old"),
                                                    _read(new, new_size, offset, n, "new"))
            runs = differing_runs(buf_old, buf_new)
            if writing is not None:
                await writing
                writing = None
            if runs:
                writing = asyncio.ensure_future(_write_back(
                    disk, offset, buf_old, old is None or offset >= old_size, runs, cluster))
            offset += n
            progress.step(step, 100)
        if writing is not None:
            await writing
    finally:
        if writing is not None and not writing.done():
            writing.cancel()
            await asyncio.gather(writing, return_exceptions=True)


async def change_backing_file(node: BlockNode, name: str, fmt: str | None) -> None:
    """bdrv_change_backing_file(bs, name, fmt, require=true) with qemu-img's messages."""
    change = getattr(node.drv, "change_backing_file", None)
    if name and fmt is None:
        msg = "backing format must be specified"
    elif change is None:
        msg = "Operation not supported"
    else:
        try:
            await change(name or None, fmt if name else None)
            return
        except QBlockError as e:
            msg = ("No space left in the file header" if "No space left" in str(e)
                   else str(e))
    error(f"Could not change the backing file to '{name}': {msg}")
    raise CommandFailed()


async def cmd_rebase(argv: list[str]) -> int:
    opts, args = getopt_args(argv, "hf:F:b:upt:T:qU", ["help", "force-share"])
    fmt = base_fmt = base_name = None
    cache = src_cache = "writeback"
    unsafe = want_progress = quiet = share = False
    for o, v in opts:
        if o in ("-h", "--help"):
            print(__doc__)
            return 0
        if o == "-f":
            fmt = v
        elif o == "-F":
            base_fmt = v
        elif o == "-b":
            base_name = v
        elif o == "-u":
            unsafe = True
        elif o == "-p":
            want_progress = True
        elif o == "-t":
            cache = v
        elif o == "-T":
            src_cache = v
        elif o == "-q":
            quiet = True
        elif o in ("-U", "--force-share"):
            share = True
    if len(args) != 1:
        raise error_exit("Expecting one image file name")
    if not unsafe and base_name is None:
        raise error_exit("Must specify backing file (-b) or use unsafe mode (-u)")
    progress = Progress(Progress.wanted(want_progress, quiet), min_skip=2.0)
    progress.start()
    try:
        direct = cache_direct(cache)
        src_direct = cache_direct(src_cache, "source ")
        # -u: the old backing file is not opened (it may be gone: that is what -u is for)
        disk = await open_rw(args[0], fmt, direct, {"backing": None} if unsafe else None)
    except CommandFailed:
        progress.end()
        raise
    try:
        if base_fmt is not None and base_fmt not in FORMATS:
            error(f"Invalid format name: '{base_fmt}'")
            return 1
        top = disk.node
        if not unsafe:
            await _rebase_safe(disk, base_name or "", base_fmt, share, src_direct, progress)
        await change_backing_file(top, base_name or "", base_fmt)
    except CommandFailed as e:
        return e.code
    finally:
        progress.end()
        await disk.close()
    return 0


async def _rebase_safe(disk: api.AsyncDisk, name: str, fmt: str | None, share: bool,
                       direct: bool, progress: Progress) -> None:
    top = disk.node
    below = top.cow_child()
    old = BlockBackend(below.node, Perm.CONSISTENT_READ, PERM_ALL) if below else None
    new: BlockBackend | None = None
    try:
        prefix = None
        if name:
            new, prefix = await _open_new_backing(top, name, fmt, share, direct)
        await safe_copy(disk, old, new, prefix, progress)
    finally:
        for blk in (new, old):
            if blk is not None:
                await blk.close()
