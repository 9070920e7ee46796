"""Snapshot + intermediate commit + active commit: ``qblock daemon`` against the real
qemu-storage-daemon 7.2, driven with the same QMP script through qemu.qmp's QMPClient.

Each daemon works on its own copy of a three-layer chain (base <- mid <- top).  The script
appends mid and top with blockdev-snapshot, commits mid into base (intermediate commit), then
commits top into base (active commit: READY, block-job-complete).  Both daemons must emit the
same events in the same order with the same data, give the same query-jobs and
query-block-jobs replies while READY, leave the same graph after
each step (node names with implicit numbering masked, edges with their permissions), and leave
base images with equal content (qemu-img compare) that qemu-img check finds clean.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from daemon_tools import event_waiter, graph_shape, on_both_daemons

qmp = pytest.importorskip("qemu.qmp")
pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None
                                or shutil.which("qemu-img") is None,
                                reason="qemu-storage-daemon and qemu-img are needed")
TIMEOUT = 30


def make_chain(d: Path) -> None:
    """base (0x11 at 0, 0x22 at 2M) <- mid (0x33 at 1M) <- top (0x44 at 3M)."""
    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=TIMEOUT)

    run("qemu-img", "create", "-f", "qcow2", str(d / "base.qcow2"), "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 2M 512k",
        str(d / "base.qcow2"))
    for name, below, pattern, offset in (("mid", "base", "0x33", "1M"),
                                         ("top", "mid", "0x44", "3M")):
        run("qemu-img", "create", "-f", "qcow2", "-b", str(d / f"{below}.qcow2"), "-F", "qcow2",
            str(d / f"{name}.qcow2"))
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} 256k",
            str(d / f"{name}.qcow2"))


async def drive(sock: Path, d: Path) -> dict[str, Any]:
    """Run the script; return events and the graphs after each step."""
    client = qmp.QMPClient("test")
    await client.connect(str(sock))
    events: list[dict[str, Any]] = []
    out: dict[str, Any] = {"events": events, "graphs": []}

    until = event_waiter(client, events, TIMEOUT)

    async def graph() -> None:
        out["graphs"].append(graph_shape(await client.execute("x-debug-query-block-graph")))

    try:
        ex = client.execute
        await ex("blockdev-add", {"driver": "file", "node-name": "file01",
                                  "filename": str(d / "base.qcow2")})
        await ex("blockdev-add", {"driver": "qcow2", "node-name": "drive01", "file": "file01"})
        files = {"mid01": "mid", "over01": "top"}
        for name, below in (("mid01", "drive01"), ("over01", "mid01")):
            await ex("blockdev-add", {
                "driver": "qcow2", "node-name": name, "backing": None,
                "file": {"driver": "file", "filename": str(d / f"{files[name]}.qcow2")}})
            await ex("blockdev-snapshot", {"node": below, "overlay": name})
        await graph()
        await ex("block-commit", {"device": "over01", "job-id": "jobI", "top-node": "mid01",
                                  "base-node": "drive01"})
        await until("JOB_STATUS_CHANGE", id="jobI", status="null")
        await graph()
        await ex("block-commit", {"device": "over01", "job-id": "jobA"})
        await until("BLOCK_JOB_READY", device="jobA")
        out["jobs"] = await ex("query-jobs")
        out["block-jobs"] = await ex("query-block-jobs")
        await graph()
        await ex("block-job-complete", {"device": "jobA"})
        await until("JOB_STATUS_CHANGE", id="jobA", status="null")
        await graph()
    finally:
        await client.disconnect()
    return out


def test_snapshot_commit_active_commit_like_qsd(tmp_path: Path) -> None:
    results = on_both_daemons(tmp_path, make_chain, drive)
    ref, got = results["qsd"], results["qblock"]
    # same events, same order, same data (len/offset included); timestamps differ
    assert got["events"] == ref["events"]
    for g_ref, g_got in zip(ref["graphs"], got["graphs"], strict=True):
        assert g_got == g_ref
    assert got["jobs"] == ref["jobs"]
    assert got["block-jobs"] == ref["block-jobs"]
    cmp = subprocess.run(["qemu-img", "compare", str(tmp_path / "qsd" / "base.qcow2"),
                          str(tmp_path / "qblock" / "base.qcow2")], capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    for who in ("qsd", "qblock"):
        for name in ("base", "top"):
            chk = subprocess.run(["qemu-img", "check", str(tmp_path / who / f"{name}.qcow2")],
                                 capture_output=True, text=True, timeout=TIMEOUT)
            assert chk.returncode == 0, chk.stdout + chk.stderr
    # the intermediate commit rewrote top's backing file string to base, like QEMU's
    info = subprocess.run(["qemu-img", "info", "--output=json",
                           str(tmp_path / "qblock" / "top.qcow2")],
                          capture_output=True, text=True, timeout=TIMEOUT, check=True)
    assert str(tmp_path / "qblock" / "base.qcow2") in info.stdout


def error_script(d: Path) -> list[tuple[str, dict[str, Any]]]:
    """Requests that fail, then a snapshot of a node nobody uses (QEMU drops the overlay)."""
    x = str(d / "x.qcow2")
    return [
        ("block-commit", {"device": "nope", "job-id": "j"}),
        ("block-commit", {"device": "over01", "job-id": "j", "top-node": "file01"}),
        ("block-commit", {"device": "over01", "job-id": "j", "base-node": "over01"}),
        ("block-commit", {"device": "over01", "job-id": "j", "top-node": "drive01"}),
        ("block-commit", {"device": "over01", "job-id": "j", "backing-file": "x"}),
        ("block-commit", {"device": "over01"}),
        ("block-commit", {"device": "over01", "job-id": "1j"}),
        ("block-commit", {"device": "drive01", "job-id": "j"}),
        ("blockdev-snapshot-sync", {"node-name": "over01", "snapshot-file": x}),
        ("blockdev-snapshot-sync", {"node-name": "over01", "snapshot-file": x,
                                    "snapshot-node-name": "mid01"}),
        ("blockdev-snapshot-sync", {"device": "over01", "snapshot-file": x}),
        ("blockdev-snapshot", {"node": "over01", "overlay": "mid01"}),
        ("blockdev-snapshot", {"node": "over01", "overlay": "nope"}),
        ("blockdev-snapshot", {"node": "over01", "overlay": "file01"}),
        ("block-job-complete", {"device": "j"}),
        ("job-complete", {"id": "j"}),
        ("blockdev-snapshot-sync", {"node-name": "over01", "snapshot-file": x,
                                    "snapshot-node-name": "snap01"}),
    ]


async def drive_errors(sock: Path, d: Path) -> list[Any]:
    client = qmp.QMPClient("test")
    await client.connect(str(sock))
    out: list[Any] = []
    try:
        await client.execute("blockdev-add", {"driver": "file", "node-name": "file01",
                                              "filename": str(d / "base.qcow2")})
        await client.execute("blockdev-add", {"driver": "qcow2", "node-name": "drive01",
                                              "file": "file01"})
        for name, below, file in (("mid01", "drive01", "mid"), ("over01", "mid01", "top")):
            await client.execute("blockdev-add", {
                "driver": "qcow2", "node-name": name, "backing": None,
                "file": {"driver": "file", "filename": str(d / f"{file}.qcow2")}})
            await client.execute("blockdev-snapshot", {"node": below, "overlay": name})
        for name, args in error_script(d):
            try:
                out.append(await client.execute(name, args))
            except qmp.ExecuteError as e:
                out.append((e.error_class, str(e)))
        nodes = await client.execute("query-named-block-nodes")
        out.append(sorted((n["node-name"], n["ro"]) for n in nodes
                          if not n["node-name"].startswith("#block")))
    finally:
        await client.disconnect()
    return out


def test_commit_and_snapshot_errors_like_qsd(tmp_path: Path) -> None:
    """Error classes and texts of block-commit, the snapshot commands and the job lookups;
    a snapshot-sync overlay without users is dropped again and its base stays read-only."""
    results = on_both_daemons(tmp_path, make_chain, drive_errors)
    assert results["qblock"] == results["qsd"]
    assert results["qsd"][-1] == [("drive01", True), ("file01", False), ("mid01", True),
                                  ("over01", True)]
