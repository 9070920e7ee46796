"""blockdev-backup and transaction: ``qblock daemon`` against the real qemu-storage-daemon 7.2,
the same QMP script on each (qemu.qmp's QMPClient), each on its own copy of the images.

Compared: every reply (errors by class and text), the events of the jobs in order with their
data, the graph while a sync=none backup runs (copy-before-write filter with its edges and
permissions), query-block-jobs, the named dirty bitmaps after each transaction; afterwards the
backups must equal their source (qemu-img compare) and be clean (qemu-img check).
"""
from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from daemon_tools import on_both_daemons

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


def graph_shape(graph: dict[str, Any]) -> list[tuple[Any, ...]]:
    names = {n["id"]: ("#block" if n["name"].startswith("#block") else n["name"], n["type"])
             for n in graph["nodes"]}
    return sorted((names[e["parent"]], names[e["child"]], e["name"], sorted(e["perm"]),
                   sorted(e["shared-perm"])) for e in graph["edges"])


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
    """QEMU pauses a job for every drained section (a graph change, a failing command) and
    announces paused/running for each; qblock does not drain jobs.  Those pairs are dropped."""
    out: list[dict[str, Any]] = []
    for ev in events:
        if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["status"] == "paused":
            continue
        if (ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["status"] == "running" and out
                and out[-1] == ev):
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
