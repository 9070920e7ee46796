"""NBD server and export QMP commands: qemu-storage-daemon 7.2 and ``qblock daemon`` answer the
same script alike (replies, errors, safe and hard block-export-del with a client connected,
BLOCK_EXPORT_DELETED), and data written through each
export by qemu-io lands in the image."""
from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from typing import Any

from test_nbd_export import handshake
from test_qsd_side_by_side import (TIMEOUT, Daemon, check_allocation, compare,  # noqa: F401
                                   daemons, normalize)

Step = tuple[str, dict[str, Any] | None]


def script(d: str) -> list[Step]:
    export = {"type": "nbd", "id": "exp01", "node-name": "drive01", "writable": True}
    return [
        ("nbd-server-stop", None),
        ("block-export-add", export),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{d}/nbd.sock"}}}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{d}/nbd2.sock"}}}),
        ("block-export-add", export),
        ("block-export-add", export),
        ("block-export-add", {**export, "id": "exp02", "name": "drive01"}),
        ("block-export-add", {**export, "id": "exp03", "node-name": "nosuch"}),
        ("blockdev-add", {"driver": "null-co", "node-name": "ro01", "read-only": True}),
        ("block-export-add", {**export, "id": "exp04", "node-name": "ro01"}),
        ("block-export-add", {"type": "nbd", "id": "exp05", "node-name": "ro01",
                              "description": "null"}),
        ("query-block-exports", None),
        ("query-named-block-nodes", {"flat": True}),
        ("x-debug-query-block-graph", None),
        ("block-export-del", {"id": "nosuch"}),
        ("block-export-del", {"id": "exp05"}),
        ("nbd-server-remove", {"name": "nosuch"}),
        ("query-block-exports", None),
    ]


def test_nbd_commands_side_by_side(daemons: Callable[[], tuple[Daemon, Daemon]]) -> None:
    qsd, ours = daemons()

    async def main() -> list[str]:
        problems: list[str] = []
        for d in (qsd, ours):
            await d.connect()
        for i, ((name, args), (_, our_args)) in enumerate(zip(script(str(qsd.dir)),
                                                               script(str(ours.dir)))):
            # an image file's actual-size is checked against that file, not the other copy
            # (test_qsd_side_by_side: ext4's extent-tree blocks differ between copies)
            theirs = normalize(check_allocation(await qsd.execute(name, args),
                                                f"#{i} qsd {name}", problems), qsd.dir)
            mine = normalize(check_allocation(await ours.execute(name, our_args),
                                              f"#{i} qblock {name}", problems), ours.dir)
            compare(mine, theirs, f"#{i} {name}", problems)
        for d in (qsd, ours):
            proc = await asyncio.to_thread(
                subprocess.run, ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 2M 1M",
                                 f"nbd+unix:///drive01?socket={d.dir}/nbd.sock"],
                capture_output=True, text=True, timeout=TIMEOUT)
            assert proc.returncode == 0, proc.stderr
        infos = []
        for d in (qsd, ours):  # cache.direct=on: the request alignment shows as minimum
            out = await asyncio.to_thread(
                subprocess.run, ["nbdinfo", f"nbd+unix:///drive01?socket={d.dir}/nbd.sock"],
                capture_output=True, text=True, timeout=TIMEOUT)
            infos.append([line for line in out.stdout.splitlines() if "uri:" not in line])
        compare(infos[1], infos[0], "nbdinfo", problems)
        clients = [handshake(d.dir / "nbd.sock") for d in (qsd, ours)]
        for name, args in [("block-export-del", {"id": "exp01"}),
                           ("block-export-del", {"id": "exp01", "mode": "hard"}),
                           ("nbd-server-add", {"device": "drive01", "name": "d2"}),
                           ("query-block-exports", None),
                           ("nbd-server-remove", {"name": "d2"}),
                           ("nbd-server-stop", None),
                           ("query-block-exports", None)]:
            compare(await ours.execute(name, args), await qsd.execute(name, args),
                    name, problems)
        for client in clients:
            assert await asyncio.to_thread(client.recv, 100) == b""  # hard: disconnected
            client.close()
        await asyncio.sleep(0.5)
        deleted = []
        for d in (qsd, ours):
            ids = []
            while not d.client.events.empty():
                event = await d.client.events.get()
                if event["event"] == "BLOCK_EXPORT_DELETED":
                    ids.append(event["data"]["id"])
            deleted.append(sorted(ids))
        if deleted[0] != deleted[1]:
            problems.append(f"BLOCK_EXPORT_DELETED: qblock {deleted[1]} != qsd {deleted[0]}")
        for d in (qsd, ours):
            await d.quit()
        return problems

    problems = asyncio.run(main())
    assert not problems, "\n".join(problems)
    for d in (qsd, ours):
        out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 2M 1M",
                              str(d.dir / "test01.qcow2")], capture_output=True, text=True,
                             timeout=TIMEOUT)
        assert "read 1048576/1048576" in out.stdout, out.stdout + out.stderr
