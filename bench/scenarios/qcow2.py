"""qcow2 images: qblock's qcow2 driver against QEMU's (issue 3).

Every image is made by QEMU's own tools, identically for both sides: ``qemu-img create -f qcow2
-o cluster_size=64k``, and where it must hold data, written in full by ``qemu-img bench -w -d 1``
(queue depth 1, so host clusters follow guest order) with a final flush.

- ``qcow2-seq-write``: 1 MiB sequential writes and one flush into a fresh, empty image.  The
  image is created again before every run of either side, so both sides allocate every cluster
  (L2 tables, refcount updates), not overwrite.
- ``qcow2-seq-read``: 1 MiB sequential reads of an image written in full.
- ``qcow2-rand-read-4k``: 4 KiB reads at seeded random 4 KiB-aligned offsets (the same list for
  both sides) of an image of 4 x ``--size`` written in full; 20000 reads per GiB of ``--size``.

The ``-imgbench`` variants of the sequential ones compare with ``qemu-img bench -d 1``, which
reuses one buffer like the qblock worker.  Nothing is dropped from the page cache (see README).
"""
from __future__ import annotations

import dataclasses
import random
import subprocess
from pathlib import Path

from bench.scenario import MIB, Context, Measurement, Runner, Scenario, register
from bench.workload import Op, io_scenario, sequential

CLUSTER_SIZE = 64 * 1024
CHUNK = MIB
WRITE_PATTERN = 0xA5
SETUP_PATTERN = 0x5A
GIB = 1 << 30
RANDOM_BLOCK = 4096
RANDOM_IMAGE_FACTOR = 4  # 4 GiB image at the default --size 1G
RANDOM_READS_PER_GIB = 20000
RANDOM_SEED = 3


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdin=subprocess.DEVNULL,
                   capture_output=True, text=True)


def create_empty(image: Path, size: int) -> None:
    """A fresh qcow2 image with no cluster allocated (any previous file is replaced)."""
    image.unlink(missing_ok=True)
    _qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER_SIZE}",
              str(image), str(size))


def create_filled(image: Path, size: int) -> None:
    """A qcow2 image whose every cluster is allocated and holds SETUP_PATTERN, flushed to disk."""
    if size % CHUNK:
        raise ValueError(f"image size {size} is not a multiple of {CHUNK}")
    create_empty(image, size)
    count = size // CHUNK
    _qemu_img("bench", "-q", "-f", "qcow2", "-t", "writeback", "-w", "-d", "1", "-s", str(CHUNK),
              "-c", str(count), f"--pattern={SETUP_PATTERN}", f"--flush-interval={count}",
              str(image))


def _create_filled_random(image: Path, size: int) -> None:
    create_filled(image, RANDOM_IMAGE_FACTOR * size)


def _writes(size: int) -> list[Op]:
    return sequential("write", size, CHUNK, WRITE_PATTERN) + [("flush", 0, 0, 0)]


def _reads(size: int) -> list[Op]:
    return sequential("read", size, CHUNK)


def random_reads(size: int) -> list[Op]:
    """Seeded 4 KiB reads at aligned offsets of the 4 x ``size`` image, 20000 per GiB of size."""
    count = max(1, RANDOM_READS_PER_GIB * size // GIB)
    blocks = RANDOM_IMAGE_FACTOR * size // RANDOM_BLOCK
    rng = random.Random(RANDOM_SEED)
    return [("read", rng.randrange(blocks) * RANDOM_BLOCK, RANDOM_BLOCK, 0) for _ in range(count)]


def _fresh_before(run: Runner) -> Runner:
    """Recreate the empty image (untimed) right before a timed run, so every run allocates."""
    def fresh_run(ctx: Context) -> Measurement:
        create_empty(ctx.files["image"], ctx.size)
        return run(ctx)
    return fresh_run


def _allocating(scenario: Scenario) -> Scenario:
    return dataclasses.replace(scenario, run_qblock=_fresh_before(scenario.run_qblock),
                               run_qemu=_fresh_before(scenario.run_qemu))


for suffix, tool in (("", "qemu-io"), ("-imgbench", "qemu-img-bench")):
    versus = "qemu-io -f qcow2" if tool == "qemu-io" else "qemu-img bench -f qcow2 -d 1"
    register(_allocating(io_scenario(
        f"qcow2-seq-write{suffix}",
        f"sequential 1 MiB writes into a fresh empty qcow2 image, then one flush (vs {versus})",
        fmt="qcow2", prepare=create_empty, make_ops=_writes, qemu_tool=tool,
    )))
    register(io_scenario(
        f"qcow2-seq-read{suffix}",
        f"sequential 1 MiB reads of a qcow2 image written in full (vs {versus})",
        fmt="qcow2", prepare=create_filled, make_ops=_reads, read_only=True, qemu_tool=tool,
    ))

register(io_scenario(
    "qcow2-rand-read-4k",
    "4 KiB reads at random aligned offsets of a qcow2 image 4x --size written in full "
    "(vs qemu-io -f qcow2)",
    fmt="qcow2", prepare=_create_filled_random, make_ops=random_reads, read_only=True,
    unit="IOPS",
))
