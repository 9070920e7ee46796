"""Issue 5's seed scenario end to end, ``qblock daemon`` against the real qemu-storage-daemon 7.2.

Both daemons start with seed 000's ``--blockdev`` lines (file01 and drive01, cache.direct=on)
and a writable NBD export of drive01.  A snapshot (blockdev-snapshot-sync) puts over01 on top,
qemu-io writes new data THROUGH THE EXPORT, then ``qmp-shell`` (a subprocess fed the seeds' own
commands on stdin) runs ``block-commit device=over01 job-id=jobA``, polls query-block-jobs until
the job is ready and completes it.  qemu.qmp's QMPClient, on a second monitor, drives the rest
and collects events.  Both daemons must emit the same events in the same order (timing-dependent
values masked) and show the same graph shapes before, during (READY) and after; afterwards the
graph is export -> drive01 -> file01 again, the content equals the expected bytes (through the
export and on the file after shutdown), qemu-img check is clean and qemu-img compare of the
base against a raw file of the expected content agrees.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon_tools import event_waiter, graph_shape, qblock, qsd, running

qmp = pytest.importorskip("qemu.qmp")
QMP_SHELL = shutil.which("qmp-shell", path=str(Path(sys.executable).parent)) or \
    shutil.which("qmp-shell")
pytestmark = pytest.mark.skipif(
    None in (shutil.which("qemu-storage-daemon"), shutil.which("qemu-img"),
             shutil.which("qemu-io"), QMP_SHELL),
    reason="qemu-storage-daemon, qemu-img, qemu-io and qmp-shell are needed")
TIMEOUT = 30
MiB = 1 << 20
SIZE = 16 * MiB
# (pattern, offset, length): the base image's data, then what is written through the export
BASE_DATA = ((0x11, 0, 2 * MiB), (0x22, 4 * MiB, 2 * MiB))
EXPORT_DATA = ((0xCD, 1 * MiB, 2 * MiB), (0xEF, 8 * MiB, 4 * MiB))
# the whole disk afterwards, region by region
FINAL = ((0x11, 0, 1 * MiB), (0xCD, 1 * MiB, 2 * MiB), (0, 3 * MiB, 1 * MiB),
         (0x22, 4 * MiB, 2 * MiB), (0, 6 * MiB, 2 * MiB), (0xEF, 8 * MiB, 4 * MiB),
         (0, 12 * MiB, 4 * MiB))
# values that depend on timing or on how much the job copied before an event
TIMING_KEYS = {"len", "offset"}


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)


def ok(*argv: str) -> str:
    proc = run(*argv)
    assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def io_cmds(op: str, data: tuple[tuple[int, int, int], ...]) -> list[str]:
    return [a for p, off, n in data for a in ("-c", f"{op} -P {p:#x} {off} {n}")]


def expected_raw(path: Path) -> None:
    """Write the bytes the disk must hold after the scenario as a raw file."""
    buf = bytearray(SIZE)
    for pattern, off, n in FINAL:
        buf[off:off + n] = bytes([pattern]) * n
    path.write_bytes(buf)


def daemon_args(d: Path) -> list[str]:
    """Seed 000's -blockdev lines, an NBD server, the export and a second monitor for
    qmp-shell (a QMP chardev serves one client at a time)."""
    return [
        "--blockdev", f"node-name=file01,driver=file,aio=threads,filename={d}/base01.qcow2,"
                      "cache.direct=on,cache.no-flush=off",
        "--blockdev", "node-name=drive01,driver=qcow2,cache.direct=on,cache.no-flush=off,"
                      "file=file01",
        "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
        "--export", "type=nbd,id=exp01,node-name=drive01,name=drive01,writable=on",
        "--chardev", f"socket,path={d}/shell.sock,server=on,wait=off,id=m1",
        "--monitor", "chardev=m1",
    ]


def shell(d: Path, *commands: str) -> list[dict[str, Any]]:
    """Feed ``commands`` to qmp-shell on stdin; return the QMP replies it printed."""
    proc = subprocess.run([QMP_SHELL, str(d / "shell.sock")], input="\n".join(commands) + "\n",
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    replies: list[dict[str, Any]] = []
    text, dec = proc.stdout, json.JSONDecoder()
    pos = text.find("{")
    while pos != -1:
        obj, end = dec.raw_decode(text, pos)
        if "return" in obj or "error" in obj:
            replies.append(obj)
        pos = text.find("{", end)
    assert len(replies) == len(commands), proc.stdout
    return replies


def nbd_uri(d: Path) -> str:
    return f"nbd+unix:///drive01?socket={d}/nbd.sock"


async def scenario(sock: Path, d: Path) -> dict[str, Any]:
    """Run the seed scenario on one daemon; return its events, graphs and qmp-shell replies."""
    client = qmp.QMPClient("seed")
    await client.connect(str(sock))
    events: list[dict[str, Any]] = []
    out: dict[str, Any] = {"events": events, "graphs": []}
    quitting = False

    until = event_waiter(client, events, TIMEOUT)

    async def graph() -> list[tuple[Any, ...]]:
        shape = graph_shape(await client.execute("x-debug-query-block-graph"))
        out["graphs"].append(shape)
        return shape

    try:
        await graph()
        await client.execute("blockdev-snapshot-sync", {
            "node-name": "drive01", "snapshot-file": str(d / "overlay01.qcow2"),
            "snapshot-node-name": "over01", "format": "qcow2"})
        out["exports"] = await client.execute("query-block-exports")
        await graph()
        await asyncio.to_thread(ok, "qemu-io", "-f", "raw", *io_cmds("write", EXPORT_DATA),
                                nbd_uri(d))
        out["commit"] = await asyncio.to_thread(shell, d, "block-commit device=over01 "
                                                          "job-id=jobA")
        for _ in range(int(TIMEOUT / 0.1)):
            (jobs,) = await asyncio.to_thread(shell, d, "query-block-jobs")
            if jobs["return"] and jobs["return"][0]["ready"]:
                break
            await asyncio.sleep(0.1)
        out["ready-jobs"] = [{k: v for k, v in j.items() if k not in TIMING_KEYS}
                             for j in jobs["return"]]
        await graph()
        out["complete"] = await asyncio.to_thread(shell, d, "block-job-complete device=jobA")
        await until("JOB_STATUS_CHANGE", id="jobA", status="null")
        await graph()
        out["exports-after"] = await client.execute("query-block-exports")
        out["read"] = await asyncio.to_thread(
            run, "qemu-io", "-f", "raw", "-r", *io_cmds("read", FINAL), nbd_uri(d))
        await client.execute("block-export-del", {"id": "exp01"})
        await until("BLOCK_EXPORT_DELETED", id="exp01")
        quitting = True
        await client.execute("quit")
    except EOFError:
        if not quitting:
            raise
    finally:
        try:
            await client.disconnect()
        except EOFError:  # the daemon hung up after quit before the client let go
            if not quitting:
                raise
    return out


def masked(events: list[dict[str, Any]]) -> list[tuple[str, list[str], dict[str, Any]]]:
    """Event names, data keys and the data values that do not depend on timing."""
    return [(e["event"], sorted(e["data"]),
             {k: v for k, v in e["data"].items() if k not in TIMING_KEYS}) for e in events]


def test_seed_scenario_like_qsd(tmp_path: Path) -> None:
    raw = tmp_path / "expected.raw"
    expected_raw(raw)
    results = {}
    for who, start in (("qsd", qsd), ("qblock", qblock)):
        d = tmp_path / who
        d.mkdir()
        ok("qemu-img", "create", "-f", "qcow2", str(d / "base01.qcow2"), str(SIZE))
        ok("qemu-io", "-f", "qcow2", *io_cmds("write", BASE_DATA), str(d / "base01.qcow2"))
        argv, sock = start(d, *daemon_args(d))
        with running(argv, sock) as proc:
            results[who] = asyncio.run(scenario(sock, d))
            assert proc.wait(timeout=TIMEOUT) == 0  # quit: a clean exit
    ref, got = results["qsd"], results["qblock"]

    for res in (ref, got):
        before, snap, ready, after = res["graphs"]
        assert before == after  # the single qcow2 again: export -> drive01 -> file01
        assert [(p[0], c[0], name) for p, c, name, *_ in after] == [
            ("", "drive01", "root"), ("drive01", "file01", "file")]
        assert {(p[0], c[0], name) for p, c, name, *_ in snap} == {
            ("", "over01", "root"), ("over01", "#block", "file"),
            ("over01", "drive01", "backing"), ("drive01", "file01", "file")}
        # while READY: the commit filter (#block) is the export's root above over01, and
        # jobA holds main node, source and target (block/mirror.c, commit_top)
        assert {(p[0], c[0], name) for p, c, name, *_ in ready} == {
            ("", "#block", "root"), ("", "drive01", "root"), ("#block", "over01", "backing"),
            ("drive01", "file01", "file"), ("jobA", "#block", "main node"),
            ("jobA", "drive01", "target"), ("jobA", "over01", "source"),
            ("over01", "#block", "file"), ("over01", "drive01", "backing")}
        assert res["ready-jobs"][0]["ready"] is True
        ready_ev = next(e["data"] for e in res["events"] if e["event"] == "BLOCK_JOB_READY")
        assert ready_ev["len"] == ready_ev["offset"] > 0
        assert [e["node-name"] for e in res["exports"]] == ["over01"]
        assert [e["node-name"] for e in res["exports-after"]] == ["drive01"]
        assert res["commit"] == [{"return": {}}] and res["complete"] == [{"return": {}}]
        assert res["read"].returncode == 0, res["read"].stdout + res["read"].stderr
        assert "Pattern verification failed" not in res["read"].stdout
    assert masked(got["events"]) == masked(ref["events"])
    assert [e["event"] for e in ref["events"]] == [
        "JOB_STATUS_CHANGE", "JOB_STATUS_CHANGE", "JOB_STATUS_CHANGE", "BLOCK_JOB_READY",
        "JOB_STATUS_CHANGE", "JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE",
        "JOB_STATUS_CHANGE", "BLOCK_EXPORT_DELETED"]
    for g_ref, g_got in zip(ref["graphs"], got["graphs"], strict=True):
        assert g_got == g_ref
    assert got["ready-jobs"] == ref["ready-jobs"]

    for who in ("qsd", "qblock"):
        base = tmp_path / who / "base01.qcow2"
        ok("qemu-img", "check", str(base))
        ok("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(base), str(raw))
        read = ok("qemu-io", "-f", "qcow2", "-r", *io_cmds("read", FINAL), str(base))
        assert "Pattern verification failed" not in read
