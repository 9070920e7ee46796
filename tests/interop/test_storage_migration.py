"""Storage migration on one machine: daemon A mirrors a live disk into daemon B's NBD export.

Daemon A serves the disk to a writer (qemu-io over NBD) while a blockdev-mirror copies it to a
node of driver ``nbd`` that points at daemon B's export.  The writer keeps writing during the
copy and after READY; job-complete pivots A's export onto the remote node.  After both daemons
shut down, B's image must equal the writer's model, byte for byte (qemu-img compare), and be
clean (qemu-img check).
"""
from __future__ import annotations

import asyncio
import random
import subprocess
import threading
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from daemon_tools import qblock, running

pytestmark = pytest.mark.interop
SIZE = 16 << 20
CHUNK = 64 << 10


def _run(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"
    return res.stdout


def _writes(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [f"write -q -P {rng.randrange(1, 256)} {rng.randrange(SIZE // CHUNK) * CHUNK} {CHUNK}"
            for _ in range(count)]


def _apply(target: str, fmt: str, commands: list[str]) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    _run(*argv, target)


async def _events_until(client: QMPClient, name: str) -> None:
    async for event in client.events:
        if event["event"] == name:
            return


def test_mirror_live_disk_to_another_daemon(tmp_path: Path) -> None:
    src, dst, model = tmp_path / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "model.raw"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(src), str(SIZE))
    _apply(str(src), "qcow2", _writes(1, 64))
    _run("qemu-img", "convert", "-O", "raw", str(src), str(model))
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(dst), str(SIZE))
    nbd_a, nbd_b = tmp_path / "a-nbd.sock", tmp_path / "b-nbd.sock"
    argv_b, qmp_b = qblock(tmp_path, "--blockdev", f"driver=file,node-name=f,filename={dst}",
                           "--blockdev", "driver=qcow2,node-name=dst,file=f",
                           "--nbd-server", f"addr.type=unix,addr.path={nbd_b}",
                           "--export", "type=nbd,id=eb,node-name=dst,name=dst,writable=on",
                           name="b.sock")
    argv_a, qmp_a = qblock(tmp_path, "--blockdev", f"driver=file,node-name=f,filename={src}",
                           "--blockdev", "driver=qcow2,node-name=src,file=f",
                           "--nbd-server", f"addr.type=unix,addr.path={nbd_a}",
                           "--export", "type=nbd,id=ea,node-name=src,name=src,writable=on",
                           name="a.sock")
    during, after = _writes(2, 40), _writes(3, 20)
    uri = f"nbd+unix:///src?socket={nbd_a}"

    async def migrate() -> list[str]:
        client = QMPClient("migration")
        await client.connect(str(qmp_a))
        try:
            await client.execute("blockdev-add", {
                "driver": "nbd", "node-name": "remote", "export": "dst",
                "server": {"type": "unix", "path": str(nbd_b)}})
            await client.execute("blockdev-mirror", {
                "job-id": "mig", "device": "src", "target": "remote", "sync": "full",
                "speed": 8 << 20})
            writer = threading.Thread(target=_apply, args=(uri, "raw", during))
            writer.start()
            statuses = [j["status"] for j in await client.execute("query-jobs")]
            await asyncio.wait_for(_events_until(client, "BLOCK_JOB_READY"), 60)
            await asyncio.to_thread(writer.join)
            await asyncio.to_thread(_apply, uri, "raw", after)  # mirrored synchronously now
            await client.execute("job-complete", {"id": "mig"})
            await asyncio.wait_for(_events_until(client, "BLOCK_JOB_COMPLETED"), 60)
            graph = await client.execute("x-debug-query-block-graph")
            names = {n["name"] for n in graph["nodes"]}
            assert "remote" in names and "mig" not in names  # the export now uses B's disk
            await client.execute("quit")
            return statuses
        finally:
            try:
                await client.disconnect()
            except EOFError:
                pass  # the daemon closed the socket after quit, as QEMU does

    with running(argv_b, qmp_b) as proc_b:
        with running(argv_a, qmp_a) as proc_a:
            statuses = asyncio.run(migrate())
            assert proc_a.wait(timeout=30) == 0
        assert statuses == ["running"]  # the writer started while the copy was running
        proc_b.terminate()
        assert proc_b.wait(timeout=30) == 0
    _apply(str(model), "raw", during + after)
    assert "Images are identical." in _run("qemu-img", "compare", str(dst), str(model))
    _run("qemu-img", "check", str(dst))
