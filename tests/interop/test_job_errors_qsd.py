"""On-error policies of block jobs (blockjob.c block_job_error_action(), REFERENCE 4.3):
``qblock daemon`` against the real qemu-storage-daemon 7.2, driven with the same QMP script.

A blockdev-mirror copies a 1 MiB raw source into a raw target whose protocol node is a
``blkdebug`` node failing once at a chosen sector (write_aio on the target, read_aio on the
source).  For each policy both daemons must emit the same events in the same order
(BLOCK_JOB_ERROR, JOB_STATUS_CHANGE, BLOCK_JOB_COMPLETED with or without error), give the same
query-block-jobs reply (io-status included) while a ``stop`` holds the job paused, and, where
the job succeeds, leave targets equal to the source (qemu-img compare).  block-stream (a read
of the raw base fails) and an intermediate block-commit (a write into the raw base fails) are
compared the same way for report, ignore and stop.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from daemon_tools import event_waiter, on_both_daemons

qmp = pytest.importorskip("qemu.qmp")
pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None
                                or shutil.which("qemu-img") is None,
                                reason="qemu-storage-daemon and qemu-img are needed")
TIMEOUT = 30
ERRNO = {"EIO": 5, "ENOSPC": 28}


def prepare(d: Path) -> None:
    """src.raw: 1 MiB of 0x5a; tgt.raw: 1 MiB of zeroes."""
    for name in ("src", "tgt"):
        subprocess.run(["qemu-img", "create", "-f", "raw", str(d / f"{name}.raw"), "1M"],
                       check=True, capture_output=True, timeout=TIMEOUT)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", str(d / "src.raw")],
                   check=True, capture_output=True, timeout=TIMEOUT)


def node(d: Path, name: str, rule: dict[str, Any] | None) -> dict[str, Any]:
    """raw over file, or raw over blkdebug over file when ``rule`` is given."""
    proto: dict[str, Any] = {"driver": "file", "filename": str(d / f"{name}.raw")}
    if rule is not None:
        proto = {"driver": "blkdebug", "image": proto, "inject-error": [rule]}
    return {"driver": "raw", "node-name": name, "file": proto}


def script(side: str, policy: str, errno: str):  # type: ignore[no-untyped-def]
    """The QMP script for one case: fail once at 512K on ``side``, with ``policy``."""
    event, iotype = ("write_aio", "write") if side == "target" else ("read_aio", "read")
    rule = {"event": event, "iotype": iotype, "errno": ERRNO[errno], "sector": 1024,
            "once": True}

    async def drive(sock: Path, d: Path) -> dict[str, Any]:
        client = qmp.QMPClient("test")
        await client.connect(str(sock))
        events: list[dict[str, Any]] = []
        out: dict[str, Any] = {"events": events}

        until = event_waiter(client, events)

        try:
            ex = client.execute
            await ex("blockdev-add", node(d, "src", rule if side == "source" else None))
            await ex("blockdev-add", node(d, "tgt", rule if side == "target" else None))
            await ex("blockdev-mirror", {"job-id": "job0", "device": "src", "target": "tgt",
                                         "sync": "full", f"on-{side}-error": policy})
            if policy == "stop" or (policy in ("enospc", "auto") and errno == "ENOSPC"):
                await until("JOB_STATUS_CHANGE", status="paused")
                out["paused"] = await ex("query-block-jobs")
                await ex("block-job-resume", {"device": "job0"})
                await until("JOB_STATUS_CHANGE", status="running")
                # the copy races the query after resuming: only the cleared io-status is stable
                out["resumed"] = [j["io-status"] for j in await ex("query-block-jobs")]
            ready = await _ready_or_end(until, events)
            if ready:
                await ex("block-job-complete", {"device": "job0"})
                await until("JOB_STATUS_CHANGE", status="null")
        finally:
            await client.disconnect()
        return out
    return drive


async def _ready_or_end(until: Any, events: list[dict[str, Any]]) -> bool:
    """Wait for READY (True) or the job's end (False)."""
    while True:
        await until("JOB_STATUS_CHANGE")
        status = events[-1]["data"]["status"]
        if status == "ready":
            return True
        if status == "null":
            return False


CASES = [("target", "report", "EIO"), ("target", "ignore", "EIO"), ("target", "stop", "EIO"),
         ("target", "enospc", "EIO"), ("target", "enospc", "ENOSPC"),
         ("target", "auto", "ENOSPC"), ("source", "stop", "EIO"), ("source", "report", "EIO"),
         ("source", "ignore", "EIO")]


def prepare_chain(d: Path) -> None:
    """base.raw (1 MiB of 0x11) <- mid.qcow2 (0x33 in the first 256K) <- top.qcow2."""
    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=TIMEOUT)

    run("qemu-img", "create", "-f", "raw", str(d / "base.raw"), "1M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", str(d / "base.raw"))
    run("qemu-img", "create", "-f", "qcow2", "-b", str(d / "base.raw"), "-F", "raw",
        str(d / "mid.qcow2"))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 256k", str(d / "mid.qcow2"))
    run("qemu-img", "create", "-f", "qcow2", "-b", str(d / "mid.qcow2"), "-F", "qcow2",
        str(d / "top.qcow2"))


def chain_script(job: str, policy: str):  # type: ignore[no-untyped-def]
    """stream top from the whole chain (base fails a read at 512K), or commit mid into base
    (base fails a write at 128K)."""
    if job == "stream":
        rule = {"event": "read_aio", "iotype": "read", "sector": 1024, "once": True}
        cmd = ("block-stream", {"job-id": "job0", "device": "top", "on-error": policy})
    else:
        rule = {"event": "write_aio", "iotype": "write", "sector": 256, "once": True}
        cmd = ("block-commit", {"job-id": "job0", "device": "top", "top-node": "mid",
                                "base-node": "base", "on-error": policy})

    async def drive(sock: Path, d: Path) -> dict[str, Any]:
        client = qmp.QMPClient("test")
        await client.connect(str(sock))
        events: list[dict[str, Any]] = []
        out: dict[str, Any] = {"events": events}

        until = event_waiter(client, events)

        try:
            ex = client.execute
            await ex("blockdev-add", {"driver": "raw", "node-name": "base", "file": {
                "driver": "blkdebug", "inject-error": [rule],
                "image": {"driver": "file", "filename": str(d / "base.raw")}}})
            for name, below in (("mid", "base"), ("top", "mid")):
                await ex("blockdev-add", {"driver": "qcow2", "node-name": name, "backing": below,
                                          "file": {"driver": "file",
                                                   "filename": str(d / f"{name}.qcow2")}})
            await ex(*cmd)
            if policy == "stop":
                await until("JOB_STATUS_CHANGE", status="paused")
                out["paused"] = await ex("query-block-jobs")
                await ex("block-job-resume", {"device": "job0"})
            await until("JOB_STATUS_CHANGE", status="null")
        finally:
            await client.disconnect()
        return out
    return drive


@pytest.mark.parametrize("job,policy", [(j, p) for j in ("stream", "commit")
                                        for p in ("report", "ignore", "stop")])
def test_stream_commit_on_error_like_qsd(tmp_path: Path, job: str, policy: str) -> None:
    results = on_both_daemons(tmp_path, prepare_chain, chain_script(job, policy))
    ref, got = results["qsd"], results["qblock"]
    assert got == ref
    assert any(e["event"] == "BLOCK_JOB_ERROR" for e in ref["events"])
    completed = [e for e in ref["events"] if e["event"] == "BLOCK_JOB_COMPLETED"]
    if "error" not in completed[0]["data"]:
        image = "top.qcow2" if job == "stream" else "base.raw"
        cmp = subprocess.run(["qemu-img", "compare", str(tmp_path / "qsd" / image),
                              str(tmp_path / "qblock" / image)],
                             capture_output=True, text=True, timeout=TIMEOUT)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr


@pytest.mark.parametrize("side,policy,errno", CASES)
def test_mirror_on_error_like_qsd(tmp_path: Path, side: str, policy: str, errno: str) -> None:
    assert_copy_job_like_qsd(tmp_path, on_both_daemons(tmp_path, prepare,
                                                       script(side, policy, errno)))


def assert_copy_job_like_qsd(tmp_path: Path, results: dict[str, Any]) -> None:
    """Same events and replies on both daemons, an error was hit, and a job that succeeded
    left a target equal to its source on both."""
    ref, got = results["qsd"], results["qblock"]
    assert got == ref
    assert any(e["event"] == "BLOCK_JOB_ERROR" for e in ref["events"])
    completed = [e for e in ref["events"] if e["event"] == "BLOCK_JOB_COMPLETED"]
    if "error" not in completed[0]["data"]:
        for who in ("qsd", "qblock"):
            cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                                  str(tmp_path / who / "src.raw"),
                                  str(tmp_path / who / "tgt.raw")],
                                 capture_output=True, text=True, timeout=TIMEOUT)
            assert cmp.returncode == 0, cmp.stdout + cmp.stderr
