"""qemu-img convert: ``qblock img convert`` against ``qemu-img convert`` (issue 8).

The source is a qcow2 image of ``--size`` (64k clusters) with every other MiB written by
``qemu-img bench -w -s 1M -S 2M`` (so half allocated, holes in between); each run converts it
to a fresh target (the previous one is removed, untimed).  Throughput counts the guest size.

- ``convert-qcow2-to-qcow2``: ``convert -O qcow2`` (holes stay unallocated).
- ``convert-qcow2-to-raw``: ``convert -O raw`` (holes stay sparse).
- ``convert-compressed-1g``: ``convert -c -O qcow2`` of a raw image of ``--size`` written in
  full with compressible but not trivial data (text of random words: each 64 KiB cluster
  deflates to about 60 %); run it at ``--size 1G``, the size of issue 8.

Start-up is the same command converting an empty 1 MiB qcow2 image.  The two uncompressed
scenarios settle before each timed run (sync, 3 s pause, the source read through again, --size
of free memory backed), after one untimed run of each side: see
bench/README.md, "Settling", "Backed memory" and "Warm-up".
"""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.scenario import MIB, Context, Measurement, Runner, Scenario, StartupRunner, register
from bench.workload import timed, worker_env

PATTERN = 0x5A
# Each run writes GiBs of new page cache and the previous run's deleted target freed as much:
# back to back, runs alternate between fast and slow whatever the tool, and the source may be
# partly dropped from the cache meanwhile (README, "Settling").
SETTLE = 3.0
# ... and each run's page cache then grows in memory the host backs (README, "Backed
# memory"): as much as --size, twice what a target of the half-allocated source takes.
BACK_MEMORY = 1.0


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


def _text_block(size: int, seed: int = 8) -> bytes:
    """``size`` bytes of text: random words of 2-9 letters from a vocabulary of 4096."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 10, 4096)
    letters = rng.integers(ord("a"), ord("z") + 1, int(lengths.sum()), dtype=np.uint8).tobytes()
    bounds = np.concatenate(([0], np.cumsum(lengths))).tolist()
    vocab = [letters[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    words = rng.integers(0, len(vocab), size // 3)
    text = b" ".join(vocab[w] for w in words.tolist())
    while len(text) < size:
        text += b" " + text
    return text[:size]


def _setup_compressed(ctx: Context) -> None:
    """A raw source written in full with text; 8 MiB of it repeated (clusters compress alone)."""
    ctx.dir.mkdir(parents=True, exist_ok=True)
    src, empty = ctx.dir / "src.raw", ctx.dir / "empty.qcow2"
    block = memoryview(_text_block(8 * MIB))
    with open(src, "wb") as f:
        for off in range(0, ctx.size, len(block)):
            f.write(block[:ctx.size - off])
    _qemu_img("create", "-q", "-f", "qcow2", str(empty), str(MIB))
    ctx.files.update(src=src, empty=empty)


def _argv(side: str, args: list[str], src: Path, dst: Path) -> list[str]:
    tool = ["qemu-img"] if side == "qemu" else [sys.executable, "-m", "qblock.cli.main", "img"]
    return [*tool, "convert", *args, str(src), str(dst)]


def _run(side: str, args: list[str], src_key: str, ctx: Context) -> float:
    """One timed convert into a fresh target, removed afterwards."""
    dst = ctx.dir / f"{side}.out"
    dst.unlink(missing_ok=True)
    env = worker_env() if side == "qblock" else None
    seconds, _ = timed(_argv(side, args, ctx.files[src_key], dst), env=env)
    dst.unlink()
    return seconds


def _scenario(name: str, description: str, args: list[str],
              setup: Callable[[Context], None], settle: float = 0.0,
              back_memory: float = 0.0) -> Scenario:
    def run(side: str) -> Runner:
        return lambda ctx: Measurement(_run(side, args, "src", ctx), ctx.size,
                                       detail={"bytes": ctx.size})

    def startup(side: str) -> StartupRunner:
        return lambda ctx: _run(side, args, "empty", ctx)

    return Scenario(
        name=name, description=description, unit="MiB/s", setup=setup,
        run_qblock=run("qblock"), run_qemu=run("qemu"),
        startup_qblock=startup("qblock"), startup_qemu=startup("qemu"), settle=settle,
        back_memory=back_memory)


for _fmt in ("qcow2", "raw"):
    register(_scenario(f"convert-qcow2-to-{_fmt}",
                       f"convert a half-allocated qcow2 image to {_fmt} (vs qemu-img convert)",
                       ["-O", _fmt], _setup, settle=SETTLE, back_memory=BACK_MEMORY))
register(_scenario("convert-compressed-1g",
                   "convert -c a raw image of text to compressed qcow2 (vs qemu-img convert)",
                   ["-c", "-O", "qcow2"], _setup_compressed))
