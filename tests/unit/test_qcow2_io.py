"""qcow2 data path against a bytearray model, checked afterwards by the real qemu-img.

Every scenario ends with ``qemu-img check`` (no corruption, no leak) and a comparison of what
QEMU reads from the image (``qemu-img convert -O raw``) with the model.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qblock
from qblock.block import io
from qblock.drivers.base import ReqFlags
from qblock.drivers.qcow2.create import create_image
from qblock.drivers.qcow2.header import Qcow2Header
from qblock.errors import ImageCorrupt, QBlockError

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None,
                                reason="qemu-img and qemu-io are not installed")
SIZE = 2 << 20


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def assert_qemu_agrees(path: Path, model: bytes | bytearray) -> None:
    """qemu-img check is clean and QEMU reads exactly ``model``."""
    chk = _run(QEMU_IMG or "", "check", "--output=json", str(path))
    assert chk.returncode == 0, chk.stdout + chk.stderr
    assert '"corruptions"' not in chk.stdout and '"leaks"' not in chk.stdout, chk.stdout
    raw = path.with_suffix(".raw")
    conv = _run(QEMU_IMG or "", "convert", "-O", "raw", str(path), str(raw))
    assert conv.returncode == 0, conv.stderr
    assert raw.read_bytes() == bytes(model)
    raw.unlink()


OPTION_SETS = [
    {},
    {"cluster_size": 512, "refcount_bits": 1},
    {"cluster_size": 4096, "refcount_bits": 64},
    {"extended_l2": True, "cluster_size": 16384},
    {"compat": "0.10"},
    {"lazy_refcounts": True, "cluster_size": 4096},
]

op = st.tuples(st.sampled_from(["write", "zero", "zero-unmap", "discard", "read"]),
               st.integers(0, SIZE - 1), st.sampled_from([1, 511, 512, 4096, 40000, 300000]),
               st.integers(0, 255))


def _apply(d: qblock.Disk, model: bytearray, ops: list[tuple[str, int, int, int]],
           cluster_size: int, discard_fill: bytes) -> None:
    for kind, off, length, byte in ops:
        length = min(length, SIZE - off)
        if kind == "write":
            data = bytes([byte]) * length
            d.write(off, data)
            model[off:off + length] = data
        elif kind.startswith("zero"):
            d.write_zeroes(off, length, may_unmap=kind == "zero-unmap")
            model[off:off + length] = bytes(length)
        elif kind == "discard":
            d.discard(off, length)
            start = -(-off // cluster_size) * cluster_size
            end = SIZE if off + length == SIZE else (off + length) // cluster_size * cluster_size
            if end > start:
                model[start:end] = discard_fill[start:end]
        else:
            assert d.read(off, length) == bytes(model[off:off + length])


@pytest.mark.parametrize("opts", OPTION_SETS)
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=25))
def test_random_ops_match_model(tmp_path: Path, opts: dict[str, Any],
                                ops: list[tuple[str, int, int, int]]) -> None:
    path = tmp_path / "t.qcow2"
    create_image(str(path), SIZE, **opts)
    model = bytearray(SIZE)
    with qblock.open(str(path)) as d:
        _apply(d, model, ops, opts.get("cluster_size", 65536), bytes(SIZE))
        assert d.read(0, SIZE) == bytes(model)
    assert_qemu_agrees(path, model)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("extended", [False, True])
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=20))
def test_backing_chain_matches_model(tmp_path: Path, compat: str, extended: bool,
                                     ops: list[tuple[str, int, int, int]]) -> None:
    if extended and compat == "0.10":
        return
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    base_data = bytearray(os.urandom(SIZE - 65536)) + bytes(65536)
    raw = tmp_path / "base.raw"
    raw.write_bytes(base_data[:SIZE - 100 * 1024])  # shorter than the overlay
    assert _run(QEMU_IMG or "", "convert", "-O", "qcow2", "-o", f"compat={compat}", str(raw),
                str(base)).returncode == 0
    base_data[SIZE - 100 * 1024:] = bytes(100 * 1024)
    create_image(str(top), SIZE, compat=compat, extended_l2=extended,
                 backing_file="base.qcow2", backing_fmt="qcow2")
    model = bytearray(base_data)
    # v3 discards read as zeroes; v2 ones fall back to the backing file (qcow2-cluster.c).
    fill = bytes(SIZE) if compat == "1.1" else bytes(base_data)
    with qblock.open(str(top)) as d:
        assert d.read(0, SIZE) == bytes(model)
        _apply(d, model, ops, 65536, fill)
    assert_qemu_agrees(top, model)
    assert _run(QEMU_IMG or "", "compare", "-f", "raw", str(raw), str(base)).returncode == 0


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_clusters(tmp_path: Path, ctype: str) -> None:
    raw = tmp_path / "src.raw"
    data = bytearray(b"compress me " * (SIZE // 12 + 1))[:SIZE]
    data[65536:131072] = os.urandom(65536)  # incompressible: stored normally
    raw.write_bytes(data)
    path = tmp_path / "c.qcow2"
    assert _run(QEMU_IMG or "", "convert", "-c", "-O", "qcow2", "-o",
                f"compression_type={ctype}", str(raw), str(path)).returncode == 0
    model = bytearray(data)
    with qblock.open(str(path)) as d:
        assert d.read(0, SIZE) == bytes(model)
        st_ = d.block_status(0, SIZE)
        assert st_.status & 0x80  # BDRV_BLOCK_COMPRESSED
        d.write(200000, b"x" * 5000)  # overwrite inside a compressed cluster
        model[200000:205000] = b"x" * 5000
        d.discard(262144, 65536)
        model[262144:327680] = bytes(65536)
        assert d.read(0, SIZE) == bytes(model)
    assert_qemu_agrees(path, model)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_writes(tmp_path: Path, ctype: str) -> None:
    path = tmp_path / "w.qcow2"
    create_image(str(path), SIZE + 4096, cluster_size=65536, compression_type=ctype)
    model = bytearray(SIZE + 4096)
    chunk = (b"qblock " * 10000)[:65536]

    async def go() -> None:
        disk = await qblock.open_async(str(path))
        try:
            node = disk.node
            for k in range(0, 8):
                await io.node_pwritev(node, k * 65536, memoryview(chunk),
                                      ReqFlags.WRITE_COMPRESSED)
                model[k * 65536:(k + 1) * 65536] = chunk
            rnd = os.urandom(65536)  # does not shrink: written as a normal cluster
            await io.node_pwritev(node, 8 * 65536, memoryview(rnd), ReqFlags.WRITE_COMPRESSED)
            model[8 * 65536:9 * 65536] = rnd
            tail = b"t" * 4096  # the short last cluster is zero-padded
            await io.node_pwritev(node, SIZE, memoryview(tail), ReqFlags.WRITE_COMPRESSED)
            model[SIZE:] = tail
        finally:
            await disk.close()

    qblock.run(go())
    assert_qemu_agrees(path, model)
    info = _run(QEMU_IMG or "", "check", str(path)).stdout
    assert "90.00% compressed clusters" in info  # 9 of the 10 allocated clusters


def test_internal_snapshot_clusters_are_copied_on_write(tmp_path: Path) -> None:
    path = tmp_path / "s.qcow2"
    create_image(str(path), SIZE, cluster_size=4096)
    first = os.urandom(SIZE)
    with qblock.open(str(path)) as d:
        d.write(0, first)
    assert _run(QEMU_IMG or "", "snapshot", "-c", "snap", str(path)).returncode == 0
    model = bytearray(first)
    with qblock.open(str(path)) as d:
        d.write(1000, b"A" * 100000)
        model[1000:101000] = b"A" * 100000
        d.write_zeroes(204800, 40960, may_unmap=True)
        model[204800:245760] = bytes(40960)
        d.discard(409600, 8192)
        model[409600:417792] = bytes(8192)
    assert_qemu_agrees(path, model)
    snap = tmp_path / "snap.raw"
    assert _run(QEMU_IMG or "", "convert", "-l", "snap", "-O", "raw", str(path),
                str(snap)).returncode == 0
    assert snap.read_bytes() == first


def test_concurrent_writes_to_one_cluster_allocate_once(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    create_image(str(path), SIZE)

    async def go() -> bytes:
        disk = await qblock.open_async(str(path))
        try:
            await asyncio.gather(*(disk.write(k * 4096, bytes([k + 1]) * 4096)
                                   for k in range(16)))
            return await disk.read(0, 65536)
        finally:
            await disk.close()

    got = qblock.run(go())
    model = bytearray(SIZE)
    model[:65536] = b"".join(bytes([k + 1]) * 4096 for k in range(16))
    assert got == bytes(model[:65536])
    assert_qemu_agrees(path, model)


def test_truncate_grow_hides_longer_backing_and_shrink(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    create_image(str(base), 4 << 20)
    with qblock.open(str(base)) as d:
        d.write(0, b"\xbb" * (4 << 20))
    create_image(str(top), 1 << 20, backing_file="base.qcow2", backing_fmt="qcow2")
    with qblock.open(str(top)) as d:
        d.write(0, b"\x11" * 4096)
        d.truncate(3 << 20)
        assert d.read(1 << 20, 4096) == bytes(4096)  # not the backing file's bytes
        d.write((3 << 20) - 512, b"\x22" * 512)
        d.truncate(2 << 20)
        assert d.size == 2 << 20
    model = bytearray(b"\xbb" * (1 << 20)) + bytes(1 << 20)
    model[:4096] = b"\x11" * 4096
    assert_qemu_agrees(top, model)


def test_overlapping_write_marks_image_corrupt(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.qcow2"
    create_image(str(path), SIZE, cluster_size=4096)
    with qblock.open(str(path)) as d:
        d.write(0, b"x" * 4096)
    raw = bytearray(path.read_bytes())
    h = Qcow2Header.parse(bytes(raw))
    l2 = struct.unpack_from(">Q", raw, h.l1_table_offset)[0] & 0x00FFFFFFFFFFFE00
    # Make guest cluster 0 point at the refcount table, with COPIED set.
    struct.pack_into(">Q", raw, l2, (1 << 63) | h.refcount_table_offset)
    path.write_bytes(raw)
    events: list[tuple[str, dict[str, Any]]] = []
    io.event_hook = lambda name, data: events.append((name, data))
    try:
        with qblock.open(str(path)) as d:
            with pytest.raises(ImageCorrupt):
                d.write(0, b"y" * 512)
            with pytest.raises(QBlockError):
                d.read(0, 512)
    finally:
        io.event_hook = None
    err = capsys.readouterr().err
    assert ("qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps "
            "with refcount table); further corruption events will be suppressed") in err
    assert events and events[0][0] == "BLOCK_IMAGE_CORRUPTED" and events[0][1]["fatal"]
    assert Qcow2Header.parse(path.read_bytes()).corrupt
    assert path.read_bytes()[h.refcount_table_offset:h.refcount_table_offset + 8] == \
        raw[h.refcount_table_offset:h.refcount_table_offset + 8]
    with pytest.raises(QBlockError, match="qcow2: Image is corrupt; cannot be opened "
                                          "read/write"):
        qblock.open(str(path))


def test_lazy_refcounts_dirty_image_is_repaired_on_open(tmp_path: Path) -> None:
    path = tmp_path / "l.qcow2"
    crashed = tmp_path / "crashed.qcow2"
    create_image(str(path), SIZE, lazy_refcounts=True)
    with qblock.open(str(path)) as d:
        d.write(0, b"z" * 300000)
        d.flush()
        shutil.copy(path, crashed)  # what a crash would leave behind
        assert Qcow2Header.parse(crashed.read_bytes()).dirty
    assert not Qcow2Header.parse(path.read_bytes()).dirty
    with qblock.open(str(crashed)) as d:
        d.write(300000, b"q" * 1000)
    model = bytearray(SIZE)
    model[:300000] = b"z" * 300000
    model[300000:301000] = b"q" * 1000
    assert not Qcow2Header.parse(crashed.read_bytes()).dirty
    assert_qemu_agrees(crashed, model)


def test_missing_backing_file_names_the_path(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    create_image(str(top), SIZE, backing_file="gone.qcow2", backing_fmt="qcow2")
    with pytest.raises(QBlockError) as e:
        qblock.open(str(top))
    assert str(e.value).startswith("Could not open backing file: ")
    assert "gone.qcow2" in str(e.value)
    with qblock.open({"driver": "qcow2", "backing": None, "node-name": "n",
                      "file": {"driver": "file", "filename": str(top)}}) as d:
        assert d.read(0, 512) == bytes(512)


def test_block_status_matches_qemu_map(tmp_path: Path) -> None:
    path = tmp_path / "m.qcow2"
    create_image(str(path), SIZE, cluster_size=4096)
    with qblock.open(str(path)) as d:
        d.write(0, b"a" * 20000)
        d.write_zeroes(65536, 8192)
        d.write(1 << 20, b"b" * 4096)
    qmap = _run(QEMU_IMG or "", "map", "--output=json", str(path)).stdout
    expected = [(e["start"], e["length"], e["present"], e["data"], e["zero"], e.get("offset"))
                for e in json.loads(qmap)]
    got: list[tuple[int, int, bool, bool, bool, int | None]] = []
    with qblock.open(str(path)) as d:
        pos = 0
        while pos < SIZE:
            s = d.block_status(pos, SIZE - pos)
            flags = (bool(s.status & 0x10), bool(s.status & 1), bool(s.status & 2))
            off = s.map if s.status & 4 else None
            if got and got[-1][2:5] == flags and (
                    off is None and got[-1][5] is None
                    or off is not None and got[-1][5] is not None
                    and got[-1][5] + got[-1][1] == off):
                prev = got.pop()
                got.append((prev[0], prev[1] + s.pnum, *flags, prev[5]))
            else:
                got.append((pos, s.pnum, *flags, off))
            pos += s.pnum
    assert got == expected


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=65536,extended_l2=on",
                                  "cluster_size=4096"])
def test_same_ops_give_qemus_map_and_file(tmp_path: Path, opts: str) -> None:
    """qemu-io and qblock doing the same writes and zero writes leave the same mapping, the
    same file length and the same holes in the file (COW of zeroes skipped like QEMU)."""
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    assert _run(QEMU_IMG or "", "create", "-f", "qcow2", "-o", opts, str(theirs),
                "4M").returncode == 0
    shutil.copy(theirs, ours)
    ops = [("write", 1000, 5000), ("write", 200000, 300000), ("zero", 1000, 70000),
           ("zero", 290000, 20000), ("zero-u", 1000000, 2000000), ("zero", 3500, 600),
           ("write", 4190000, 4304), ("zero", 4190000, 4304)]
    args = []
    for kind, off, length in ops:
        flag = {"write": "-P 7", "zero": "-z", "zero-u": "-z -u"}[kind]
        args += ["-c", f"write {flag} {off} {length}"]
    assert _run(QEMU_IO or "", *args, str(theirs)).returncode == 0
    with qblock.open(str(ours)) as d:
        for kind, off, length in ops:
            if kind == "write":
                d.write(off, b"\x07" * length)
            else:
                d.write_zeroes(off, length, may_unmap=kind == "zero-u")
    maps = [_run(QEMU_IMG or "", "map", "--output=json", str(p)).stdout for p in (theirs, ours)]
    assert maps[0] == maps[1]
    assert _run(QEMU_IMG or "", "compare", str(theirs), str(ours)).returncode == 0
    assert theirs.stat().st_size == ours.stat().st_size
    assert _data_extents(theirs) == _data_extents(ours)


def _data_extents(path: Path) -> list[tuple[int, int]]:
    """The file's data (non-hole) ranges, from SEEK_DATA/SEEK_HOLE."""
    extents = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, pos))
    finally:
        os.close(fd)
    return extents


def test_writable_open_marks_bitmaps_in_use(tmp_path: Path) -> None:
    path = tmp_path / "b.qcow2"
    create_image(str(path), SIZE)
    assert _run(QEMU_IMG or "", "bitmap", "--add", str(path), "b0").returncode == 0
    with qblock.open(str(path), read_only=True) as d:
        d.read(0, 512)
    info = json.loads(_run(QEMU_IMG or "", "info", "--output=json", str(path)).stdout)
    assert info["format-specific"]["data"]["bitmaps"][0]["flags"] == ["auto"]
    with qblock.open(str(path)) as d:
        d.write(0, b"w" * 4096)  # recorded in b0, which is stored on close
        info = json.loads(_run(QEMU_IMG or "", "info", "-U", "--output=json",
                               str(path)).stdout)
        assert info["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]
    info = json.loads(_run(QEMU_IMG or "", "info", "--output=json", str(path)).stdout)
    assert info["format-specific"]["data"]["bitmaps"][0]["flags"] == ["auto"]
    with qblock.open(str(path), read_only=True) as d:
        assert d.node.dirty_bitmaps[0].count() == 65536
    model = bytearray(SIZE)
    model[:4096] = b"w" * 4096
    assert_qemu_agrees(path, model)
