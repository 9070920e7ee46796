"""Commit: qblock's block-commit against ``qemu-img commit`` and qemu-storage-daemon (issue 5).

Setup makes, with QEMU's tools, a qcow2 base of ``--size`` written in full (0x11) and a qcow2
overlay on it written in full (0x22), both 64k clusters, written by ``qemu-img bench -w -d 1``.
Every cluster of the base is allocated from the start, so no round pays allocation; each
commit copies the whole overlay into the base, and the overlay stays as it is (``-d``), so
every round does the same work.  Throughput counts the guest size.

- ``commit-1g``: one whole process each.  QEMU: ``qemu-img commit -d OVERLAY`` (an active
  commit inside qemu-img).  qblock's side is the block-commit job of a ``qblock daemon``
  process driven over QMP (``img-commit-1g`` in img_chain.py times ``qblock img commit``):
  blockdev-add the chain, block-commit on the overlay, wait BLOCK_JOB_READY, job-complete,
  wait BLOCK_JOB_COMPLETED, quit; timed from spawning the daemon to its exit.  Start-up is
  the same process doing everything but the commit (for QEMU, ``qemu-img commit -d`` of an
  empty 1 MiB overlay on an empty base).
- ``active-commit-1g``: a running ``qblock daemon`` against a running qemu-storage-daemon, each
  with the chain opened (untimed); timed from sending block-commit on the active layer to the
  BLOCK_JOB_COMPLETED event (READY, then job-complete, in between).  No start-up to subtract.
"""
from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from bench.daemon import TIMEOUT, with_daemon
from bench.scenario import MIB, Context, Measurement, Scenario, register
from bench.workload import timed


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdin=subprocess.DEVNULL,
                   capture_output=True, text=True)


def _fill(image: Path, size: int, pattern: int) -> None:
    _qemu_img("bench", "-q", "-f", "qcow2", "-t", "writeback", "-w", "-d", "1", "-s", str(MIB),
              "-c", str(max(1, size // MIB)), f"--pattern={pattern}", str(image))


def _chain(base: Path, top: Path, size: int, fill: bool) -> None:
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(base), str(size))
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", str(base),
              "-F", "qcow2", str(top))
    if fill:
        _fill(base, size, 0x11)
        _fill(top, size, 0x22)


def _setup(ctx: Context) -> None:
    ctx.dir.mkdir(parents=True, exist_ok=True)
    files = {name: ctx.dir / f"{name}.qcow2" for name in ("base", "top", "ebase", "etop")}
    _chain(files["base"], files["top"], ctx.size, True)
    _chain(files["ebase"], files["etop"], MIB, False)
    ctx.files.update(files)


async def _open_chain(client: QMPClient, base: Path, top: Path) -> None:
    await client.execute("blockdev-add", {
        "driver": "qcow2", "node-name": "base0",
        "file": {"driver": "file", "filename": str(base)}})
    await client.execute("blockdev-add", {
        "driver": "qcow2", "node-name": "top0", "backing": "base0",
        "file": {"driver": "file", "filename": str(top)}})


async def _until(client: QMPClient, event: str) -> dict[str, Any]:
    async def wait() -> dict[str, Any]:
        while True:
            ev = await client.events.get()
            if ev["event"] == event and ev.get("data", {}).get("device") == "job0":
                return dict(ev.get("data", {}))
            if ev["event"] in ("BLOCK_JOB_ERROR", "BLOCK_JOB_CANCELLED"):
                raise RuntimeError(f"commit failed: {ev}")
    return await asyncio.wait_for(wait(), TIMEOUT)


async def _active_commit(client: QMPClient) -> float:
    """block-commit on top0, READY, job-complete, COMPLETED; seconds from command to event."""
    client.events.clear()
    start = time.perf_counter()
    await client.execute("block-commit", {"device": "top0", "job-id": "job0"})
    await _until(client, "BLOCK_JOB_READY")
    await client.execute("job-complete", {"id": "job0"})
    done = await _until(client, "BLOCK_JOB_COMPLETED")
    elapsed = time.perf_counter() - start
    if "error" in done or done.get("offset") != done.get("len"):
        raise RuntimeError(f"commit did not complete: {done}")
    return elapsed


# -- commit-1g ----------------------------------------------------------------------------------
def _commit_process(side: str, ctx: Context, base_key: str, top_key: str, work: bool) -> float:
    """Wall time of one whole process committing (``work``) or just opening the chain."""
    base, top = ctx.files[base_key], ctx.files[top_key]
    if side == "qemu":
        return timed(["qemu-img", "commit", "-q", "-d", "-f", "qcow2", str(top)])[0]

    async def script(client: QMPClient) -> None:
        await _open_chain(client, base, top)
        if work:
            await _active_commit(client)

    return asyncio.run(with_daemon("qblock", script))[0]


def _commit_scenario() -> Scenario:
    def run(side: str) -> Callable[[Context], Measurement]:
        return lambda ctx: Measurement(_commit_process(side, ctx, "base", "top", True),
                                       ctx.size, detail={"bytes": ctx.size})

    def startup(side: str) -> Callable[[Context], float]:
        return lambda ctx: _commit_process(side, ctx, "ebase", "etop", False)

    return Scenario(
        name="commit-1g",
        description="commit a fully written qcow2 overlay into its base (qblock daemon "
                    "block-commit over QMP vs qemu-img commit -d)",
        unit="MiB/s", setup=_setup, run_qblock=run("qblock"), run_qemu=run("qemu"),
        startup_qblock=startup("qblock"), startup_qemu=startup("qemu"))


# -- active-commit-1g ----------------------------------------------------------------------------
def _active_commit_run(side: str, ctx: Context) -> Measurement:
    """Start the daemon and open the chain (untimed), then time the active commit."""
    async def script(client: QMPClient) -> float:
        await _open_chain(client, ctx.files["base"], ctx.files["top"])
        return await _active_commit(client)

    seconds = asyncio.run(with_daemon(side, script))[1]
    return Measurement(seconds, ctx.size, detail={"bytes": ctx.size})


register(_commit_scenario())
register(Scenario(
    name="active-commit-1g",
    description="active commit of a fully written overlay, block-commit to "
                "BLOCK_JOB_COMPLETED (qblock daemon vs qemu-storage-daemon)",
    unit="MiB/s", setup=_setup,
    run_qblock=lambda ctx: _active_commit_run("qblock", ctx),
    run_qemu=lambda ctx: _active_commit_run("qemu", ctx)))
