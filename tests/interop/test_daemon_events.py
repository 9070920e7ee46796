"""Events: BLOCK_WRITE_THRESHOLD fired by qcow2 metadata writes, as qemu-storage-daemon fires it.

Growing a qcow2 node with block_resize makes the driver write a larger L1 table past the end of
its file; a write threshold on the file node then fires.  The same script runs on the real
qemu-storage-daemon (whose socket chardev serves one client at a time) and on qblock daemon,
where a second, idle client must receive the event too.
"""
from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from daemon_tools import qblock, qsd, running

pytestmark = pytest.mark.interop

SEED = ("--blockdev", "node-name=file01,driver=file,filename={img}",
        "--blockdev", "node-name=drive01,driver=qcow2,file=file01")


async def _connect(sock: Path) -> QMPClient:
    client = QMPClient("events-test")
    await client.connect(str(sock))
    return client


async def _threshold_event(sock: Path, listeners: int) -> list[dict[str, Any]]:
    """Set a threshold on file01, grow drive01; return the event as each client saw it."""
    clients = [await _connect(sock) for _ in range(listeners)]
    try:
        queues = [c.events for c in clients]  # each client's default event listener
        main = clients[0]
        await main.execute("block-set-write-threshold",
                           {"node-name": "file01", "write-threshold": 200000})
        await main.execute("block_resize", {"node-name": "drive01", "size": 100 << 30})
        seen = []
        for listener in queues:
            event = await asyncio.wait_for(listener.get(), timeout=10)
            seen.append(dict(event))
        info = await main.execute("query-named-block-nodes", {"flat": True})
        file01 = next(n for n in info if n["node-name"] == "file01")
        assert file01["write_threshold"] == 0  # the threshold disarms after firing
        return seen
    finally:
        for c in clients:
            await c.disconnect()


def _image(tmp: Path, name: str) -> Path:
    path = tmp / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    return path


def test_write_threshold_event_like_qsd(tmp_path: Path) -> None:
    ref_img, our_img = _image(tmp_path, "ref.qcow2"), _image(tmp_path, "our.qcow2")
    argv, sock = qsd(tmp_path, *(a.format(img=ref_img) for a in SEED))
    with running(argv, sock):
        (theirs,) = asyncio.run(_threshold_event(sock, 1))
    argv, sock = qblock(tmp_path, *(a.format(img=our_img) for a in SEED))
    with running(argv, sock):
        ours = asyncio.run(_threshold_event(sock, 2))
    assert theirs["event"] == "BLOCK_WRITE_THRESHOLD"
    for event in ours:
        assert event["event"] == theirs["event"]
        assert event["data"] == theirs["data"]  # same node, threshold and amount exceeded
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
    assert ours[0]["timestamp"] == ours[1]["timestamp"]  # one event, sent to every client
