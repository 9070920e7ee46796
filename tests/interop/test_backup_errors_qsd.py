"""On-error policies of blockdev-backup (backup.c backup_error_action(), blockjob.c
block_job_error_action(); REFERENCE 4.3/4.6): ``qblock daemon`` against the real
qemu-storage-daemon 7.2, driven with the same QMP script.

The images and the blkdebug rules are those of test_job_errors_qsd.py: a 1 MiB raw source is
backed up (sync=full) into a raw target; a blkdebug node fails one request at 512K, a write on
the target or a read on the source.  Both daemons must emit the same events in the same order
(BLOCK_JOB_ERROR with the action, the pause of ``stop``, BLOCK_JOB_COMPLETED with or without
error, the progress in it), give the same query-block-jobs reply (io-status, offset) while the
job is stopped, and, where the job succeeds, leave the target equal to the source.

While a stopped job waits, guest writes still reach the source through the copy-before-write
filter (an NBD export of the source, written with qemu-io): they copy the old data first, so
after the resume the target is still the source as it was when the job started.
"""
from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import test_job_errors_qsd as job_errors
from daemon_tools import event_waiter, on_both_daemons
from test_backup_qsd import without_drain_pauses

qmp = pytest.importorskip("qemu.qmp")
pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None
                                 or shutil.which("qemu-img") is None,
                                 reason="qemu-storage-daemon and qemu-img are needed")]
TIMEOUT = 30


def rule(side: str, errno: str) -> dict[str, Any]:
    """Fail once at sector 1024 (512K): a write on the target, a read on the source."""
    event, iotype = ("write_aio", "write") if side == "target" else ("read_aio", "read")
    return {"event": event, "iotype": iotype, "errno": job_errors.ERRNO[errno],
            "sector": 1024, "once": True}


def script(side: str, policy: str, errno: str,  # type: ignore[no-untyped-def]
           guest: tuple[str, ...] = (), target_rules: tuple[dict[str, Any], ...] = ()):
    """Back up src to tgt with ``policy`` for ``side``; when the job stops, query it, run
    the ``guest`` qemu-io commands on the source through NBD, and resume it.
    ``target_rules`` are more blkdebug rules for the target."""
    stops = policy == "stop" or (policy in ("enospc", "auto") and errno == "ENOSPC")

    async def drive(sock: Path, d: Path) -> dict[str, Any]:
        client = qmp.QMPClient("test")
        await client.connect(str(sock))
        events: list[dict[str, Any]] = []
        out: dict[str, Any] = {"events": events}
        until = event_waiter(client, events)
        try:
            ex = client.execute
            fail = rule(side, errno)
            await ex("blockdev-add", job_errors.node(d, "src", fail if side == "source" else None))
            tgt = job_errors.node(d, "tgt", fail if side == "target" else None)
            if target_rules:
                tgt["file"]["inject-error"] += list(target_rules)
            await ex("blockdev-add", tgt)
            if guest:
                await ex("nbd-server-start", {"addr": {"type": "unix", "data": {
                    "path": str(d / "nbd.sock")}}})
                await ex("block-export-add", {"type": "nbd", "id": "e", "node-name": "src",
                                              "writable": True})
            await ex("blockdev-backup", {"job-id": "job0", "device": "src", "target": "tgt",
                                         "sync": "full", f"on-{side}-error": policy})
            if stops:
                await until("BLOCK_JOB_ERROR")  # not the pause of a drained section before it
                await until("JOB_STATUS_CHANGE", status="paused")
                out["paused"] = await ex("query-block-jobs")
                if guest:
                    out["guest"] = await asyncio.to_thread(guest_io, d, *guest)
                await ex("block-job-resume", {"device": "job0"})
            await until("JOB_STATUS_CHANGE", status="null")
            out["events"] = without_drain_pauses(events)
        finally:
            await client.disconnect()
        return out
    return drive


def guest_io(d: Path, *commands: str) -> list[str]:
    """qemu-io on the NBD export of the source (the guest); its error lines."""
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    argv.append(f"nbd+unix:///src?socket={d / 'nbd.sock'}")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "failed" in line]


def qemu_io_read(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    proc = subprocess.run([*argv, str(image)], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout, \
        proc.stdout + proc.stderr


@pytest.mark.parametrize("side,policy,errno", job_errors.CASES)
def test_backup_on_error_like_qsd(tmp_path: Path, side: str, policy: str, errno: str) -> None:
    job_errors.assert_copy_job_like_qsd(
        tmp_path, on_both_daemons(tmp_path, job_errors.prepare, script(side, policy, errno)))


def test_stopped_backup_keeps_the_point_in_time(tmp_path: Path) -> None:
    """Guest writes into clusters the stopped job has not copied yet (one of them the failed
    range) copy the old data first: the target ends as the source was at the start."""
    guest = ("write -P 0xa5 0 64k", "write -P 0xa5 500k 64k")
    results = on_both_daemons(tmp_path, job_errors.prepare, script("target", "stop", "EIO",
                                                                   guest=guest))
    ref, got = results["qsd"], results["qblock"]
    assert got == ref
    assert ref["guest"] == []
    assert ref["paused"][0]["io-status"] == "failed"
    for who in ("qsd", "qblock"):
        qemu_io_read(tmp_path / who / "tgt.raw", "read -P 0x5a 0 1M")
        qemu_io_read(tmp_path / who / "src.raw", "read -P 0xa5 0 64k",
                     "read -P 0x5a 64k 436k", "read -P 0xa5 500k 64k",
                     "read -P 0x5a 564k 460k")


def test_guest_write_fails_when_its_copy_fails(tmp_path: Path) -> None:
    """copy-before-write's default on-cbw-error=break-guest-write: a guest write whose old
    data cannot be copied to the target fails with that error and leaves the source as it
    was; the stopped job, resumed, still copies that cluster, so the target is complete."""
    second = {**rule("target", "EIO"), "sector": 1536}  # 768K, consumed by the guest's copy
    guest = ("write -P 0xa5 768k 64k", "write -P 0xa5 0 64k")
    results = on_both_daemons(tmp_path, job_errors.prepare, script(
        "target", "stop", "EIO", guest=guest, target_rules=(second,)))
    ref, got = results["qsd"], results["qblock"]
    assert got == ref
    assert ref["guest"] == ["write failed: Input/output error"]
    for who in ("qsd", "qblock"):
        qemu_io_read(tmp_path / who / "tgt.raw", "read -P 0x5a 0 1M")
        qemu_io_read(tmp_path / who / "src.raw", "read -P 0xa5 0 64k",
                     "read -P 0x5a 64k 960k")
