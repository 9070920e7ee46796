"""External snapshot and block-commit in-process, with writes arriving while the job runs.

The daemon cannot be written to over QMP without an NBD export, so here a BlockBackend on the
active node plays the export (as qemu-storage-daemon's seed scenario has one).  Content is
checked against a bytearray model and, after the images are closed, with the real qemu-img
(compare against a raw copy of the model, check for leaks and corruption).
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qblock
from qblock.block.backend import BlockBackend
from qblock.block.node import close_node, registry
from qblock.block.perm import Perm
from qmp_inprocess import Monitor

DATA = Path(__file__).parent.parent / "data" / "qmp-7.2"
SIZE = 4 << 20
EXPORT_PERM = Perm.CONSISTENT_READ | Perm.WRITE
EXPORT_SHARED = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


class Env(Monitor):
    """base.qcow2 (0x11 in the first MiB) as drive01 on file01, a BlockBackend on drive01."""

    def __init__(self, d: Path) -> None:
        self.d = d
        super().__init__()
        self.model = bytearray(SIZE)
        self.model[:1 << 20] = b"\x11" * (1 << 20)
        run("qemu-img", "create", "-f", "qcow2", str(d / "base.qcow2"), str(SIZE))
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(d / "base.qcow2"))
        self.blk: BlockBackend | None = None

    async def setup(self) -> None:
        await self.ok("blockdev-add", {"driver": "file", "node-name": "file01",
                                       "filename": str(self.d / "base.qcow2")})
        await self.ok("blockdev-add", {"driver": "qcow2", "node-name": "drive01",
                                       "file": "file01"})
        self.blk = BlockBackend(registry.find("drive01"), EXPORT_PERM, EXPORT_SHARED)
        self.state.backends.append(self.blk)

    async def snapshot(self, name: str, below: str) -> None:
        await self.ok("blockdev-snapshot-sync", {
            "node-name": below, "snapshot-file": str(self.d / f"{name}.qcow2"),
            "snapshot-node-name": name})

    async def write(self, offset: int, data: bytes) -> None:
        assert self.blk is not None
        await self.blk.pwritev(offset, data)
        self.model[offset:offset + len(data)] = data

    async def wait_event(self, name: str, timeout: float = 10) -> dict[str, Any]:
        async def poll() -> dict[str, Any]:
            while True:
                for ev in self.events:
                    if ev["event"] == name:
                        return ev
                await asyncio.sleep(0.005)
        return await asyncio.wait_for(poll(), timeout)

    async def wait_gone(self, job: str) -> None:
        async def poll() -> None:
            while job in self.state.jobs:
                await asyncio.sleep(0.005)
        await asyncio.wait_for(poll(), 10)

    async def close(self) -> None:
        for blk in self.state.backends:
            await blk.close()
        for node in reversed(list(registry.nodes.values())):
            if not node.parents and not node.closed:
                await close_node(node)

    def verify(self, image: str) -> None:
        """The image, read by qemu-img, equals the model; qemu-img check is clean."""
        (self.d / "model.raw").write_bytes(bytes(self.model))
        cmp = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(self.d / "model.raw"),
                  str(self.d / image))
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        chk = run("qemu-img", "check", str(self.d / image))
        assert chk.returncode == 0, chk.stdout + chk.stderr


def graph_shape(graph: dict[str, Any]) -> list[Any]:
    names = {n["id"]: ("#block" if n["name"].startswith("#block") else n["name"], n["type"])
             for n in graph["nodes"]}
    return sorted([names[e["parent"]], names[e["child"]], e["name"], sorted(e["perm"]),
                   sorted(e["shared-perm"])] for e in graph["edges"])


def test_snapshot_sync_graph_equals_qsd_seed(tmp_path: Path) -> None:
    """Seed 000: root -> over01, over01 file -> #blockNNN, over01 backing -> drive01 (ro)."""
    async def scenario() -> None:
        env = Env(tmp_path)
        await env.setup()
        try:
            await env.snapshot("over01", "drive01")
            graph = await env.ok("x-debug-query-block-graph")
            ref = json.loads((DATA / "03-x-debug-query-block-graph.json").read_text())["return"]
            assert graph_shape(graph) == graph_shape(ref)
            nodes = {n["node-name"]: n for n in await env.ok("query-named-block-nodes")}
            assert nodes["drive01"]["ro"] is True and nodes["over01"]["ro"] is False
            assert nodes["over01"]["image"]["backing-filename"] == str(tmp_path / "base.qcow2")
            assert env.blk is not None and env.blk.node.node_name == "over01"
        finally:
            await env.close()
    qblock.run(scenario())


async def active_commit(env: Env, writes: list[tuple[int, int, int]], speed: int) -> None:
    """snapshot, writes, block-commit (active), writes during copy and READY, complete."""
    await env.snapshot("over01", "drive01")
    await env.write(2 << 20, b"\x5a" * (2 << 20))  # at ``speed``, copying this takes a while
    half = len(writes) // 2
    for off, length, pat in writes[:half // 2]:
        await env.write(off, bytes([pat]) * length)
    await env.ok("block-commit", {"device": "over01", "job-id": "jobA", "speed": speed})
    for off, length, pat in writes[half // 2:half]:  # while the job copies
        await env.write(off, bytes([pat]) * length)
    assert (await env.ok("query-jobs"))[0]["status"] == "running"
    await env.wait_event("BLOCK_JOB_READY")
    for off, length, pat in writes[half:]:  # mirrored after READY
        await env.write(off, bytes([pat]) * length)
    assert (await env.ok("query-jobs"))[0]["status"] == "ready"
    await env.ok("job-complete", {"id": "jobA"})
    await env.wait_gone("jobA")
    assert env.blk is not None and env.blk.node.node_name == "drive01"
    assert not env.blk.node.read_only
    assert registry.lookup("over01") is None  # the overlay was dropped
    assert bytes(await env.blk.pread(0, SIZE)) == bytes(env.model)


WRITES = st.lists(st.tuples(st.integers(0, SIZE // 512 - 128).map(lambda s: s * 512),
                            st.integers(1, 128).map(lambda n: n * 512),
                            st.integers(1, 255)), min_size=4, max_size=24)


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=WRITES)
def test_active_commit_with_concurrent_writes_matches_model(tmp_path: Path,
                                                            writes: list[Any]) -> None:
    d = Path(tempfile.mkdtemp(dir=tmp_path))

    async def scenario() -> None:
        env = Env(d)
        await env.setup()
        try:
            await active_commit(env, writes, speed=8 << 20)
            statuses = [e["data"]["status"] for e in env.events
                        if e["event"] == "JOB_STATUS_CHANGE"]
            assert statuses == ["created", "running", "ready", "waiting", "pending",
                                "concluded", "null"]
        finally:
            await env.close()
        env.verify("base.qcow2")
    qblock.run(scenario())


def test_intermediate_commit_keeps_the_overlay_reading_the_same(tmp_path: Path) -> None:
    """drive01 <- mid01 <- over01: commit mid01 into drive01 at a limited speed while the
    overlay is written; base gets mid's data, over01 now backs onto base (header too)."""
    async def scenario() -> None:
        env = Env(tmp_path)
        await env.setup()
        try:
            await env.snapshot("mid01", "drive01")
            await env.write(1 << 20, b"\x33" * (1 << 20))
            base_model = bytearray(env.model)
            await env.snapshot("over01", "mid01")
            await env.ok("block-commit", {"device": "over01", "job-id": "jobI",
                                          "top-node": "mid01", "base-node": "drive01",
                                          "speed": 16 << 20})
            graph = graph_shape(await env.ok("x-debug-query-block-graph"))
            assert [("jobI", "block-job"), ("drive01", "block-driver"), "base", [],
                    ["consistent-read", "resize", "write", "write-unchanged"]] in graph
            await env.write(1536 << 10, b"\x44" * 65536)  # into over01, not into base
            await env.wait_gone("jobI")
            done = [e for e in env.events if e["event"] == "BLOCK_JOB_COMPLETED"]
            assert done[0]["data"]["len"] == SIZE and "error" not in done[0]["data"]
            assert registry.lookup("mid01") is None
            over = registry.find("over01")
            assert over.backing is not None and over.backing.node.node_name == "drive01"
            assert registry.find("drive01").read_only
            assert bytes(await env.blk.pread(0, SIZE)) == bytes(env.model)  # type: ignore
        finally:
            await env.close()
        info = json.loads(run("qemu-img", "info", "--output=json",
                              str(tmp_path / "over01.qcow2")).stdout)
        assert info["backing-filename"] == str(tmp_path / "base.qcow2")
        assert info["backing-filename-format"] == "qcow2"
        env.model = base_model
        env.verify("base.qcow2")
    qblock.run(scenario())


@pytest.mark.parametrize("how", ["force", "soft-after-ready"])
def test_cancel_active_commit_keeps_the_overlay(tmp_path: Path, how: str) -> None:
    """A forced cancel (job-cancel) ends with CANCELLED; a soft cancel of a READY job with
    COMPLETED and no pivot.  Either way the BlockBackend stays on over01 with its data."""
    async def scenario() -> None:
        env = Env(tmp_path)
        await env.setup()
        try:
            await env.snapshot("over01", "drive01")
            await env.write(2 << 20, b"\x22" * (2 << 20))
            speed = 1 << 20 if how == "force" else 0
            await env.ok("block-commit", {"device": "over01", "job-id": "jobA",
                                          "speed": speed})
            if how == "force":
                await asyncio.sleep(0.05)
                assert (await env.ok("query-jobs"))[0]["status"] == "running"
                await env.ok("job-cancel", {"id": "jobA"})
                expect = "BLOCK_JOB_CANCELLED"
            else:
                await env.wait_event("BLOCK_JOB_READY")
                await env.ok("block-job-cancel", {"device": "jobA"})
                expect = "BLOCK_JOB_COMPLETED"
            await env.wait_gone("jobA")
            assert [e["event"] for e in env.events if e["event"].startswith("BLOCK_JOB_")
                    and e["event"] != "BLOCK_JOB_READY"] == [expect]
            assert env.blk is not None and env.blk.node.node_name == "over01"
            assert registry.find("drive01").read_only
            graph = graph_shape(await env.ok("x-debug-query-block-graph"))
            assert not any(edge[0][1] == "block-job" for edge in graph)
            await env.write(0, b"\x55" * 4096)
            assert bytes(await env.blk.pread(0, SIZE)) == bytes(env.model)
        finally:
            await env.close()
        env.verify("over01.qcow2")
    qblock.run(scenario())
