"""transaction in-process: all or nothing.  A failing action undoes the ones before it (bitmaps
added are gone, cleared bits come back, a created backup job and its filter vanish, an
appended overlay is taken out again) and its own error is the reply (QEMU 7.2's text)."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import qblock
from qblock.block.backend import BlockBackend
from qblock.block.dirty_bitmap import find_bitmap
from qblock.block.node import close_node, registry
from qblock.block.perm import Perm
from qmp_inprocess import Monitor

SIZE = 1 << 20


class Env(Monitor):
    def __init__(self, d: Path) -> None:
        self.d = d
        super().__init__()
        for name in ("src", "tgt"):
            subprocess.run(["qemu-img", "create", "-f", "qcow2", str(d / f"{name}.qcow2"),
                            str(SIZE)], check=True, capture_output=True)

    async def err(self, actions: list[dict[str, Any]], **props: Any) -> str:
        args: dict[str, Any] = {"actions": actions}
        if props:
            args["properties"] = props
        reply = await self.q("transaction", args)
        assert "error" in reply, reply
        assert reply["error"]["class"] == "GenericError"
        return str(reply["error"]["desc"])

    async def setup(self) -> None:
        for name in ("src", "tgt"):
            await self.ok("blockdev-add", {"driver": "qcow2", "node-name": name, "file": {
                "driver": "file", "filename": str(self.d / f"{name}.qcow2")}})

    async def graph(self) -> list[Any]:
        g = await self.ok("x-debug-query-block-graph")
        names = {n["id"]: n["name"] for n in g["nodes"]}
        return sorted((names[e["parent"]], names[e["child"]], e["name"]) for e in g["edges"])

    async def close(self) -> None:
        for node in reversed(list(registry.nodes.values())):
            if not node.parents and not node.closed:
                await close_node(node)


def add(name: str) -> dict[str, Any]:
    return {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": name}}


def test_failing_action_undoes_the_earlier_ones(tmp_path: Path) -> None:
    env = Env(tmp_path)

    async def scenario() -> None:
        await env.setup()
        try:
            src = registry.find("src")
            graph = await env.graph()
            assert await env.err([add("b1"), add("b1")]) == "Bitmap already exists: b1"
            assert find_bitmap(src, "b1") is None
            assert await env.err([add("b1"), {"type": "abort", "data": {}}]) == \
                "Transaction aborted using Abort action"
            assert find_bitmap(src, "b1") is None
            # a backup job created by the first action is cancelled, its filter dropped
            backup = {"type": "blockdev-backup", "data": {
                "job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                "filter-node-name": "cbw"}}
            assert await env.err([add("b1"), backup, {"type": "blockdev-backup", "data": {
                "job-id": "k", "device": "src", "target": "nosuch", "sync": "full"}}]) == \
                "Cannot find device='nosuch' nor node-name='nosuch'"
            assert find_bitmap(src, "b1") is None and "j" not in env.state.jobs
            assert registry.lookup("cbw") is None and await env.graph() == graph
            assert not any(e["event"] == "JOB_STATUS_CHANGE" and e["data"]["status"] ==
                           "running" for e in env.events)
            # cleared, disabled and merged bits come back; a removed bitmap stays
            await env.ok("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
            await env.ok("block-dirty-bitmap-add", {"node": "src", "name": "m"})
            b0 = find_bitmap(src, "b0")
            m = find_bitmap(src, "m")
            assert b0 is not None and m is not None
            b0.set_range(0, 65536)
            assert await env.err([
                {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "b0"}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "b0"}},
                {"type": "block-dirty-bitmap-merge", "data": {"node": "src", "target": "m",
                                                              "bitmaps": ["b0"]}},
                {"type": "block-dirty-bitmap-remove", "data": {"node": "src", "name": "b0"}},
                {"type": "block-dirty-bitmap-enable", "data": {"node": "src",
                                                               "name": "nosuch"}}]) == \
                "Dirty bitmap 'nosuch' not found"
            assert b0.count() == 65536 and b0.enabled and not b0.busy and m.count() == 0
            assert find_bitmap(src, "b0") is b0
            # the same actions succeed without the failing one
            await env.ok("transaction", {"actions": [
                {"type": "block-dirty-bitmap-merge", "data": {"node": "src", "target": "m",
                                                              "bitmaps": ["b0"]}},
                {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "b0"}},
                {"type": "block-dirty-bitmap-remove", "data": {"node": "src", "name": "b0"}}]})
            assert find_bitmap(src, "b0") is None and m.count() == 65536
            assert await env.err([add("b2")], **{"completion-mode": "grouped"}) == \
                "Action 'block-dirty-bitmap-add' does not support Transaction property " \
                "completion-mode = grouped"
            reply = await env.q("transaction", {"actions": [{"type": "nosuch", "data": {}}]})
            assert reply["error"]["desc"] == "Parameter 'type' does not accept value 'nosuch'"
            await env.ok("transaction", {"actions": []})
        finally:
            await env.close()

    qblock.run(scenario())


def test_snapshot_undone_when_a_later_action_fails(tmp_path: Path) -> None:
    """blockdev-snapshot-sync then abort: the guest is back on src, the overlay is gone, src
    writable again."""
    env = Env(tmp_path)

    async def scenario() -> None:
        await env.setup()
        guest = BlockBackend(registry.find("src"), Perm.CONSISTENT_READ | Perm.WRITE,
                             Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
        try:
            graph = await env.graph()
            snap = {"type": "blockdev-snapshot-sync", "data": {
                "node-name": "src", "snapshot-file": str(tmp_path / "over.qcow2"),
                "snapshot-node-name": "over"}}
            assert await env.err([snap, {"type": "abort", "data": {}}]) == \
                "Transaction aborted using Abort action"
            assert registry.lookup("over") is None and await env.graph() == graph
            assert registry.find("src").read_only is False and guest.node.node_name == "src"
            await guest.pwritev(0, b"\x01" * 512)
            await env.ok("transaction", {"actions": [snap, add("b1")]})
            over = registry.find("over")
            assert over.backing is not None and over.backing.node is registry.find("src")
            assert guest.node is over and registry.find("src").read_only is True
        finally:
            await guest.close()
            await env.close()

    qblock.run(scenario())
