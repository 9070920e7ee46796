"""Sequential 1 MiB requests over a raw image: qblock's raw/file path against QEMU's.

Both sides overwrite or read a fully allocated file (setup writes every byte and syncs it), so
no round pays for block allocation.  Reads run on that just-written file: nothing is dropped
from the page cache (that needs root), so both sides read cached pages alike.

``raw-seq-*`` compare with ``qemu-io -f raw`` (one command per request; qemu-io allocates and
fills a fresh buffer for each).  ``raw-seq-*-imgbench`` run the same requests against
``qemu-img bench -d 1``, which reuses one buffer like the qblock worker: the closer measure of
QEMU's own data path.
"""
from __future__ import annotations

from pathlib import Path

from bench.scenario import MIB, register
from bench.workload import Op, fill_raw, io_scenario, sequential

CHUNK = MIB
WRITE_PATTERN = 0xA5
SETUP_PATTERN = 0x5A


def _prepare(image: Path, size: int) -> None:
    fill_raw(image, size, SETUP_PATTERN)


def _writes(size: int) -> list[Op]:
    return sequential("write", size, CHUNK, WRITE_PATTERN) + [("flush", 0, 0, 0)]


def _reads(size: int) -> list[Op]:
    return sequential("read", size, CHUNK)


for suffix, tool in (("", "qemu-io"), ("-imgbench", "qemu-img-bench")):
    versus = "qemu-io -f raw" if tool == "qemu-io" else "qemu-img bench -d 1"
    register(io_scenario(
        f"raw-seq-write{suffix}",
        f"sequential 1 MiB writes over a raw image, then one flush (vs {versus})",
        prepare=_prepare, make_ops=_writes, qemu_tool=tool,
    ))
    register(io_scenario(
        f"raw-seq-read{suffix}",
        f"sequential 1 MiB reads of a raw image just written in full (vs {versus})",
        prepare=_prepare, make_ops=_reads, read_only=True, qemu_tool=tool,
    ))
