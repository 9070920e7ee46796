"""qemu-img commit and rebase: ``qblock img commit|rebase`` against qemu-img (issue 8).

Images are made by QEMU's tools, qcow2 with 64k clusters, written by ``qemu-img bench -w -d 1``
(host clusters in guest order).  Throughput counts the guest size.

- ``img-commit-1g``: ``commit -d OVERLAY`` of an overlay written in full (0x22) into a base
  written in full (0x11).  With ``-d`` the overlay stays as it is and every cluster of the base
  is allocated from the start, so every round does the same work (a full copy).
- ``img-rebase-1g``: safe ``rebase -b B -F qcow2 OVERLAY`` from base A (written in full, 0x11)
  to base B (0x11, with every other cluster 0x33: half the clusters differ).  The overlay has
  every other MiB written (0x22), so half the disk is compared and a quarter written.  The
  overlay is copied from a pristine one (untimed) before every run of either side.

Start-up is the same command on empty 1 MiB images (commit -d of an empty overlay, rebase of an
empty overlay between two empty bases).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from bench.scenario import MIB, Context, Scenario, command_scenario, register
from bench.workload import timed, worker_env

CLUSTER = 64 * 1024


def _qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, stdin=subprocess.DEVNULL,
                   capture_output=True, text=True)


def _create(path: Path, size: int, backing: Path | None = None) -> None:
    extra = ["-b", str(backing), "-F", "qcow2"] if backing is not None else []
    _qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", *extra, path,
              str(size))


def _fill(path: Path, size: int, pattern: int, step: int, stride: int) -> None:
    """qemu-img bench writes of ``step`` bytes every ``stride`` bytes."""
    _qemu_img("bench", "-q", "-f", "qcow2", "-t", "writeback", "-w", "-d", "1", "-s", str(step),
              "-S", str(stride), "-c", str(max(1, size // stride)), f"--pattern={pattern}", path)


def _tool(side: str) -> list[str]:
    return ["qemu-img"] if side == "qemu" else [sys.executable, "-m", "qblock.cli.main", "img"]


def _env(side: str) -> dict[str, str] | None:
    return worker_env() if side == "qblock" else None


# -- img-commit-1g ------------------------------------------------------------------------------
def _commit_setup(ctx: Context) -> None:
    ctx.dir.mkdir(parents=True, exist_ok=True)
    files = {name: ctx.dir / f"{name}.qcow2" for name in ("base", "top", "ebase", "etop")}
    _create(files["base"], ctx.size)
    _create(files["top"], ctx.size, files["base"])
    _fill(files["base"], ctx.size, 0x11, MIB, MIB)
    _fill(files["top"], ctx.size, 0x22, MIB, MIB)
    _create(files["ebase"], MIB)
    _create(files["etop"], MIB, files["ebase"])
    ctx.files.update(files)


def _commit(side: str, ctx: Context, top_key: str) -> float:
    return timed([*_tool(side), "commit", "-q", "-d", "-f", "qcow2", str(ctx.files[top_key])],
                 env=_env(side))[0]


def _commit_scenario() -> Scenario:
    return command_scenario(
        "img-commit-1g",
        "commit -d a fully written qcow2 overlay into its written base "
        "(qblock img commit vs qemu-img commit)",
        setup=_commit_setup, run=lambda side, ctx: _commit(side, ctx, "top"),
        startup=lambda side, ctx: _commit(side, ctx, "etop"))


# -- img-rebase-1g ------------------------------------------------------------------------------
def _rebase_setup(ctx: Context) -> None:
    ctx.dir.mkdir(parents=True, exist_ok=True)
    names = ("a", "b", "pristine", "ea", "eb", "epristine")
    files = {name: ctx.dir / f"{name}.qcow2" for name in names}
    for name in ("a", "b"):
        _create(files[name], ctx.size)
        _fill(files[name], ctx.size, 0x11, MIB, MIB)
    _fill(files["b"], ctx.size, 0x33, CLUSTER, 2 * CLUSTER)
    _create(files["pristine"], ctx.size, files["a"])
    _fill(files["pristine"], ctx.size, 0x22, MIB, 2 * MIB)
    _create(files["ea"], MIB)
    _create(files["eb"], MIB)
    _create(files["epristine"], MIB, files["ea"])
    ctx.files.update(files)


def _rebase(side: str, ctx: Context, prefix: str) -> float:
    """Copy the pristine overlay (untimed), then time the safe rebase from A to B."""
    work = ctx.dir / f"{prefix}work-{side}.qcow2"
    shutil.copyfile(ctx.files[f"{prefix}pristine"], work)
    seconds = timed([*_tool(side), "rebase", "-q", "-f", "qcow2", "-b",
                     str(ctx.files[f"{prefix}b"]), "-F", "qcow2", str(work)], env=_env(side))[0]
    work.unlink()
    return seconds


def _rebase_scenario() -> Scenario:
    return command_scenario(
        "img-rebase-1g",
        "safe rebase of a half-written overlay between bases differing in half the clusters "
        "(qblock img rebase vs qemu-img rebase)",
        setup=_rebase_setup, run=lambda side, ctx: _rebase(side, ctx, ""),
        startup=lambda side, ctx: _rebase(side, ctx, "e"))


register(_commit_scenario())
register(_rebase_scenario())
