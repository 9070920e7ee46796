"""blockdev-backup in-process: a BlockBackend on the source plays the guest and keeps writing
while the job runs.  After the images are closed the real qemu-img compares each target with
a raw copy of the source as it was when the job started, and checks it for corruption.
"""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qblock
from qblock.block.backend import BlockBackend
from qblock.block.dirty_bitmap import find_bitmap
from qblock.block.node import close_node, registry
from qblock.block.perm import Perm
from qmp_inprocess import Monitor

SIZE = 4 << 20
PERM_ALL_SHARED = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
CHUNK = 64 << 10
SPEED = 8 << 20  # a 4 MiB backup takes about 0.5 s: the writer's requests overlap it


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def qemu_io(image: str, *cmds: str) -> None:
    args = [a for c in cmds for a in ("-c", c)]
    assert run("qemu-io", "-f", "qcow2", *args, image).returncode == 0


class Env(Monitor):
    """src.qcow2 as node ``src`` with a guest BlockBackend on it, and a model of its content."""

    def __init__(self, d: Path, src_backing: str | None = None) -> None:
        self.d = d
        super().__init__()
        self.model = bytearray(SIZE)
        self.blk: BlockBackend | None = None
        self.rng = random.Random(5)
        self.writes_during_job = 0

    async def err(self, name: str, args: dict[str, Any]) -> str:
        reply = await self.q(name, args)
        assert "error" in reply, reply
        return str(reply["error"]["desc"])

    async def add(self, name: str, image: str, backing: bool = True) -> None:
        opts: dict[str, Any] = {"driver": "qcow2", "node-name": name,
                                "file": {"driver": "file", "filename": str(self.d / image)}}
        if not backing:
            opts["backing"] = None
        await self.ok("blockdev-add", opts)

    async def open_guest(self) -> None:
        self.blk = BlockBackend(registry.find("src"), Perm.CONSISTENT_READ | Perm.WRITE,
                                Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED)
        self.state.backends.append(self.blk)

    async def write(self, offset: int, data: bytes) -> None:
        assert self.blk is not None
        await self.blk.pwritev(offset, data)
        self.model[offset:offset + len(data)] = data

    async def random_writes(self, n: int) -> None:
        """Data writes, one in five a write-zeroes (it copies before it writes too)."""
        for _ in range(n):
            offset = self.rng.randrange(0, SIZE - CHUNK, 4096)
            length = self.rng.choice([512, 4096, 65536, 100000])
            length = min(length, SIZE - offset)
            if self.rng.randrange(5):
                await self.write(offset, bytes([self.rng.randrange(1, 256)]) * length)
            else:
                assert self.blk is not None
                await self.blk.pwrite_zeroes(offset, length)
                self.model[offset:offset + length] = bytes(length)

    async def writer_until(self, job: str, limit: int = 400) -> None:
        """Guest writes until ``job`` is gone (or ``limit`` writes)."""
        for _ in range(limit):
            if job not in self.state.jobs:
                return
            await self.random_writes(1)
            self.writes_during_job += 1
            await asyncio.sleep(0.002)

    async def wait_gone(self, job: str) -> None:
        async def poll() -> None:
            while job in self.state.jobs:
                await asyncio.sleep(0.005)
        await asyncio.wait_for(poll(), 20)

    def completed(self, job: str) -> dict[str, Any]:
        evs = [e for e in self.events if e["event"] in ("BLOCK_JOB_COMPLETED",
                                                         "BLOCK_JOB_CANCELLED")
               and e["data"]["device"] == job]
        assert len(evs) == 1, evs
        return evs[0]

    async def close(self) -> None:
        for blk in self.state.backends:
            await blk.close()
        for node in reversed(list(registry.nodes.values())):
            if not node.parents and not node.closed:
                await close_node(node)

    def compare(self, content: bytes, image: str) -> None:
        """qemu-img compare of ``image`` against ``content``; qemu-img check is clean."""
        raw = self.d / f"expect-{image}.raw"
        raw.write_bytes(content)
        cmp = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw),
                  str(self.d / image))
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        chk = run("qemu-img", "check", str(self.d / image))
        assert chk.returncode == 0, chk.stdout + chk.stderr


def make_source(env: Env, overlay: bool = False) -> None:
    """src.qcow2 with patterns; with ``overlay`` it sits on base.qcow2 (top-layer data only
    at 1M and 3M)."""
    d = env.d
    run("qemu-img", "create", "-f", "qcow2", str(d / "base.qcow2"), str(SIZE))
    qemu_io(str(d / "base.qcow2"), "write -P 0x11 0 2M", "write -P 0x22 2M 2M")
    env.model[:2 << 20] = b"\x11" * (2 << 20)
    env.model[2 << 20:] = b"\x22" * (2 << 20)
    if overlay:
        run("qemu-img", "create", "-f", "qcow2", "-b", str(d / "base.qcow2"), "-F", "qcow2",
            str(d / "src.qcow2"))
        qemu_io(str(d / "src.qcow2"), "write -P 0x33 1M 256k", "write -P 0x44 3M 64k")
        env.model[1 << 20:(1 << 20) + (256 << 10)] = b"\x33" * (256 << 10)
        env.model[3 << 20:(3 << 20) + (64 << 10)] = b"\x44" * (64 << 10)
    else:
        (d / "base.qcow2").rename(d / "src.qcow2")


@pytest.mark.parametrize("sync", ["full", "top", "none"])
def test_backup_is_point_in_time_while_guest_writes(tmp_path: Path, sync: str) -> None:
    """The target reads as the source did at the start, though the guest kept writing; the
    source holds every write.  top: the target backs onto base; none: onto the source."""
    env = Env(tmp_path)
    make_source(env, overlay=sync == "top")
    backing = {"full": None, "top": "base.qcow2", "none": "src.qcow2"}[sync]
    argv = ["qemu-img", "create", "-f", "qcow2", str(tmp_path / "tgt.qcow2"), str(SIZE)]
    if backing:
        argv[4:4] = ["-b", str(tmp_path / backing), "-F", "qcow2"]
    run(*argv)

    async def scenario() -> bytes:
        try:
            await env.add("src", "src.qcow2")
            await env.add("tgt", "tgt.qcow2", backing=False)
            await env.open_guest()
            start = bytes(env.model)
            await env.ok("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                             "sync": sync, "speed": SPEED,
                                             "filter-node-name": "cbw"})
            nodes = {n["node-name"] for n in await env.ok("query-named-block-nodes")}
            assert "cbw" in nodes
            assert env.blk is not None and env.blk.node.node_name == "cbw"
            if sync == "none":
                await env.random_writes(40)
                env.writes_during_job = 40
                await env.ok("block-job-cancel", {"device": "b"})
            else:
                await env.writer_until("b")
            await env.wait_gone("b")
            done = env.completed("b")
            assert env.blk.node.node_name == "src"
            assert registry.lookup("cbw") is None
            if sync == "none":
                assert done["event"] == "BLOCK_JOB_CANCELLED"
            else:
                assert done["event"] == "BLOCK_JOB_COMPLETED" and "error" not in done["data"]
                assert done["data"]["offset"] == done["data"]["len"]
            # a loaded machine slows the writer too; a couple of overlapping writes prove it
            assert env.writes_during_job >= 2
            return start
        finally:
            await env.close()

    start = qblock.run(scenario())
    assert start != bytes(env.model)
    env.compare(start, "tgt.qcow2")
    env.compare(bytes(env.model), "src.qcow2")
    if sync == "top":  # only the top layer's clusters (and the writes' old data) were copied
        m = json.loads(run("qemu-img", "map", "--output=json", str(tmp_path / "tgt.qcow2")).stdout)
        assert sum(e["length"] for e in m if e["depth"] == 0 and e["data"]) < SIZE


def test_incremental_backup_chain_restores_exact_content(tmp_path: Path) -> None:
    """full backup + bitmap-add in one transaction, writes, incremental, writes, incremental:
    full <- inc1 <- inc2 (qemu-img rebase -u) reads exactly as the source at inc2's start.
    Each incremental holds only the bitmap's dirty granules."""
    env = Env(tmp_path)
    make_source(env)
    for name in ("full", "inc1", "inc2"):
        run("qemu-img", "create", "-f", "qcow2", str(tmp_path / f"{name}.qcow2"), str(SIZE))

    async def scenario() -> list[tuple[bytes, int]]:
        points = []
        try:
            await env.add("src", "src.qcow2")
            await env.open_guest()
            await env.add("full", "full.qcow2")
            points.append((bytes(env.model), 0))
            await env.ok("transaction", {"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
                {"type": "blockdev-backup", "data": {"job-id": "j0", "device": "src",
                                                     "target": "full", "sync": "full",
                                                     "speed": SPEED}}]})
            bitmap = find_bitmap(registry.find("src"), "b0")
            assert bitmap is not None and bitmap.count() == 0  # b0 starts with the job
            await env.writer_until("j0", limit=20)
            await env.wait_gone("j0")
            for i, name in enumerate(("inc1", "inc2"), 1):
                await env.random_writes(10)
                dirty = bitmap.count()
                assert dirty > 0
                await env.add(name, f"{name}.qcow2")
                points.append((bytes(env.model), dirty))
                await env.ok("blockdev-backup", {"job-id": f"j{i}", "device": "src",
                                                 "target": name, "sync": "incremental",
                                                 "bitmap": "b0", "speed": SPEED})
                nodes = {n["node-name"]: n for n in await env.ok("query-named-block-nodes")}
                b0 = [b for b in nodes["src"]["dirty-bitmaps"] if b.get("name") == "b0"]
                assert b0[0]["busy"] is True and b0[0]["recording"] is False
                await env.writer_until(f"j{i}", limit=10)
                await env.wait_gone(f"j{i}")
                assert "error" not in env.completed(f"j{i}")["data"]
                assert not bitmap.busy and bitmap.recording
            return points
        finally:
            await env.close()

    points = qblock.run(scenario())
    assert all(0 < dirty < SIZE * 3 // 4 for _, dirty in points[1:])
    d = str(tmp_path)
    env.compare(points[0][0], "full.qcow2")
    assert run("qemu-img", "rebase", "-u", "-b", f"{d}/full.qcow2", "-F", "qcow2",
               f"{d}/inc1.qcow2").returncode == 0
    env.compare(points[1][0], "inc1.qcow2")
    assert run("qemu-img", "rebase", "-u", "-b", f"{d}/inc1.qcow2", "-F", "qcow2",
               f"{d}/inc2.qcow2").returncode == 0
    env.compare(points[2][0], "inc2.qcow2")
    for name, (_, dirty) in zip(("inc1", "inc2"), points[1:]):
        m = json.loads(run("qemu-img", "map", "--output=json", f"{d}/{name}.qcow2").stdout)
        allocated = sum(e["length"] for e in m if e["depth"] == 0 and e["present"])
        # the dirty granules, plus old data that guest writes during the job pushed out
        assert dirty <= allocated < SIZE


@pytest.mark.parametrize("mode,cancel,expect", [
    ("on-success", False, "new"), ("on-success", True, "old|new"),
    ("never", False, "old|new"), ("always", False, "new"), ("always", True, "new|uncopied")])
def test_bitmap_sync_modes(tmp_path: Path, mode: str, cancel: bool, expect: str) -> None:
    """backup_cleanup_sync_bitmap(): what the sync bitmap holds after the job."""
    env = Env(tmp_path)
    make_source(env)
    run("qemu-img", "create", "-f", "qcow2", str(tmp_path / "tgt.qcow2"), str(SIZE))

    async def scenario() -> None:
        try:
            await env.add("src", "src.qcow2")
            await env.add("tgt", "tgt.qcow2")
            await env.open_guest()
            await env.ok("block-dirty-bitmap-add", {"node": "src", "name": "b",
                                                    "granularity": 65536})
            await env.write(0, b"\x01" * 65536 * 40)  # old: granules 0..39
            bitmap = find_bitmap(registry.find("src"), "b")
            assert bitmap is not None
            await env.ok("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                             "sync": "bitmap", "bitmap": "b",
                                             "bitmap-mode": mode, "speed": 8 << 20})
            assert "is currently in use" in await env.err("block-dirty-bitmap-clear",
                                                          {"node": "src", "name": "b"})
            await env.write(60 * 65536, b"\x02" * 65536)  # new: granule 60
            job = env.state.jobs["j"]
            if cancel:
                await asyncio.sleep(0.02)
                await env.ok("block-job-cancel", {"device": "j"})
            await env.wait_gone("j")
            bits = set((bitmap.bool_array().nonzero()[0]).tolist())
            old, new = set(range(40)), {60}
            if expect == "new":
                assert bits == new
            elif expect == "old|new":
                assert bits == old | new
            else:
                assert new < bits and bits - new <= old and bits - new
                assert job.progress_current < job.progress_total
        finally:
            await env.close()

    qblock.run(scenario())


def test_backup_argument_errors_match_qemu(tmp_path: Path) -> None:
    """The messages of qemu-storage-daemon 7.2 for the same requests."""
    env = Env(tmp_path)
    make_source(env)
    run("qemu-img", "create", "-f", "qcow2", str(tmp_path / "tgt.qcow2"), str(SIZE))
    run("qemu-img", "create", "-f", "qcow2", str(tmp_path / "big.qcow2"), str(2 * SIZE))

    async def scenario() -> None:
        try:
            await env.add("src", "src.qcow2")
            await env.add("tgt", "tgt.qcow2")
            await env.add("big", "big.qcow2")
            base = {"job-id": "j", "device": "src", "target": "tgt"}
            cases = [
                ({"device": "nosuch", "sync": "full"},
                 "Cannot find device='nosuch' nor node-name='nosuch'"),
                ({"target": "src", "sync": "full"}, "Source and target cannot be the same"),
                ({"target": "big", "sync": "full"},
                 "Source and target image have different sizes"),
                ({"sync": "bitmap"}, "must provide a valid bitmap name for 'bitmap' sync mode"),
                ({"sync": "full", "bitmap": "nob"}, "Bitmap 'nob' could not be found"),
                ({"sync": "full", "bitmap-mode": "always"},
                 "Cannot specify bitmap sync mode without a bitmap"),
            ]
            for extra, msg in cases:
                assert await env.err("blockdev-backup", {**base, **extra}) == msg
            await env.ok("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
            cases = [
                ({"sync": "full", "bitmap": "b0"},
                 "Bitmap sync mode must be given when providing a bitmap"),
                ({"sync": "incremental", "bitmap": "b0", "bitmap-mode": "always"},
                 "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
                ({"sync": "none", "bitmap": "b0", "bitmap-mode": "never"},
                 "sync mode 'none' does not produce meaningful bitmap outputs"),
                ({"job-id": "", "sync": "full"}, "Invalid job ID ''"),
            ]
            for extra, msg in cases:
                assert await env.err("blockdev-backup", {**base, **extra}) == msg
            assert registry.lookup("src") is not None and not registry.find("src").parents
            await env.ok("blockdev-backup", {**base, "sync": "none"})
            assert await env.err("blockdev-backup", {**base, "job-id": "k", "sync": "none"}) \
                == "Node 'tgt' is busy: block device is in use by block job: backup"
            await env.ok("block-job-cancel", {"device": "j"})
            await env.wait_gone("j")
        finally:
            await env.close()

    qblock.run(scenario())


WRITES = st.lists(st.tuples(st.integers(0, (1 << 20) - 1), st.integers(1, 200_000),
                            st.integers(1, 255), st.integers(0, 3)), min_size=1, max_size=25)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=WRITES, cluster_count=st.integers(1, 16))
def test_backup_property_target_is_the_start_state(tmp_path_factory: pytest.TempPathFactory,
                                                  writes: list[tuple[int, int, int, int]],
                                                  cluster_count: int) -> None:
    """Any guest writes, interleaved with the job's copying (each after 0-3 loop turns), on
    raw files: the target equals the source's start state, the source the model of it."""
    size = 1 << 20
    d = tmp_path_factory.mktemp("prop")
    start = bytes(random.Random(cluster_count).randbytes(size))
    (d / "src.raw").write_bytes(start)
    (d / "tgt.raw").write_bytes(bytes(size))
    model = bytearray(start)

    async def scenario() -> bytes:
        env_q = Env(d)
        state = env_q.state
        blk = None
        try:
            for name in ("src", "tgt"):
                await env_q.ok("blockdev-add", {"driver": "raw", "node-name": name, "file": {
                    "driver": "file", "filename": str(d / f"{name}.raw")}})
            blk = BlockBackend(registry.find("src"), Perm.CONSISTENT_READ | Perm.WRITE,
                               Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED)
            # the speed lets roughly cluster_count clusters through per 100 ms slice
            await env_q.ok("blockdev-backup", {"job-id": "p", "device": "src", "target": "tgt",
                                               "sync": "full", "speed": cluster_count * 655360})
            for offset, length, byte, turns in writes:
                length = min(length, size - offset)
                await blk.pwritev(offset, bytes([byte]) * length)
                model[offset:offset + length] = bytes([byte]) * length
                for _ in range(turns):
                    await asyncio.sleep(0)
            if "p" in state.jobs:  # the rest without the limit
                await env_q.ok("block-job-set-speed", {"device": "p", "speed": 0})
            while "p" in state.jobs:
                await asyncio.sleep(0.005)
            tgt = BlockBackend(registry.find("tgt"), Perm.CONSISTENT_READ, PERM_ALL_SHARED)
            out = bytes(await tgt.pread(0, size))
            await tgt.close()
            return out
        finally:
            if blk is not None:
                await blk.close()
            for node in reversed(list(registry.nodes.values())):
                if not node.parents and not node.closed:
                    await close_node(node)

    assert qblock.run(scenario()) == start
    assert (d / "src.raw").read_bytes() == bytes(model)
