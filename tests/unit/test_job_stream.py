"""block-stream in-process: drive01 <- mid01 <- over01 with a writer (a BlockBackend on the
active node) that keeps writing while the job copies.

The streamed image must read like the model through the writer and, once closed, to the real
qemu-img (compare against a raw copy of the model, check clean), with the backing file string
in its header rewritten.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import qblock
from qblock.block.node import BlockNode, registry
from qblock.drivers.base import ReqFlags, Status
from test_job_commit import SIZE, Env, graph_shape, run


async def chain(env: Env) -> None:
    """drive01 (0x11 at 0) <- mid01 (0x33 at 1M) <- over01 (0x44 at 3M)."""
    await env.snapshot("mid01", "drive01")
    await env.write(1 << 20, b"\x33" * (1 << 20))
    await env.snapshot("over01", "mid01")
    await env.write(3 << 20, b"\x44" * (256 << 10))


def header_backing(path: Path) -> str | None:
    info = json.loads(run("qemu-img", "info", "--output=json", str(path)).stdout)
    return info.get("backing-filename")


def test_stream_to_base_node_with_concurrent_writes(tmp_path: Path) -> None:
    """mid01's data goes into over01 at a limited speed while over01 is written; then
    over01 backs onto drive01 (header too) and mid01 is dropped."""
    async def scenario() -> None:
        env = Env(tmp_path)
        await env.setup()
        try:
            await chain(env)
            await env.ok("block-stream", {"job-id": "jobS", "device": "over01",
                                          "base-node": "drive01", "speed": 4 << 20})
            graph = graph_shape(await env.ok("x-debug-query-block-graph"))
            edges = {(e[0], e[1], e[2]) for e in graph}
            # the copy-on-read filter sits above over01, the job holds it and the chain
            assert (("#block", "block-driver"), ("over01", "block-driver"), "file") in edges
            assert (("jobS", "block-job"), ("#block", "block-driver"), "main node") in edges
            assert (("jobS", "block-job"), ("mid01", "block-driver"),
                    "intermediate node") in edges
            for off in (1 << 20, (1 << 20) + 300 * 1024, 0):  # during the copy
                await env.write(off, b"\x66" * 8192)
            assert (await env.ok("query-jobs"))[0]["status"] == "running"
            await env.wait_gone("jobS")
            done = [e["data"] for e in env.events if e["event"] == "BLOCK_JOB_COMPLETED"]
            assert done == [{"type": "stream", "device": "jobS", "len": SIZE, "offset": SIZE,
                             "speed": 4 << 20}]
            assert registry.lookup("mid01") is None
            over = registry.find("over01")
            assert over.backing is not None and over.backing.node.node_name == "drive01"
            assert env.blk is not None and env.blk.node is over
            assert bytes(await env.blk.pread(0, SIZE)) == bytes(env.model)
            graph = await env.ok("x-debug-query-block-graph")
            assert not any(n["type"] == "block-job" for n in graph["nodes"])
        finally:
            await env.close()
        assert header_backing(tmp_path / "over01.qcow2") == str(tmp_path / "base.qcow2")
        env.verify("over01.qcow2")
    qblock.run(scenario())


def test_stream_whole_chain_leaves_no_backing(tmp_path: Path) -> None:
    """Without base everything is copied; the image stands alone (no backing in the header)."""
    async def scenario() -> None:
        env = Env(tmp_path)
        await env.setup()
        try:
            await chain(env)
            await env.ok("block-stream", {"job-id": "jobS", "device": "over01"})
            await env.wait_gone("jobS")
            over = registry.find("over01")
            assert over.backing is None
            assert registry.lookup("mid01") is None
            assert registry.find("drive01").read_only
        finally:
            await env.close()
        assert header_backing(tmp_path / "over01.qcow2") is None
        env.verify("over01.qcow2")
    qblock.run(scenario())


def test_stream_into_a_read_only_intermediate_node(tmp_path: Path) -> None:
    """Streaming drive01 into mid01 (a read-only backing node) reopens it read-write for the
    job and read-only again after; over01 reads the same throughout."""
    async def scenario() -> None:
        env = Env(tmp_path)
        await env.setup()
        try:
            await chain(env)
            assert registry.find("mid01").read_only
            await env.ok("block-stream", {"job-id": "jobS", "device": "mid01"})
            await env.wait_gone("jobS")
            mid = registry.find("mid01")
            assert mid.read_only and mid.backing is None
            assert env.blk is not None
            assert bytes(await env.blk.pread(0, SIZE)) == bytes(env.model)
        finally:
            await env.close()
        chk = run("qemu-img", "check", str(tmp_path / "mid01.qcow2"))
        assert chk.returncode == 0, chk.stdout
        assert header_backing(tmp_path / "mid01.qcow2") is None
    qblock.run(scenario())


def slow_reads(node: BlockNode) -> None:
    """Widen the window between a read of ``node``'s data file and what follows it: a
    delay in the protocol driver below the part under test."""
    edge = node.file
    assert edge is not None
    drv = edge.node.drv
    read = drv.co_preadv

    async def slow(offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await asyncio.sleep(0.01)
        await read(offset, buf, flags)
    drv.co_preadv = slow  # type: ignore[method-assign]


def test_stream_with_racing_writes_matches_model(tmp_path: Path) -> None:
    """Writes race the copy-on-read of the job over the very ranges it copies (0..2M, held
    by base and mid): no stale backing data may land over new data."""
    async def scenario() -> None:
        env = Env(tmp_path)
        await env.setup()
        try:
            await chain(env)
            for name in ("drive01", "mid01"):  # the backing reads take a while
                slow_reads(registry.find(name))
            await env.ok("block-stream", {"job-id": "jobS", "device": "over01"})

            async def writer() -> None:
                n = 0
                while "jobS" in env.state.jobs:
                    off = (n * 12288) % (2 << 20)
                    await env.write(off, bytes([n % 251 + 1]) * 4096)
                    n += 1
            await asyncio.wait_for(asyncio.gather(writer(), env.wait_gone("jobS")), 20)
            assert registry.find("over01").backing is None
            assert env.blk is not None
            assert bytes(await env.blk.pread(0, SIZE)) == bytes(env.model)
        finally:
            await env.close()
        env.verify("over01.qcow2")
    qblock.run(scenario())


def test_stream_with_bottom_backing_file_and_named_filter(tmp_path: Path) -> None:
    """bottom=mid01 streams only mid01 (base keeps its data); the header records the given
    backing-file string; the filter takes filter-node-name; auto-finalize=false waits in
    PENDING until job-finalize."""
    async def scenario() -> None:
        env = Env(tmp_path)
        await env.setup()
        try:
            await chain(env)
            await env.ok("block-stream", {"job-id": "jobS", "device": "over01",
                                          "bottom": "mid01", "backing-file": "base.qcow2",
                                          "filter-node-name": "cor01",
                                          "auto-finalize": False})
            assert registry.find("cor01").drv.format_name == "copy-on-read"
            await env.wait_event("BLOCK_JOB_PENDING")
            assert registry.find("over01").backing.node.node_name == "mid01"  # type: ignore
            await env.ok("job-finalize", {"id": "jobS"})
            await env.wait_gone("jobS")
            assert registry.lookup("cor01") is None and registry.lookup("mid01") is None
            over = registry.find("over01")
            assert over.backing is not None and over.backing.node.node_name == "drive01"
            assert env.blk is not None
            assert bytes(await env.blk.pread(0, SIZE)) == bytes(env.model)
            # over01 holds mid's data now but not base's
            st = await env.blk.block_status(0, 1 << 20)
            assert not st.status & Status.ALLOCATED
        finally:
            await env.close()
        assert header_backing(tmp_path / "over01.qcow2") == "base.qcow2"
        env.verify("over01.qcow2")
    qblock.run(scenario())
