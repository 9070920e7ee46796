"""``qblock img commit``: qemu-img commit (qemu-img.c img_commit, QEMU 7.2).

Like qemu-img, the copy is an active commit job (qblock.jobs.mirror.ActiveCommitJob) driven
until READY and then completed; ``-p`` follows the job's progress.  Without ``-d`` (and without
``-b``, which implies it) the top image is emptied afterwards (bdrv_make_empty).
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

from qblock import api
from qblock.block.backend import BlockBackend
from qblock.block.node import BlockNode
from qblock.block.open import open_node
from qblock.block.perm import PERM_ALL, PERM_NONE, Perm
from qblock.block.qapi import path_combine
from qblock.cli import imgfmt
from qblock.cli.img import _probe
from qblock.cli.imgerr import CommandFailed, error, error_exit, getopt_args
from qblock.cli.imgprogress import Progress
from qblock.errors import QBlockError
from qblock.jobs.mirror import ActiveCommitJob

# block.c bdrv_parse_cache_mode()
CACHE_MODES = {"none": True, "off": True, "writeback": False, "writethrough": False,
               "directsync": True, "unsafe": False}
POLL_INTERVAL = 0.1
FORMATS = ("raw", "qcow2")  # the format drivers qblock has (bdrv_find_format)


def cache_direct(mode: str, what: str = "") -> bool:
    """bdrv_parse_cache_mode(): O_DIRECT or not; an unknown mode ends the command."""
    if mode not in CACHE_MODES:
        error(f"Invalid {what}cache option: {mode}")
        raise CommandFailed()
    return CACHE_MODES[mode]


async def open_rw(filename: str, fmt: str | None, direct: bool,
                  options: dict[str, Any] | None = None) -> api.AsyncDisk:
    """img_open() for writing: "Could not open 'FILE': ..." on failure."""
    if fmt is not None and fmt not in FORMATS:
        error(f"Could not open '{filename}': Unknown driver '{fmt}'")
        raise CommandFailed()
    fmt = _probe(filename, fmt)
    opts = api.image_options(filename, driver=fmt, cache_direct=direct)
    opts.update(options or {})
    try:
        node = await open_node(opts, implicit=True)
    except QBlockError as e:
        error(f"Could not open '{filename}': {e}")
        raise CommandFailed() from None
    # blk_new_open() without BDRV_O_RESIZE: read and write, everything shared
    return api.AsyncDisk(BlockBackend(node, Perm.CONSISTENT_READ | Perm.WRITE, PERM_ALL))


def find_backing_image(top: BlockNode, name: str) -> BlockNode | None:
    """block.c bdrv_find_backing_image(): ``name`` relative to each overlay, by real path."""
    curr = top
    while (edge := curr.cow_child()) is not None:
        wanted = os.path.realpath(path_combine(curr.filename, name))
        if wanted == os.path.realpath(edge.node.filename):
            return edge.node
        curr = edge.node
    return None


class _Events:
    """The job's event sink: wakes the driver loop on READY and on completion."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()

    def emit(self, name: str, data: dict[str, Any]) -> None:
        self.changed.set()


def start_commit(top: BlockNode, base: BlockNode, speed: int) -> tuple[ActiveCommitJob,
                                                                        _Events]:
    """commit_active_start(): the job, with its filter already above ``top``."""
    events = _Events()
    return ActiveCommitJob("commit", {}, events, top, base, speed=speed), events


async def run_block_job(job: ActiveCommitJob, events: _Events, progress: Progress) -> None:
    """qemu-img.c run_block_job(): until READY, then complete and wait; raise on failure."""
    job.start()
    while not job.is_ready() and not job.is_completed():
        events.changed.clear()
        try:
            await asyncio.wait_for(events.changed.wait(), POLL_INTERVAL)
        except asyncio.TimeoutError:
            pass
        progress.fraction(job.progress_current, job.progress_total)
    if not job.is_completed():
        job.complete()
    await job.wait()
    if job.error is not None:
        raise QBlockError(f"Block job failed: {job.error}")
    progress.set(100.0)


async def cmd_commit(argv: list[str]) -> int:
    opts, args = getopt_args(argv, "f:ht:b:dpqr:", ["help"])
    fmt, cache, base_name = None, "writeback", None
    drop = want_progress = quiet = False
    rate_limit = 0
    for o, v in opts:
        if o in ("-h", "--help"):
            print(__doc__)
            return 0
        if o == "-f":
            fmt = v
        elif o == "-t":
            cache = v
        elif o == "-b":
            base_name, drop = v, True  # -b implies -d
        elif o == "-d":
            drop = True
        elif o == "-p":
            want_progress = True
        elif o == "-q":
            quiet = True
        elif o == "-r":
            try:
                rate_limit = imgfmt.parse_size(v)
            except (ValueError, OverflowError):
                error("Invalid rate limit specified. You may use k, M, G, T, P or E suffixes "
                      "for")
                error("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
                return 1
    if len(args) != 1:
        raise error_exit("Expecting one image file name")
    filename = args[0]
    direct = cache_direct(cache)
    disk = await open_rw(filename, fmt, direct)
    progress = Progress(Progress.wanted(want_progress, quiet))
    progress.start()
    holder: BlockBackend | None = None
    try:
        top = disk.node
        if base_name is not None:
            base = find_backing_image(top, base_name)
            if base is None:
                raise QBlockError(f"Did not find '{base_name}' in the backing chain of "
                                  f"'{filename}'")
        else:
            edge = top.cow_child()
            if edge is None:
                raise QBlockError("Image does not have a backing file")
            base = edge.node
        job, events = start_commit(top, base, rate_limit)
        if not drop:
            # the job moves top's users onto base; this one, added after, keeps top open
            holder = BlockBackend(top, PERM_NONE, PERM_ALL)
        await run_block_job(job, events, progress)
        if holder is not None:
            await _make_empty(holder, top)
    except QBlockError as e:
        progress.end()
        error(str(e))
        return 1
    finally:
        if holder is not None and holder.root is not None:
            await holder.close()
        await disk.close()
    progress.end()
    if not quiet:
        print("Image committed.")
    return 0


async def _make_empty(holder: BlockBackend, top: BlockNode) -> None:
    """blk_make_empty() through a writer of top; formats without it are left as they are."""
    writer = BlockBackend(top, Perm.WRITE, PERM_ALL)
    await holder.close()
    try:
        make_empty = getattr(top.drv, "make_empty", None)
        if make_empty is not None:  # -ENOTSUP is ignored by qemu-img
            await make_empty()
            await writer.flush()
    finally:
        await writer.close()
