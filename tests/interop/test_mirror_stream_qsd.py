"""block-stream and blockdev-mirror: ``qblock daemon`` against the real qemu-storage-daemon
7.2, driven with the same QMP script through qemu.qmp's QMPClient (the approach of
test_commit_qsd.py).

Each daemon works on its own copy of base <- mid <- top plus two empty targets.  The script
streams mid into top (base-node base), mirrors top with sync=full into tgt and completes
(pivot), then mirrors top with sync=top into tgt2 (backing base) and cancels after READY.  Both
daemons must emit the same events in the same order with the same data, give the same
query-block-jobs reply while READY and leave the same graph after each step; the images must
read the same (qemu-img compare) and be clean (qemu-img check).  A second script compares the
errors of bad requests.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from daemon_tools import event_waiter, graph_shape, on_both_daemons
from test_commit_qsd import make_chain

qmp = pytest.importorskip("qemu.qmp")
pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None
                                or shutil.which("qemu-img") is None,
                                reason="qemu-storage-daemon and qemu-img are needed")
TIMEOUT = 30


def make_images(d: Path) -> None:
    make_chain(d)
    for name in ("tgt", "tgt2"):
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(d / f"{name}.qcow2"), "4M"],
                       check=True, capture_output=True, timeout=TIMEOUT)


async def open_chain(client: Any, d: Path) -> None:
    """base as drive01 on file01, mid01 and over01 appended with blockdev-snapshot."""
    ex = client.execute
    await ex("blockdev-add", {"driver": "file", "node-name": "file01",
                              "filename": str(d / "base.qcow2")})
    await ex("blockdev-add", {"driver": "qcow2", "node-name": "drive01", "file": "file01"})
    for name, below, file in (("mid01", "drive01", "mid"), ("over01", "mid01", "top")):
        await ex("blockdev-add", {"driver": "qcow2", "node-name": name, "backing": None,
                                  "file": {"driver": "file",
                                           "filename": str(d / f"{file}.qcow2")}})
        await ex("blockdev-snapshot", {"node": below, "overlay": name})


async def drive(sock: Path, d: Path) -> dict[str, Any]:
    client = qmp.QMPClient("test")
    await client.connect(str(sock))
    events: list[dict[str, Any]] = []
    out: dict[str, Any] = {"events": events, "graphs": [], "block-jobs": []}

    until = event_waiter(client, events, TIMEOUT)

    async def graph() -> None:
        out["graphs"].append(graph_shape(await client.execute("x-debug-query-block-graph")))

    try:
        ex = client.execute
        await open_chain(client, d)
        await ex("block-stream", {"job-id": "jobS", "device": "over01", "base-node": "drive01"})
        await until("JOB_STATUS_CHANGE", id="jobS", status="null")
        await graph()
        for name, backing in (("tgt01", None), ("tgt02", "drive01")):
            await ex("blockdev-add", {"driver": "qcow2", "node-name": name, "backing": backing,
                                      "file": {"driver": "file",
                                               "filename": str(d / f"{name[:3]}"
                                                               f"{name[4:].strip('1')}.qcow2")}})
        await ex("blockdev-mirror", {"job-id": "jobM", "device": "over01", "target": "tgt01",
                                     "sync": "full"})
        await until("BLOCK_JOB_READY", device="jobM")
        out["block-jobs"].append(await ex("query-block-jobs"))
        await graph()
        await ex("block-job-complete", {"device": "jobM"})
        await until("JOB_STATUS_CHANGE", id="jobM", status="null")
        await graph()
        await ex("blockdev-mirror", {"job-id": "jobC", "device": "over01", "target": "tgt02",
                                     "sync": "top"})
        await until("BLOCK_JOB_READY", device="jobC")
        out["block-jobs"].append(await ex("query-block-jobs"))
        await ex("block-job-cancel", {"device": "jobC"})
        await until("JOB_STATUS_CHANGE", id="jobC", status="null")
        await graph()
        await ex("drive-mirror", {"job-id": "jobD", "device": "over01", "sync": "top",
                                  "target": str(d / "dm.qcow2"), "format": "qcow2",
                                  "node-name": "dm01"})
        await until("BLOCK_JOB_READY", device="jobD")
        out["block-jobs"].append(await ex("query-block-jobs"))
        await graph()
        await ex("block-job-complete", {"device": "jobD"})
        await until("JOB_STATUS_CHANGE", id="jobD", status="null")
        await graph()
        out["dm01"] = [(n["node-name"], n["ro"], n["image"].get("backing-filename"))
                       for n in await ex("query-named-block-nodes")
                       if n["node-name"] == "dm01"]
    finally:
        await client.disconnect()
    return out


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)


def test_stream_and_mirror_like_qsd(tmp_path: Path) -> None:
    results = on_both_daemons(tmp_path, make_images, drive)
    ref, got = results["qsd"], results["qblock"]
    assert got["events"] == ref["events"]
    assert got["block-jobs"] == ref["block-jobs"]
    for g_ref, g_got in zip(ref["graphs"], got["graphs"], strict=True):
        assert g_got == g_ref
    q, b = tmp_path / "qsd", tmp_path / "qblock"
    for name in ("top", "tgt", "tgt2", "dm"):
        cmp = run("qemu-img", "compare", str(q / f"{name}.qcow2"), str(b / f"{name}.qcow2"))
        assert cmp.returncode == 0, (name, cmp.stdout + cmp.stderr)
        chk = run("qemu-img", "check", str(b / f"{name}.qcow2"))
        assert chk.returncode == 0, chk.stdout + chk.stderr
    # the mirrors are exact copies of the streamed top; tgt2 got its backing from
    # blockdev-add only, so its header learns the name here (qemu-img rebase -u)
    run("qemu-img", "rebase", "-u", "-b", str(b / "base.qcow2"), "-F", "qcow2",
        str(b / "tgt2.qcow2"))
    assert got["dm01"] == ref["dm01"] == []  # the pivoted target had no user: dropped
    for name in ("tgt", "tgt2", "dm"):
        cmp = run("qemu-img", "compare", str(b / "top.qcow2"), str(b / f"{name}.qcow2"))
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # stream rewrote top's backing file string to base, like QEMU's
    # and drive-mirror created dm with the source's backing (absolute-paths)
    for name in ("top", "dm"):
        info = run("qemu-img", "info", "--output=json", str(b / f"{name}.qcow2"))
        assert f'"backing-filename": "{b / "base.qcow2"}"' in info.stdout


def error_script(d: Path) -> list[tuple[str, dict[str, Any]]]:
    dm = str(d / "dmx.img")
    return [
        ("drive-mirror", {"job-id": "j", "device": "nope", "target": dm, "sync": "full"}),
        ("drive-mirror", {"job-id": "j", "device": "over01", "target": dm, "sync": "full",
                          "replaces": "over01"}),
        ("drive-mirror", {"job-id": "j", "device": "over01", "target": dm, "sync": "top",
                          "format": "raw"}),
        ("drive-mirror", {"job-id": "j", "device": "over01", "target": dm, "sync": "full",
                          "granularity": 100, "node-name": "dmx"}),
        ("blockdev-mirror", {"job-id": "j", "device": "nope", "target": "tgt01",
                             "sync": "full"}),
        ("blockdev-mirror", {"job-id": "j", "device": "drive01", "target": "tgt01",
                             "sync": "full"}),
        ("blockdev-mirror", {"job-id": "j", "device": "over01", "target": "nope",
                             "sync": "full"}),
        ("blockdev-mirror", {"job-id": "j", "device": "over01", "target": "tgt01",
                             "sync": "full", "granularity": 100}),
        ("blockdev-mirror", {"job-id": "j", "device": "over01", "target": "tgt01",
                             "sync": "full", "granularity": 3 << 10}),
        ("blockdev-mirror", {"job-id": "j", "device": "over01", "target": "mid01",
                             "sync": "full"}),
        ("blockdev-mirror", {"job-id": "j", "device": "over01", "target": "over01",
                             "sync": "full"}),
        ("blockdev-mirror", {"job-id": "j", "device": "over01", "target": "tgt01",
                             "sync": "full", "replaces": "nope"}),
        ("blockdev-mirror", {"job-id": "j", "device": "over01", "target": "tgt01",
                             "sync": "full", "replaces": "mid01"}),
        ("blockdev-mirror", {"job-id": "j", "device": "over01", "target": "tgt01",
                             "sync": "incremental"}),
        ("blockdev-mirror", {"job-id": "j", "device": "over01", "target": "tgt01",
                             "sync": "full", "buf-size": -1}),
        ("blockdev-mirror", {"device": "over01", "target": "tgt01", "sync": "full"}),
        ("block-stream", {"job-id": "j", "device": "nope"}),
        ("block-stream", {"job-id": "j", "device": "over01", "base": "x",
                          "base-node": "drive01"}),
        ("block-stream", {"job-id": "j", "device": "over01", "base": "x", "bottom": "mid01"}),
        ("block-stream", {"job-id": "j", "device": "over01", "bottom": "mid01",
                          "base-node": "drive01"}),
        ("block-stream", {"job-id": "j", "device": "over01", "base": "x.qcow2"}),
        ("block-stream", {"job-id": "j", "device": "over01", "base-node": "over01"}),
        ("block-stream", {"job-id": "j", "device": "over01", "base-node": "tgt01"}),
        ("block-stream", {"job-id": "j", "device": "over01", "bottom": "tgt01"}),
        ("block-stream", {"job-id": "j", "device": "over01", "backing-file": "x"}),
        ("block-stream", {"device": "over01"}),
    ]


async def drive_errors(sock: Path, d: Path) -> list[Any]:
    client = qmp.QMPClient("test")
    await client.connect(str(sock))
    out: list[Any] = []
    try:
        await open_chain(client, d)
        await client.execute("blockdev-add", {
            "driver": "qcow2", "node-name": "tgt01",
            "file": {"driver": "file", "filename": str(d / "tgt.qcow2")}})
        for name, args in error_script(d):
            try:
                out.append(await client.execute(name, args))
            except qmp.ExecuteError as e:
                out.append((name, e.error_class, str(e)))
        out.append(await client.execute("query-jobs"))
    finally:
        await client.disconnect()
    return out


def test_mirror_and_stream_errors_like_qsd(tmp_path: Path) -> None:
    results = on_both_daemons(tmp_path, make_images, drive_errors)
    for step, ref, got in zip(error_script(tmp_path), results["qsd"], results["qblock"]):
        assert got == ref, step
    assert results["qblock"] == results["qsd"]
