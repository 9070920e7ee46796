"""``qblock ctl jobs``: the table against the real qemu-storage-daemon, and ``--watch``
following a speed-limited commit in ``qblock daemon`` from running to null.

Both daemons run an intermediate commit of mid into base (base <- mid <- top) limited by
``speed``; the ctl runs as a real process, its stdout a pipe (the plain line-per-step view).
"""
from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon_tools import env, qblock, qsd, running

qmp = pytest.importorskip("qemu.qmp")
pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None
                                or shutil.which("qemu-img") is None,
                                reason="qemu-storage-daemon and qemu-img are needed")
TIMEOUT = 30
MIB = 1 << 20


def make_chain(d: Path) -> None:
    """base <- mid (4 MiB written) <- top."""
    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=TIMEOUT)

    run("qemu-img", "create", "-f", "qcow2", str(d / "base.qcow2"), "4M")
    for name, below in (("mid", "base"), ("top", "mid")):
        run("qemu-img", "create", "-f", "qcow2", "-b", str(d / f"{below}.qcow2"), "-F", "qcow2",
            str(d / f"{name}.qcow2"))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 4M", str(d / "mid.qcow2"))


async def start_commit(sock: Path, d: Path, speed: int, **extra: Any) -> None:
    """Open the chain and start job0 committing mid into base at ``speed`` bytes/s."""
    client = qmp.QMPClient("test")
    await client.connect(str(sock))
    try:
        backing = None
        for name in ("base", "mid", "top"):
            await client.execute("blockdev-add", {
                "driver": "qcow2", "node-name": f"{name}0", "backing": backing,
                "file": {"driver": "file", "filename": str(d / f"{name}.qcow2")}})
            backing = f"{name}0"
        await client.execute("block-commit", {
            "device": "top0", "job-id": "job0", "top-node": "mid0", "base-node": "base0",
            "speed": speed, **extra})
    finally:
        await client.disconnect()


def ctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qblock.cli.main", "ctl", "jobs",
                           "--socket", str(sock), *args], env=env(), capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def test_table_matches_qsd_for_a_running_commit(tmp_path: Path) -> None:
    tables = {}
    for who, start in (("qsd", qsd), ("qblock", qblock)):
        d = tmp_path / who
        d.mkdir()
        make_chain(d)
        argv, sock = start(d)
        with running(argv, sock):
            asyncio.run(start_commit(sock, d, 64 * 1024))  # minutes at this speed: stays running
            proc = ctl(sock)
        assert proc.returncode == 0, proc.stderr
        tables[who] = [line.split() for line in proc.stdout.splitlines()]
    for who, table in tables.items():
        assert table[0] == ["ID", "TYPE", "STATUS", "PROGRESS", "SPEED"], who
    # same ids, types, statuses, totals and speeds; current progress is timing
    def key(row: list[str]) -> list[str]:
        current, total = row[3].split("/")
        assert 0 <= int(current) < int(total), row
        return [row[0], row[1], row[2], total, row[-1]]

    expected = [["job0", "commit", "running", str(4 * MIB), "65536"]]
    assert [key(r) for r in tables["qblock"][1:]] == [key(r) for r in tables["qsd"][1:]] \
        == expected


def test_no_jobs_table_and_watch(tmp_path: Path) -> None:
    argv, sock = qblock(tmp_path)
    with running(argv, sock):
        proc = ctl(sock)
        assert (proc.returncode, proc.stdout.split()) == (0, ["ID", "TYPE", "STATUS", "PROGRESS",
                                                              "SPEED"])
        proc = ctl(sock, "--watch")
        assert (proc.returncode, proc.stdout) == (0, "-: no jobs\n")


@pytest.mark.parametrize("interval", ["0.1", "0.001"])
def test_watch_follows_a_speed_limited_commit_to_the_end(tmp_path: Path, interval: str) -> None:
    """Every status change is shown.  Polling every millisecond, a query-jobs reply keeps
    racing the job's last events (the reply can say concluded, or no job, while the events
    that say so are still queued): those events come first all the same."""
    make_chain(tmp_path)
    argv, sock = qblock(tmp_path)
    with running(argv, sock):
        asyncio.run(start_commit(sock, tmp_path, 2 * MIB))  # about 2 s for 4 MiB
        proc = ctl(sock, "--watch", "--interval", interval)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "job0: commit status running"
    statuses = [line.split()[-1] for line in lines if line.startswith("job0: status ")]
    assert statuses == ["waiting", "pending", "concluded", "null"]
    assert "job0: BLOCK_JOB_COMPLETED len=4194304 offset=4194304 speed=2097152" in lines
    assert lines.index("job0: BLOCK_JOB_COMPLETED len=4194304 offset=4194304 speed=2097152") \
        < lines.index("job0: status concluded")
    progress = [int(m.group(1)) for line in lines
                if (m := re.match(r"job0: progress (\d+)/4194304 .* speed 2097152$", line))]
    assert len(progress) >= 3, lines  # several steps seen while the job ran
    assert progress == sorted(set(progress))  # strictly increasing, one line per step
    assert lines[-1] == "job0: status null"
    # progress reaches 100% by the COMPLETED event (its offset/len, or a poll just before)
    done = lines.index("job0: BLOCK_JOB_COMPLETED len=4194304 offset=4194304 speed=2097152")
    assert [line for line in lines[:done] if " progress " in line][-1] \
        == "job0: progress 4194304/4194304 (100.0%) speed 2097152"


def test_watch_stops_at_a_job_that_stays_concluded(tmp_path: Path) -> None:
    make_chain(tmp_path)
    argv, sock = qblock(tmp_path)
    with running(argv, sock):
        asyncio.run(start_commit(sock, tmp_path, 4 * MIB, **{"auto-dismiss": False}))
        proc = ctl(sock, "--watch", "--interval", "0.1")
        table = ctl(sock)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # the last state seen (at start, or by an event) is concluded, and the watch ended there
    assert [line.split()[-1] for line in lines if " status " in line][-1] == "concluded"
    assert "job0: status null" not in lines
    assert table.stdout.splitlines()[1].split()[:3] == ["job0", "commit", "concluded"]


def test_bad_interval_and_unreachable_socket(tmp_path: Path) -> None:
    proc = ctl(tmp_path / "none.sock", "--watch", "--interval", "0")
    assert (proc.returncode, proc.stderr.strip()) == (
        1, "qblock ctl: --interval must be positive")
    proc = ctl(tmp_path / "none.sock")
    assert proc.returncode == 1 and proc.stderr.startswith("qblock ctl: cannot connect to ")
