"""blockdev-mirror in-process, with a writer (a BlockBackend on the source, playing the
export) that keeps writing while the job copies and after READY.

Content is checked against a bytearray model through the BlockBackend and, after the images
are closed, with the real qemu-img (compare against a raw copy of the model, check clean).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings

import qblock
from qblock.block.node import registry
from test_job_commit import SIZE, WRITES, Env, run


async def add_target(env: Env, backing: str | None = None, size: int = SIZE) -> None:
    run("qemu-img", "create", "-f", "qcow2", str(env.d / "tgt.qcow2"), str(size))
    await env.ok("blockdev-add", {"driver": "qcow2", "node-name": "tgt01", "backing": backing,
                                  "file": {"driver": "file",
                                           "filename": str(env.d / "tgt.qcow2")}})


def statuses(env: Env) -> list[str]:
    return [e["data"]["status"] for e in env.events if e["event"] == "JOB_STATUS_CHANGE"]


@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=WRITES)
def test_mirror_with_concurrent_writes_loses_nothing(tmp_path: Path, writes: list[Any]) -> None:
    """sync=full from over01 (backing drive01): writes before, during the copy (speed
    limited) and after READY all reach the target; complete pivots the writer onto it."""
    d = Path(tempfile.mkdtemp(dir=tmp_path))

    async def scenario() -> None:
        env = Env(d)
        await env.setup()
        try:
            await env.snapshot("over01", "drive01")
            await env.write(2 << 20, b"\x5a" * (2 << 20))
            await add_target(env)
            half = len(writes) // 2
            await env.ok("blockdev-mirror", {"job-id": "jobM", "device": "over01",
                                             "target": "tgt01", "sync": "full",
                                             "speed": 16 << 20})
            for off, length, pat in writes[:half]:  # while the job copies
                await env.write(off, bytes([pat]) * length)
            assert (await env.ok("query-jobs"))[0]["status"] == "running"
            await env.wait_event("BLOCK_JOB_READY")
            for off, length, pat in writes[half:]:  # mirrored after READY
                await env.write(off, bytes([pat]) * length)
            await env.ok("job-complete", {"id": "jobM"})
            await env.wait_gone("jobM")
            assert statuses(env) == ["created", "running", "ready", "waiting", "pending",
                                     "concluded", "null"]
            done = [e["data"] for e in env.events if e["event"] == "BLOCK_JOB_COMPLETED"]
            assert done[0]["type"] == "mirror" and "error" not in done[0]
            assert done[0]["offset"] == done[0]["len"] >= SIZE
            assert env.blk is not None and env.blk.node.node_name == "tgt01"
            assert registry.lookup("over01") is None  # snapshot-sync's overlay: no user left
            assert bytes(await env.blk.pread(0, SIZE)) == bytes(env.model)
        finally:
            await env.close()
        env.verify("tgt.qcow2")
    qblock.run(scenario())


def test_soft_cancel_after_ready_leaves_source_and_a_consistent_copy(tmp_path: Path) -> None:
    """block-job-cancel of a READY mirror: COMPLETED (no error), the writer stays on the
    source, the target holds the source's content as of the cancel."""
    async def scenario() -> None:
        env = Env(tmp_path)
        await env.setup()
        try:
            await env.write(1 << 20, b"\x42" * 65536)
            await add_target(env)
            await env.ok("blockdev-mirror", {"job-id": "jobC", "device": "drive01",
                                             "target": "tgt01", "sync": "full"})
            await env.wait_event("BLOCK_JOB_READY")
            await env.write(3 << 20, b"\x43" * 4096)  # mirrored: the job is READY
            await env.ok("block-job-cancel", {"device": "jobC"})
            await env.wait_gone("jobC")
            assert [e["event"] for e in env.events if e["event"].startswith("BLOCK_JOB_")] \
                == ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"]
            assert env.blk is not None and env.blk.node.node_name == "drive01"
            graph = await env.ok("x-debug-query-block-graph")
            assert not any(n["type"] == "block-job" for n in graph["nodes"])
            assert not any(n["name"].startswith("#block") and n["type"] == "block-driver"
                           and "mirror" in str(n) for n in graph["nodes"])
        finally:
            await env.close()
        env.verify("tgt.qcow2")
        env.verify("base.qcow2")
    qblock.run(scenario())


def test_sync_top_pivots_onto_a_target_with_the_source_backing(tmp_path: Path) -> None:
    """sync=top copies only over01's own data; tgt01 (backing drive01) then reads the same."""
    async def scenario() -> None:
        env = Env(tmp_path)
        await env.setup()
        try:
            await env.snapshot("over01", "drive01")
            await env.write(3 << 20, b"\x77" * (256 << 10))
            await add_target(env, backing="drive01")
            await env.ok("blockdev-mirror", {"job-id": "jobT", "device": "over01",
                                             "target": "tgt01", "sync": "top",
                                             "granularity": 65536})
            ready = await env.wait_event("BLOCK_JOB_READY")
            assert ready["data"]["len"] == 256 << 10  # only the top layer was dirty
            await env.ok("job-complete", {"id": "jobT"})
            await env.wait_gone("jobT")
            assert env.blk is not None and env.blk.node.node_name == "tgt01"
            assert bytes(await env.blk.pread(0, SIZE)) == bytes(env.model)
        finally:
            await env.close()
        run("qemu-img", "rebase", "-u", "-b", str(tmp_path / "base.qcow2"), "-F", "qcow2",
            str(tmp_path / "tgt.qcow2"))
        env.verify("tgt.qcow2")
    qblock.run(scenario())


def test_size_mismatch_fails_the_job(tmp_path: Path) -> None:
    """mirror_run(): a target of another size ends the job with QEMU's error."""
    async def scenario() -> None:
        env = Env(tmp_path)
        await env.setup()
        try:
            await add_target(env, size=SIZE * 2)
            await env.ok("blockdev-mirror", {"job-id": "jobE", "device": "drive01",
                                             "target": "tgt01", "sync": "full"})
            await env.wait_gone("jobE")
            done = [e["data"] for e in env.events if e["event"] == "BLOCK_JOB_COMPLETED"]
            assert done[0]["error"] == "Source and target image have different sizes"
            assert env.blk is not None and env.blk.node.node_name == "drive01"
            assert not registry.find("tgt01").parents
        finally:
            await env.close()
    qblock.run(scenario())




def test_drive_mirror_existing_opens_the_target_backing_at_pivot(tmp_path: Path) -> None:
    """drive-mirror mode=existing, sync=top: the target is opened without backing, copies
    over01's own data, and opens its header's backing file (base) when it pivots."""
    async def scenario() -> None:
        env = Env(tmp_path)
        await env.setup()
        try:
            await env.snapshot("over01", "drive01")
            await env.write(1 << 20, b"\x31" * (128 << 10))
            run("qemu-img", "create", "-f", "qcow2", "-b", str(tmp_path / "base.qcow2"),
                "-F", "qcow2", str(tmp_path / "dm.qcow2"))
            await env.ok("drive-mirror", {"job-id": "jobD", "device": "over01",
                                          "target": str(tmp_path / "dm.qcow2"),
                                          "mode": "existing", "sync": "top",
                                          "node-name": "dm01"})
            assert registry.find("dm01").backing is None  # BDRV_O_NO_BACKING until pivot
            await env.wait_event("BLOCK_JOB_READY")
            await env.write(0, b"\x32" * 4096)
            await env.ok("job-complete", {"id": "jobD"})
            await env.wait_gone("jobD")
            dm = registry.find("dm01")
            assert env.blk is not None and env.blk.node is dm
            assert dm.backing is not None and dm.backing.node.filename == str(
                tmp_path / "base.qcow2")
            assert bytes(await env.blk.pread(0, SIZE)) == bytes(env.model)
        finally:
            await env.close()
        env.verify("dm.qcow2")
    qblock.run(scenario())


def test_drive_mirror_sync_none_backs_onto_the_source(tmp_path: Path) -> None:
    """sync=none copies only new writes; the created target backs onto the source."""
    async def scenario() -> None:
        env = Env(tmp_path)
        await env.setup()
        try:
            await env.ok("drive-mirror", {"job-id": "jobN", "device": "drive01",
                                          "target": str(tmp_path / "dn.qcow2"),
                                          "sync": "none", "node-name": "dn01"})
            ready = await env.wait_event("BLOCK_JOB_READY")
            assert ready["data"]["len"] == 0
            await env.write(2 << 20, b"\x71" * 8192)
            await env.ok("job-complete", {"id": "jobN"})
            await env.wait_gone("jobN")
            done = [e["data"] for e in env.events if e["event"] == "BLOCK_JOB_COMPLETED"]
            assert done[0]["len"] == 65536 and "error" not in done[0]
            dn = registry.find("dn01")
            assert env.blk is not None and env.blk.node is dn
            assert dn.backing is not None and dn.backing.node.node_name == "drive01"
            assert bytes(await env.blk.pread(0, SIZE)) == bytes(env.model)
        finally:
            await env.close()
        env.verify("dn.qcow2")
    qblock.run(scenario())
