"""qemu-img bench: ``qblock img bench`` against ``qemu-img bench`` (issue 8).

- ``img-bench-4k``: 75000 reads of 4 KiB (qemu-img bench's default count; fewer when the
  image holds fewer 4 KiB blocks), 16 in flight, sequential from offset 0, on a qcow2 image of
  ``--size`` (64k clusters) written in full beforehand; ``-t writeback``.  Run it at
  ``--size 1G``, the size of issue 8.

Start-up is the same command with ``-c 0`` on an empty 1 MiB qcow2 image.
"""
from __future__ import annotations

import subprocess
import sys

from bench.scenario import MIB, Context, Measurement, Runner, Scenario, StartupRunner, register
from bench.workload import timed, worker_env

COUNT = 75000  # qemu-img bench's default
ARGS = ["-f", "qcow2", "-t", "writeback", "-d", "16", "-s", "4k"]


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdin=subprocess.DEVNULL,
                   capture_output=True, text=True)


def _setup(ctx: Context) -> None:
    ctx.dir.mkdir(parents=True, exist_ok=True)
    image, empty = ctx.dir / "image.qcow2", ctx.dir / "empty.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(image), str(ctx.size))
    _qemu_img("bench", "-q", "-f", "qcow2", "-t", "writeback", "-w", "-d", "4", "-s", str(MIB),
              "-c", str(max(1, ctx.size // MIB)), "--pattern=0x5a", str(image))
    _qemu_img("create", "-q", "-f", "qcow2", str(empty), str(MIB))
    ctx.files.update(image=image, empty=empty)


def _run(side: str, count: int, key: str, ctx: Context) -> float:
    tool = ["qemu-img"] if side == "qemu" else [sys.executable, "-m", "qblock.cli.main", "img"]
    argv = [*tool, "bench", *ARGS, "-c", str(count), str(ctx.files[key])]
    seconds, _ = timed(argv, env=worker_env() if side == "qblock" else None)
    return seconds


def _runner(side: str) -> Runner:
    def run(ctx: Context) -> Measurement:
        count = min(COUNT, ctx.size // 4096)
        return Measurement(_run(side, count, "image", ctx), count, detail={"requests": count})

    return run


def _startup(side: str) -> StartupRunner:
    return lambda ctx: _run(side, 0, "empty", ctx)


register(Scenario(
    name="img-bench-4k",
    description="qemu-img bench: 4 KiB reads, depth 16, on a fully written qcow2 "
                "(vs qemu-img bench)",
    unit="IOPS", setup=_setup, run_qblock=_runner("qblock"), run_qemu=_runner("qemu"),
    startup_qblock=_startup("qblock"), startup_qemu=_startup("qemu")))
