"""qemu-img convert: ``qblock img convert`` against ``qemu-img convert`` (issue 8).

The source is a qcow2 image of ``--size`` (64k clusters) with every other MiB written by
``qemu-img bench -w -s 1M -S 2M`` (so half allocated, holes in between); each run converts it
to a fresh target (the previous one is removed, untimed).  Throughput counts the guest size.

- ``convert-qcow2-to-qcow2``: ``convert -O qcow2`` (holes stay unallocated).
- ``convert-qcow2-to-raw``: ``convert -O raw`` (holes stay sparse).

Start-up is the same command converting an empty 1 MiB qcow2 image.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.scenario import MIB, Context, Measurement, Runner, Scenario, StartupRunner, register
from bench.workload import timed, worker_env

PATTERN = 0x5A


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdin=subprocess.DEVNULL,
                   capture_output=True, text=True)


def _setup(ctx: Context) -> None:
    ctx.dir.mkdir(parents=True, exist_ok=True)
    src, empty = ctx.dir / "src.qcow2", ctx.dir / "empty.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(src), str(ctx.size))
    count = max(1, ctx.size // (2 * MIB))
    _qemu_img("bench", "-q", "-f", "qcow2", "-t", "writeback", "-w", "-d", "1", "-s", str(MIB),
              "-S", str(2 * MIB), "-c", str(count), f"--pattern={PATTERN}", str(src))
    _qemu_img("create", "-q", "-f", "qcow2", str(empty), str(MIB))
    ctx.files.update(src=src, empty=empty)


def _argv(side: str, fmt: str, src: Path, dst: Path) -> list[str]:
    tool = ["qemu-img"] if side == "qemu" else [sys.executable, "-m", "qblock.cli.main", "img"]
    return [*tool, "convert", "-O", fmt, str(src), str(dst)]


def _run(side: str, fmt: str, src_key: str, ctx: Context) -> float:
    """One timed convert into a fresh target, removed afterwards."""
    dst = ctx.dir / f"{side}.{fmt}"
    dst.unlink(missing_ok=True)
    env = worker_env() if side == "qblock" else None
    seconds, _ = timed(_argv(side, fmt, ctx.files[src_key], dst), env=env)
    dst.unlink()
    return seconds


def _scenario(fmt: str) -> Scenario:
    def run(side: str) -> Runner:
        return lambda ctx: Measurement(_run(side, fmt, "src", ctx), ctx.size,
                                       detail={"bytes": ctx.size})

    def startup(side: str) -> StartupRunner:
        return lambda ctx: _run(side, fmt, "empty", ctx)

    return Scenario(
        name=f"convert-qcow2-to-{fmt}",
        description=f"convert a half-allocated qcow2 image to {fmt} (vs qemu-img convert)",
        unit="MiB/s", setup=_setup, run_qblock=run("qblock"), run_qemu=run("qemu"),
        startup_qblock=startup("qblock"), startup_qemu=startup("qemu"))


register(_scenario("qcow2"))
register(_scenario("raw"))
