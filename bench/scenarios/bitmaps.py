"""Dirty bitmaps of a 4 TiB disk: qblock daemon against qemu-storage-daemon (issue 6).

``bitmap-4t`` runs the same QMP script on a running ``qblock daemon`` and on a running
qemu-storage-daemon, the qcow2 image opened by blockdev-add and exported over NBD (untimed),
every step timed from outside over QMP:

1. ``add``: block-dirty-bitmap-add b0 and b1 (granularity 64 KiB, persistent);
2. ``mark``: fio's nbd engine writes N scattered 4 KiB blocks at 64 KiB-aligned offsets
   (seeded, so both sides mark the same granules) through the writable export, queue depth
   16, then one NBD flush; the writes go through the node, which marks both bitmaps;
3. ``merge``: block-dirty-bitmap-merge b0 into b1;
4. ``sha256``: x-debug-block-dirty-bitmap-sha256 of b0 and of b1; the scenario fails unless
   b0 and b1 hash alike and every run of either side gives the same hash;
5. ``store``: block-export-del (untimed), then blockdev-del of the node, which writes the
   persistent bitmaps into the qcow2 file.

Then, untimed, ``qemu-img info`` must list b0 and b1 and ``qemu-img check`` must find the image
clean; ``qemu-img bitmap --remove`` drops them so the next run starts alike.

The table's time is the bitmap operations only (add + merge + sha256 + store), its amount the
six QMP commands they take; marking is an NBD write path benchmark, not a bitmap one, so it is
timed apart and printed, with every step's medians and ratio, on stderr after the last round
(and kept in the JSON as each round's ``detail``).  The qblock side also marks 1M scattered
4 KiB writes in-process (``DirtyBitmap.set_ranges`` batched and ``set_range`` one by one, as the
request path does), merges and hashes: qblock-only rows, clearly labelled.

Scaling: the virtual disk is 4096 x ``--size`` (4 TiB at the default 1G), NBD writes 100k and
in-process writes 1M per GiB of ``--size`` (at least 1000).  The image is made sparse by
``qemu-img create -o cluster_size=64k``; setup then writes the same seeded blocks once through
qemu-storage-daemon (``cache.no-flush=on``, untimed; ~30 s and ~7 GiB of host file at 4 TiB),
so every timed run overwrites allocated clusters and does the same work.  Allocating in the
timed runs would measure qcow2 cluster allocation, not bitmaps: a scattered write into a fresh
4 TiB image mostly allocates an L2 table too, and QEMU flushes the host file for each, ~2.4 ms
(12 ms for the first thousand) per write.

The image is not fully mapped (``preallocation=metadata`` would make marking cheap without the
allocation pass): on such an image QEMU's store took seconds more, most likely its search for
free clusters, which scans refcounts from offset 0 after an open.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from qemu.qmp import QMPClient

from bench.daemon import TIMEOUT, with_daemon
from bench.scenario import Context, Measurement, Scenario, register

GIB = 1 << 30
GRANULARITY = 64 << 10
WRITE = 4 << 10
DISK_FACTOR = 4096
NBD_WRITES_PER_GIB = 100_000
LOCAL_WRITES_PER_GIB = 1_000_000
MIN_WRITES = 1000
QUEUE_DEPTH = 16
SEED = 6
NODE = "disk0"
BITMAPS = ("b0", "b1")
QMP_COMMANDS = 6  # add x2, merge, sha256 x2, blockdev-del
QMP_STEPS = ("add", "merge", "sha256", "store")


def _disk_size(ctx: Context) -> int:
    return DISK_FACTOR * ctx.size


def _writes(ctx: Context, per_gib: int) -> int:
    return max(MIN_WRITES, per_gib * ctx.size // GIB)


def _qemu_img(*args: str) -> str:
    res = subprocess.run(["qemu-img", *args], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"qemu-img {args[0]} failed ({res.returncode}): "
                           f"{(res.stdout + res.stderr).strip()[:2000]}")
    return res.stdout


# -- one QMP script, both daemons ---------------------------------------------------------------
async def _open_exported(client: QMPClient, image: Path, sock: Path, *,
                         no_flush: bool = False) -> None:
    await client.execute("blockdev-add", {
        "driver": "qcow2", "node-name": NODE,
        "file": {"driver": "file", "filename": str(image), "cache": {"no-flush": no_flush}}})
    await client.execute("nbd-server-start", {
        "addr": {"type": "unix", "data": {"path": str(sock)}}})  # SocketAddressLegacy
    await client.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": NODE,
                                              "writable": True})


async def _close_export(client: QMPClient) -> None:
    """block-export-del, wait for BLOCK_EXPORT_DELETED, stop the server."""
    client.events.clear()
    await client.execute("block-export-del", {"id": "e0"})

    async def deleted() -> None:
        while True:
            ev = await client.events.get()
            if ev["event"] == "BLOCK_EXPORT_DELETED" and ev["data"].get("id") == "e0":
                return
    await asyncio.wait_for(deleted(), TIMEOUT)
    await client.execute("nbd-server-stop")


async def _mark(sock: Path, writes: int) -> None:
    """fio's nbd engine: ``writes`` seeded 4 KiB writes at 64 KiB-aligned offsets, then one
    NBD flush, so the store step does not also write back the data."""
    proc = await asyncio.create_subprocess_exec(
        "fio", "--name=mark", "--ioengine=nbd", f"--uri=nbd+unix:///{NODE}?socket={sock}",
        "--rw=randwrite", f"--bs={WRITE}", f"--blockalign={GRANULARITY}", "--norandommap",
        f"--randseed={SEED}", f"--number_ios={writes}", f"--iodepth={QUEUE_DEPTH}",
        "--end_fsync=1", "--output-format=json", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    if proc.returncode:
        raise RuntimeError(f"fio failed ({proc.returncode}): {err.decode().strip()[:2000]}")
    text = out.decode()
    done = json.loads(text[text.index("{"):])["jobs"][0]["write"]["total_ios"]  # after banner
    if done != writes:
        raise RuntimeError(f"fio wrote {done} blocks, not {writes}")


async def _timed(step: Awaitable[Any]) -> float:
    start = time.perf_counter()
    await step
    return time.perf_counter() - start


async def _bitmap_script(client: QMPClient, image: Path, writes: int) -> dict[str, Any]:
    """The timed script: each step's seconds, and the bitmaps' sha256."""
    sockdir = Path(tempfile.mkdtemp(prefix="qb-bm-"))
    try:
        sock = sockdir / "nbd.sock"
        await _open_exported(client, image, sock)
        steps: dict[str, float] = {}

        async def add() -> None:
            for name in BITMAPS:
                await client.execute("block-dirty-bitmap-add", {
                    "node": NODE, "name": name, "granularity": GRANULARITY, "persistent": True})
        steps["add"] = await _timed(add())
        steps["mark"] = await _timed(_mark(sock, writes))
        steps["merge"] = await _timed(client.execute("block-dirty-bitmap-merge", {
            "node": NODE, "target": "b1", "bitmaps": ["b0"]}))
        hashes: list[str] = []

        async def sha256() -> None:
            for name in BITMAPS:
                res = await client.execute("x-debug-block-dirty-bitmap-sha256",
                                           {"node": NODE, "name": name})
                hashes.append(res["sha256"])
        steps["sha256"] = await _timed(sha256())
        await _close_export(client)
        steps["store"] = await _timed(client.execute("blockdev-del", {"node-name": NODE}))
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    if hashes[0] != hashes[1]:
        raise RuntimeError(f"b1 after merging b0 hashes {hashes[1]}, b0 {hashes[0]}")
    return {"steps": steps, "sha256": hashes[0]}


async def _allocate(client: QMPClient, image: Path, writes: int) -> None:
    """Setup's pass: the same writes without bitmaps, allocating their clusters; no flush
    (each new L2 table would cost a host flush), the image is closed cleanly all the same."""
    sockdir = Path(tempfile.mkdtemp(prefix="qb-bm-"))
    try:
        sock = sockdir / "nbd.sock"
        await _open_exported(client, image, sock, no_flush=True)
        await _mark(sock, writes)
        await _close_export(client)
        await client.execute("blockdev-del", {"node-name": NODE})
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def _verify_and_reset(image: Path) -> None:
    """Untimed: both bitmaps stored, the image clean; then drop them for the next run."""
    info = json.loads(_qemu_img("info", "--output=json", str(image)))
    stored = {b["name"]: b for b in info["format-specific"]["data"].get("bitmaps", [])}
    if set(stored) != set(BITMAPS) or any(b["granularity"] != GRANULARITY
                                          or "in-use" in b["flags"] for b in stored.values()):
        raise RuntimeError(f"qemu-img info lists bitmaps {list(stored.values())}")
    check = json.loads(_qemu_img("check", "--output=json", str(image)))
    if check.get("corruptions") or check.get("leaks") or check.get("check-errors"):
        raise RuntimeError(f"qemu-img check: {check}")
    for name in BITMAPS:
        _qemu_img("bitmap", "--remove", str(image), name)


# -- in-process (qblock only) -------------------------------------------------------------------
def _in_process(size: int, writes: int) -> dict[str, float]:
    """1M scattered 4 KiB writes marked on qblock's DirtyBitmap directly, then merge, sha256."""
    from qblock.block.dirty_bitmap import DirtyBitmap

    rng = np.random.default_rng(SEED)
    offsets = rng.integers(0, size // WRITE, writes, dtype=np.int64) * WRITE
    lengths = np.full(writes, WRITE, dtype=np.int64)
    out: dict[str, float] = {}
    start = time.perf_counter()
    b0, b1 = DirtyBitmap("b0", size, GRANULARITY), DirtyBitmap("b1", size, GRANULARITY)
    out["add"] = time.perf_counter() - start
    start = time.perf_counter()
    b0.set_ranges(offsets, lengths)
    out["mark batched"] = time.perf_counter() - start
    single = DirtyBitmap("s", size, GRANULARITY)
    start = time.perf_counter()
    for off in offsets.tolist():  # one call per request, as the request path marks them
        single.set_range(off, WRITE)
    out["mark one by one"] = time.perf_counter() - start
    start = time.perf_counter()
    b1.merge(b0)
    out["merge"] = time.perf_counter() - start
    start = time.perf_counter()
    digests = {b0.sha256(), b1.sha256()}
    out["sha256"] = time.perf_counter() - start
    if digests != {single.sha256()}:
        raise RuntimeError("in-process: batched, one-by-one and merged bitmaps differ")
    return out


# -- the scenario -------------------------------------------------------------------------------
def _setup(ctx: Context) -> None:
    ctx.dir.mkdir(parents=True, exist_ok=True)
    image = ctx.files["image"] = ctx.dir / "disk.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(image),
              str(_disk_size(ctx)))
    writes = _writes(ctx, NBD_WRITES_PER_GIB)
    asyncio.run(with_daemon("qemu", lambda c: _allocate(c, image, writes)))
    ctx.data["steps"] = {"qblock": [], "qemu": []}
    ctx.data["local"] = []


def _run(side: str) -> Callable[[Context], Measurement]:
    def run(ctx: Context) -> Measurement:
        image, writes = ctx.files["image"], _writes(ctx, NBD_WRITES_PER_GIB)
        result = asyncio.run(with_daemon(side, lambda c: _bitmap_script(c, image, writes)))[1]
        _verify_and_reset(image)
        digest = ctx.data.setdefault("sha256", result["sha256"])
        if result["sha256"] != digest:
            raise RuntimeError(f"{side}'s bitmap hashes {result['sha256']}, "
                               f"an earlier run's {digest}: the sides disagree")
        steps = result["steps"]
        ctx.data["steps"][side].append(steps)
        detail: dict[str, Any] = {"steps": steps, "nbd_writes": writes,
                                  "sha256": result["sha256"], "disk_size": _disk_size(ctx)}
        if side == "qblock":
            local = _in_process(_disk_size(ctx), _writes(ctx, LOCAL_WRITES_PER_GIB))
            ctx.data["local"].append(local)
            detail["in_process"] = local
        return Measurement(sum(steps[s] for s in QMP_STEPS), QMP_COMMANDS, invocations=0,
                           detail=detail)
    return run


def _median(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def _summary(ctx: Context) -> list[str]:
    """The per-step table: medians of each side, ratio QEMU/qblock, in-process rows."""
    q, e = ctx.data["steps"]["qblock"], ctx.data["steps"]["qemu"]
    nbd, local = _writes(ctx, NBD_WRITES_PER_GIB), _writes(ctx, LOCAL_WRITES_PER_GIB)
    disk = _disk_size(ctx)
    disk_label = f"{disk >> 40} TiB" if disk >= 1 << 40 else f"{disk >> 30} GiB"
    rows = [("step", "qblock s", "QEMU s", "QEMU/qblock")]
    labels = {"add": "add b0 + b1", "mark": f"mark {nbd:,} x 4 KiB NBD writes (fio qd16)",
              "merge": "merge b0 into b1", "sha256": "sha256 b0 + b1",
              "store": "store (blockdev-del)"}
    n = min(len(q), len(e))
    for key, label in labels.items():
        qs, es = _median(q[:n], key), _median(e[:n], key)
        rows.append((label, f"{qs:.4f}", f"{es:.4f}", f"{es / qs:.2f}"))
    qs = statistics.median(sum(r[s] for s in QMP_STEPS) for r in q[:n])
    es = statistics.median(sum(r[s] for s in QMP_STEPS) for r in e[:n])
    rows.append(("bitmap ops (add+merge+sha256+store)", f"{qs:.4f}", f"{es:.4f}",
                 f"{es / qs:.2f}"))
    qm, em = _median(q[:n], "mark") / nbd * 1e6, _median(e[:n], "mark") / nbd * 1e6
    rows.append(("mark per NBD write, us", f"{qm:.1f}", f"{em:.1f}", f"{em / qm:.2f}"))
    for key in ("add", "mark batched", "mark one by one", "merge", "sha256"):
        label = f"in-process {key}" + (f" {local:,} x 4 KiB" if "mark" in key else "")
        rows.append((f"{label} (qblock only)", f"{_median(ctx.data['local'], key):.4f}", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return [f"{ctx.dir.name}: {disk_label} disk, 64 KiB granularity, medians of {n} round(s), "
            "QMP steps timed from outside"] + [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _teardown(ctx: Context) -> None:
    """Print the per-step summary on stderr (when every side ran), then remove the files."""
    steps = ctx.data.get("steps", {})
    if steps.get("qblock") and steps.get("qemu") and ctx.data.get("local"):
        print("\n".join(_summary(ctx)), file=sys.stderr)
    shutil.rmtree(ctx.dir, ignore_errors=True)


if shutil.which("fio") and shutil.which("qemu-storage-daemon"):
    register(Scenario(
        name="bitmap-4t",
        description="4 TiB qcow2 (4096 x size), 64 KiB bitmaps: add b0+b1, merge, sha256, "
                    "store over QMP, qblock daemon vs qemu-storage-daemon (100k NBD writes "
                    "per GiB of size marked between, timed apart); IOPS = QMP commands/s",
        unit="IOPS", setup=_setup, run_qblock=_run("qblock"), run_qemu=_run("qemu"),
        teardown=_teardown))
