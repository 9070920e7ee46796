"""blockdev-backup and transaction: ``qblock daemon`` against the real qemu-storage-daemon 7.2,
the same QMP script on each (qemu.qmp's QMPClient), each on its own copy of the images.

Compared: every reply (errors by class and text), the events of the jobs in order with their
data, the graph while a sync=none backup runs (copy-before-write filter with its edges and
permissions), query-block-jobs, the named dirty bitmaps after each transaction; afterwards the
backups must equal their source (qemu-img compare) and be clean (qemu-img check).
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from daemon_tools import graph_shape, on_both_daemons

qmp = pytest.importorskip("qemu.qmp")
pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None
                                or shutil.which("qemu-img") is None,
                                reason="qemu-storage-daemon and qemu-img are needed")
TIMEOUT = 30
SIZE = "4M"


def make_images(d: Path) -> None:
    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=TIMEOUT)

    for name in ("src", "full", "inc", "none", "big"):
        run("qemu-img", "create", "-f", "qcow2", str(d / f"{name}.qcow2"),
            "8M" if name == "big" else SIZE)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 2M 512k",
        str(d / "src.qcow2"))


def backup(job: str, target: str, sync: str, **extra: Any) -> dict[str, Any]:
    return {"job-id": job, "device": "src", "target": target, "sync": sync, **extra}


def action(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


def failing_requests(d: Path) -> list[tuple[str, dict[str, Any]]]:
    add_b1 = action("block-dirty-bitmap-add", node="src", name="b1")
    snap = action("blockdev-snapshot-sync", **{"node-name": "src", "snapshot-node-name": "s1",
                                                "snapshot-file": str(d / "s1.qcow2")})
    return [
        ("blockdev-backup", backup("j", "nosuch", "full")),
        ("blockdev-backup", backup("j", "src", "full")),
        ("blockdev-backup", backup("j", "big", "full")),
        ("blockdev-backup", backup("j", "full", "incremental")),
        ("blockdev-backup", backup("j", "full", "full", bitmap="nob")),
        ("blockdev-backup", backup("j", "full", "full", **{"bitmap-mode": "never"})),
        ("blockdev-backup", backup("1j", "full", "full")),
        ("transaction", {"actions": [add_b1, add_b1]}),
        ("transaction", {"actions": [add_b1, action("abort")]}),
        ("transaction", {"actions": [add_b1, action("blockdev-backup", **backup("j", "full",
                                                                                 "full")),
                                     action("blockdev-backup", **backup("k", "nosuch",
                                                                        "full"))]}),
        ("transaction", {"actions": [add_b1, action("block-dirty-bitmap-remove", node="src",
                                                    name="nob")]}),
        ("transaction", {"actions": [add_b1], "properties": {"completion-mode": "grouped"}}),
        ("transaction", {"actions": [action("nosuch")]}),
        ("transaction", {"actions": [snap, add_b1, action("abort")]}),
    ]


async def drive(sock: Path, d: Path) -> dict[str, Any]:
    client = qmp.QMPClient("test")
    await client.connect(str(sock))
    events: list[dict[str, Any]] = []
    out: dict[str, Any] = {"events": events, "replies": []}

    async def ex(name: str, args: dict[str, Any] | None = None) -> Any:
        try:
            reply = await client.execute(name, args)
        except qmp.ExecuteError as e:
            reply = (e.error_class, str(e))
        out["replies"].append(reply)
        return reply

    async def until_gone(job: str) -> None:
        async def wait() -> None:
            while True:
                ev = await client.events.get()
                events.append({"event": ev["event"], "data": ev.get("data", {})})
                data = ev.get("data", {})
                if ev["event"] == "JOB_STATUS_CHANGE" and data == {"id": job, "status": "null"}:
                    return
        await asyncio.wait_for(wait(), TIMEOUT)

    async def named_bitmaps() -> None:
        nodes = await client.execute("query-named-block-nodes", {"flat": True})
        out["replies"].append(sorted(
            (n["node-name"], b["name"], b["count"], b["busy"], b["recording"])
            for n in nodes for b in n.get("dirty-bitmaps", []) if "name" in b))

    try:
        for name in ("src", "full", "inc", "none", "big"):
            await ex("blockdev-add", {"driver": "qcow2", "node-name": name, "file": {
                "driver": "file", "filename": str(d / f"{name}.qcow2")}})
        for name, args in failing_requests(d):
            await ex(name, args)
        await named_bitmaps()
        nodes = await client.execute("query-named-block-nodes", {"flat": True})
        out["replies"].append(sorted((n["node-name"], n["ro"]) for n in nodes
                                     if not n["node-name"].startswith("#block")))
        # full backup and the bitmap for the next incremental, atomically
        await ex("transaction", {"actions": [
            action("block-dirty-bitmap-add", node="src", name="b0"),
            action("blockdev-backup", **backup("j0", "full", "full"))]})
        await until_gone("j0")
        await named_bitmaps()
        await ex("blockdev-backup", backup("j1", "inc", "incremental", bitmap="b0"))
        await until_gone("j1")
        await named_bitmaps()
        # sync=none runs until cancelled: the filter and the job's edges meanwhile
        await ex("blockdev-backup", backup("j2", "none", "none", **{
            "filter-node-name": "cbw", "auto-dismiss": False}))
        out["graph"] = graph_shape(await client.execute("x-debug-query-block-graph"))
        out["block-jobs"] = await client.execute("query-block-jobs")
        await ex("blockdev-backup", backup("j3", "none", "none"))
        await ex("block-job-cancel", {"device": "j2"})
        await ex("job-dismiss", {"id": "j2"})
        await until_gone("j2")
        out["graph-after"] = graph_shape(await client.execute("x-debug-query-block-graph"))
    finally:
        await client.disconnect()
    return out


def without_drain_pauses(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """QEMU pauses a job for every drained section (starting a job, a graph change, a failing
    command) and announces paused/running for each; qblock does not drain jobs.  A "paused"
    is kept only right after the BLOCK_JOB_ERROR that stopped that job; the others are dropped
    with the "running" that ends each."""
    out: list[dict[str, Any]] = []
    drained: set[str] = set()
    for ev in events:
        if ev["event"] == "JOB_STATUS_CHANGE":
            job, status = ev["data"]["id"], ev["data"]["status"]
            prev = out[-1] if out else {"event": None}
            stopped = (prev["event"] == "BLOCK_JOB_ERROR" and prev["data"]["device"] == job
                       and prev["data"]["action"] == "stop")
            if status == "paused" and not stopped:
                drained.add(job)
                continue
            if status == "running" and job in drained:
                drained.discard(job)
                continue
        out.append(ev)
    return out


def test_backup_and_transaction_like_qsd(tmp_path: Path) -> None:
    results = on_both_daemons(tmp_path, make_images, drive)
    ref, got = results["qsd"], results["qblock"]
    for i, (r, g) in enumerate(zip(ref["replies"], got["replies"], strict=True)):
        assert g == r, (i, g, r)
    assert without_drain_pauses(got["events"]) == without_drain_pauses(ref["events"])
    assert got["graph"] == ref["graph"]
    assert got["block-jobs"] == ref["block-jobs"]
    assert got["graph-after"] == ref["graph-after"]
    for who in ("qsd", "qblock"):
        d = tmp_path / who
        for name in ("full", "inc", "none", "src"):
            chk = subprocess.run(["qemu-img", "check", str(d / f"{name}.qcow2")],
                                 capture_output=True, text=True, timeout=TIMEOUT)
            assert chk.returncode == 0, chk.stdout + chk.stderr
        cmp = subprocess.run(["qemu-img", "compare", str(d / "src.qcow2"),
                              str(d / "full.qcow2")], capture_output=True, text=True,
                             timeout=TIMEOUT)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr


# -- compressed backup (backup.c: BDRV_REQ_WRITE_COMPRESSED, one cluster per write) -------------
def make_compress_images(d: Path) -> None:
    """src.qcow2: 512K of 0x11, 128K written as zeroes, 100K of 0x22 at 1M; an empty qcow2
    target and an empty raw one."""
    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=TIMEOUT)

    for name in ("src", "comp"):
        run("qemu-img", "create", "-f", "qcow2", str(d / f"{name}.qcow2"), "2M")
    run("qemu-img", "create", "-f", "raw", str(d / "plain.raw"), "2M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 512k", "-c", "write -z 512k 128k",
        "-c", "write -P 0x22 1M 100k", str(d / "src.qcow2"))


async def drive_compress(sock: Path, d: Path) -> dict[str, Any]:
    client = qmp.QMPClient("test")
    await client.connect(str(sock))
    events: list[dict[str, Any]] = []
    out: dict[str, Any] = {"events": events, "replies": []}
    try:
        for name, fmt, file in (("src", "qcow2", "src.qcow2"), ("comp", "qcow2", "comp.qcow2"),
                                ("plain", "raw", "plain.raw")):
            await client.execute("blockdev-add", {"driver": fmt, "node-name": name, "file": {
                "driver": "file", "filename": str(d / file)}})
        try:
            await client.execute("blockdev-backup", backup("j", "plain", "full", compress=True))
        except qmp.ExecuteError as e:
            out["replies"].append((e.error_class, str(e)))
        await client.execute("blockdev-backup", backup("j", "comp", "full", compress=True))

        async def wait() -> None:
            while True:
                ev = await client.events.get()
                events.append({"event": ev["event"], "data": ev.get("data", {})})
                if ev.get("data") == {"id": "j", "status": "null"}:
                    return
        await asyncio.wait_for(wait(), TIMEOUT)
        await client.execute("blockdev-del", {"node-name": "comp"})
    finally:
        await client.disconnect()
    return out


def image_layout(image: Path) -> tuple[Any, str]:
    """qemu-img map (host offsets dropped: allocation order may differ) and the statistics of
    qemu-img check (allocated, fragmented and compressed clusters, image end)."""
    mapped = subprocess.run(["qemu-img", "map", "--output=json", str(image)],
                            capture_output=True, text=True, timeout=TIMEOUT, check=True)
    extents = [{k: v for k, v in e.items() if k != "offset"} for e in json.loads(mapped.stdout)]
    chk = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    return extents, chk.stdout


def test_compressed_backup_like_qsd(tmp_path: Path) -> None:
    """Every data cluster of the target is compressed where QEMU's own compressed backup has
    it (check reports 100% compressed clusters), zeroes stay unallocated; a raw target is
    refused with QEMU's message."""
    results = on_both_daemons(tmp_path, make_compress_images, drive_compress)
    ref, got = results["qsd"], results["qblock"]
    assert got["replies"] == ref["replies"] == [
        ("GenericError", "Compression is not supported for this drive ")]
    assert without_drain_pauses(got["events"]) == without_drain_pauses(ref["events"])
    ref_layout = image_layout(tmp_path / "qsd" / "comp.qcow2")
    assert image_layout(tmp_path / "qblock" / "comp.qcow2") == ref_layout
    assert "100.00% compressed clusters" in ref_layout[1]
    for pair in (("qsd/comp.qcow2", "qblock/comp.qcow2"), ("qblock/src.qcow2",
                                                            "qblock/comp.qcow2")):
        cmp = subprocess.run(["qemu-img", "compare", *(str(tmp_path / p) for p in pair)],
                             capture_output=True, text=True, timeout=TIMEOUT)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr


# -- grouped transactions (job.c JobTxn, job_completed_txn_abort/_success) -------------------
FAIL_512K = {"event": "write_aio", "iotype": "write", "errno": 5, "sector": 1024, "once": True}
GROUPED = {"completion-mode": "grouped"}


def make_raw_images(d: Path) -> None:
    """src.raw: 1 MiB of 0x5a; t1.raw and t2.raw: 1 MiB of zeroes."""
    for name in ("src", "t1", "t2"):
        subprocess.run(["qemu-img", "create", "-f", "raw", str(d / f"{name}.raw"), "1M"],
                       check=True, capture_output=True, timeout=TIMEOUT)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", str(d / "src.raw")],
                   check=True, capture_output=True, timeout=TIMEOUT)


def raw_node(d: Path, name: str, fail: bool = False) -> dict[str, Any]:
    proto: dict[str, Any] = {"driver": "file", "filename": str(d / f"{name}.raw")}
    if fail:
        proto = {"driver": "blkdebug", "image": proto, "inject-error": [FAIL_512K]}
    return {"driver": "raw", "node-name": name, "file": proto}


def grouped(*backups: dict[str, Any]) -> dict[str, Any]:
    return {"actions": [action("blockdev-backup", **b) for b in backups],
            "properties": GROUPED}


async def drive_grouped(sock: Path, d: Path) -> dict[str, Any]:
    """Each phase's events are recorded until its jobs reach the wanted states.  Phases where
    two jobs copy at the same time are compared sorted (which finishes first is a race);
    the others in order."""
    client = qmp.QMPClient("test")
    await client.connect(str(sock))
    out: dict[str, Any] = {"replies": []}
    events: list[dict[str, Any]] = []  # each tagged with its phase
    orders: dict[str, bool] = {}

    async def ex(name: str, args: dict[str, Any] | None = None) -> Any:
        try:
            reply = await client.execute(name, args)
        except qmp.ExecuteError as e:
            reply = (e.error_class, str(e))
        out["replies"].append(reply)
        return reply

    async def phase(name: str, wanted: set[tuple[str, str]], ordered: bool = True) -> None:
        """Record events until every (job, status) in ``wanted`` was announced (a drained
        section's pause does not count)."""
        orders[name] = ordered

        async def wait() -> None:
            seen: set[tuple[str, str]] = set()
            while not wanted <= seen:
                ev = await client.events.get()
                events.append({"event": ev["event"], "data": ev.get("data", {}), "phase": name})
                seen = {(e["data"]["id"], e["data"]["status"])
                        for e in without_drain_pauses(events)
                        if e["phase"] == name and e["event"] == "JOB_STATUS_CHANGE"}
        await asyncio.wait_for(wait(), TIMEOUT)

    async def fresh_t1(fail: bool) -> None:
        await ex("blockdev-del", {"node-name": "t1"})
        await ex("blockdev-add", raw_node(d, "t1", fail))

    def bk(job: str, target: str, sync: str = "full", **extra: Any) -> dict[str, Any]:
        return {"job-id": job, "device": "src", "target": target, "sync": sync, **extra}

    try:
        await ex("blockdev-add", raw_node(d, "src"))
        await ex("blockdev-add", raw_node(d, "t1", fail=True))
        await ex("blockdev-add", raw_node(d, "t2"))
        # only backup actions may be grouped; abort fails with its own message
        await ex("transaction", {"actions": [action("blockdev-backup", **bk("a", "t2")),
                                             action("block-dirty-bitmap-add", node="src",
                                                    name="b0")], "properties": GROUPED})
        await ex("transaction", {"actions": [action("abort")], "properties": GROUPED})
        await phase("refused", {("a", "null")})  # a was created, then dropped
        # b fails: a (sync=none, running until cancelled) is cancelled with it
        await ex("transaction", grouped(bk("a", "t2", "none"), bk("b", "t1")))
        await phase("fail", {("a", "null"), ("b", "null")})
        # a stops on its error: b, done, waits for it; nothing finalizes before a resumes
        await fresh_t1(True)
        await ex("transaction", grouped(bk("a", "t1", **{"on-target-error": "stop"}),
                                        bk("b", "t2")))
        await phase("stop", {("a", "paused"), ("b", "waiting")}, ordered=False)
        out["stopped"] = await client.execute("query-block-jobs")
        await ex("block-job-resume", {"device": "a"})
        await phase("resume", {("a", "null"), ("b", "null")})
        # a user cancel of one job cancels the other
        await ex("transaction", grouped(bk("a", "t1", "none"), bk("b", "t2", "none")))
        await phase("start", {("a", "running"), ("b", "running")}, ordered=False)
        await ex("block-job-cancel", {"device": "b"})
        await phase("cancel", {("a", "null"), ("b", "null")})
        # manual finalize: both go pending together; finalizing one finalizes both
        await fresh_t1(False)
        manual = {"auto-finalize": False}
        await ex("transaction", grouped(bk("a", "t1", **manual), bk("b", "t2", **manual)))
        await phase("pending", {("a", "pending"), ("b", "pending")}, ordered=False)
        out["pending"] = await client.execute("query-block-jobs")
        await ex("job-finalize", {"id": "b"})
        await phase("finalize", {("a", "null"), ("b", "null")})
    finally:
        await client.disconnect()
    # a drained section's pause may end in the next phase: filter all events at once
    kept = without_drain_pauses(events)
    out["phases"] = []
    for name, ordered in orders.items():
        evs = [{"event": e["event"], "data": e["data"]} for e in kept if e["phase"] == name]
        out["phases"].append((name, evs if ordered else sorted(map(json.dumps, evs))))
    return out


def test_grouped_transaction_like_qsd(tmp_path: Path) -> None:
    """completion-mode=grouped: the jobs of one transaction finish together, in QEMU's order
    (newest first), and one failing or cancelled job cancels the others."""
    results = on_both_daemons(tmp_path, make_raw_images, drive_grouped)
    ref, got = results["qsd"], results["qblock"]
    assert got["replies"] == ref["replies"]
    assert ref["replies"][3:5] == [
        ("GenericError", "Action 'block-dirty-bitmap-add' does not support Transaction "
                         "property completion-mode = grouped"),
        ("GenericError", "Transaction aborted using Abort action")]
    for (name, g), (_, r) in zip(got["phases"], ref["phases"], strict=True):
        assert g == r, name
    assert got["stopped"] == ref["stopped"]
    assert got["pending"] == ref["pending"]
    fail = dict(ref["phases"])["fail"]
    assert [e["event"] for e in fail if e["event"].startswith("BLOCK_JOB_C")] == [
        "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"]
    for who in ("qsd", "qblock"):
        for target in ("t1.raw", "t2.raw"):
            cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                                  str(tmp_path / who / "src.raw"), str(tmp_path / who / target)],
                                 capture_output=True, text=True, timeout=TIMEOUT)
            assert cmp.returncode == 0, cmp.stdout + cmp.stderr
