"""The ``qemu:dirty-bitmap:NAME`` meta context: the incremental-backup pull workflow run against
``qblock daemon`` and the real qemu-storage-daemon 7.2 with the same QMP script, plus
``qblock nbd -B`` against ``qemu-nbd -B`` on a persistent qcow2 bitmap.

The script adds bitmap b0 to a qcow2 node, writes through a writable NBD export, freezes the
bitmap and exports it read-only with ``bitmaps: [b0]``.  ``nbdinfo --map=qemu:dirty-bitmap:b0``
must list exactly the written ranges (at the bitmap's 64 KiB granularity) on both daemons, and
copying those ranges (qemu-img dd from the export, qemu-io write into a copy taken before the
writes) must reproduce the source (qemu-img compare).  QEMU's errors for exported bitmaps
(unknown, enabled on a read-only export, busy while exported) must match qsd's word for word.
"""
from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon_tools import env, qblock, qsd, running, wait_for_socket
from qblock.block.dirty_bitmap import DirtyBitmap
from qblock.exports.nbd.server import _bitmap_extents

qmp = pytest.importorskip("qemu.qmp")
needs_qemu = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-storage-daemon", "qemu-img", "qemu-io",
                                          "nbdinfo", "qemu-nbd")),
    reason="qemu-storage-daemon, qemu-img, qemu-io, qemu-nbd and nbdinfo are needed")
TIMEOUT = 30
KiB, MiB = 1024, 1024 * 1024
GRAN = 64 * KiB
WRITES = ["write -P 0x5a 65k 4k", "write -P 0x66 1M 200k", "write -z 3M 64k"]
# the 64 KiB bitmap clusters those writes touch
DIRTY = [(64 * KiB, 64 * KiB), (1 * MiB, 256 * KiB), (3 * MiB, 64 * KiB)]


def run(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"
    return res.stdout


def make_image(path: Path) -> None:
    run("qemu-img", "create", "-f", "qcow2", str(path), "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 2M", "-c", "write -P 0x22 3M 1M",
        str(path))


def nbd_url(sock: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def dirty_map(url: str, bitmap: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map``: (offset, length, flags) of each extent."""
    out = run("nbdinfo", f"--map=qemu:dirty-bitmap:{bitmap}", url)
    return [tuple(int(x) for x in line.split()[:3]) for line in out.splitlines()]


def dirty_ranges(extents: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    return [(off, n) for off, n, flags in extents if flags & 1]


def pull(url: str, ranges: list[tuple[int, int]], target: Path, tmp: Path) -> None:
    """Copy each range from the export into the raw ``target`` with the QEMU tools."""
    chunk = tmp / "chunk.raw"
    for off, n in ranges:
        chunk.unlink(missing_ok=True)
        # qemu-img dd counts the skipped blocks in count=
        run("qemu-img", "dd", "-f", "raw", "-O", "raw", f"bs={GRAN}", f"skip={off // GRAN}",
            f"count={(off + n) // GRAN}", f"if={url}", f"of={chunk}")
        run("qemu-io", "-f", "raw", "-c", f"write -q -s {chunk} {off} {n}", str(target))


def meta_context_replies(sock: Path, export: str, queries: list[str]) -> bytes:
    """Raw handshake: STRUCTURED_REPLY then SET_META_CONTEXT; every reply byte after the
    greeting (context ids included)."""
    def option(opt: int, payload: bytes) -> bytes:
        return struct.pack(">QII", 0x49484156454F5054, opt, len(payload)) + payload

    def string(text: str) -> bytes:
        return struct.pack(">I", len(text)) + text.encode()

    payload = string(export) + struct.pack(">I", len(queries)) + b"".join(map(string, queries))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        f = s.makefile("rb")
        f.read(18)
        s.sendall(struct.pack(">I", 3) + option(8, b"") + option(10, payload) + option(2, b""))
        return f.read()


def error_script() -> list[tuple[str, dict[str, Any]]]:
    add = {"type": "nbd", "node-name": "disk", "writable": False}
    return [
        ("block-export-add", {**add, "id": "e1", "name": "e1", "bitmaps": ["nope"]}),
        ("block-export-add", {**add, "id": "e2", "name": "e2",
                              "bitmaps": [{"node": "disk", "name": "nope"}]}),
        ("block-export-add", {**add, "id": "e3", "name": "e3",
                              "bitmaps": [{"node": "nonode", "name": "b0"}]}),
        ("block-dirty-bitmap-add", {"node": "disk", "name": "live"}),
        ("block-export-add", {**add, "id": "e4", "name": "e4", "bitmaps": ["live"]}),
        # a bitmap exported is busy: no removal, clear, or second user
        ("block-dirty-bitmap-remove", {"node": "disk", "name": "b0"}),
        ("block-dirty-bitmap-clear", {"node": "disk", "name": "b0"}),
        ("nbd-server-add", {"device": "disk", "name": "e5", "bitmap": "b0"}),
        ("nbd-server-add", {"device": "disk", "name": "e6", "bitmap": "nope"}),
        ("query-block-exports", {}),
        ("block-export-del", {"id": "bk"}),
        ("block-dirty-bitmap-remove", {"node": "disk", "name": "b0"}),
    ]


async def drive(qmp_sock: Path, nbd_sock: Path, tmp: Path) -> dict[str, Any]:
    client = qmp.QMPClient("test")
    await client.connect(str(qmp_sock))
    out: dict[str, Any] = {"errors": []}
    ex = client.execute
    loop = asyncio.get_running_loop()
    try:
        await ex("block-dirty-bitmap-add", {"node": "disk", "name": "b0"})
        await ex("block-export-add", {"type": "nbd", "id": "w", "node-name": "disk",
                                      "name": "w", "writable": True})
        argv = ["qemu-io", "-f", "raw"] + [a for w in WRITES for a in ("-c", w)]
        await loop.run_in_executor(None, run, *argv, nbd_url(nbd_sock, "w"))
        await ex("block-export-del", {"id": "w"})
        await ex("block-dirty-bitmap-disable", {"node": "disk", "name": "b0"})
        await ex("block-export-add", {"type": "nbd", "id": "bk", "node-name": "disk",
                                      "name": "bk", "bitmaps": ["b0"]})
        url = nbd_url(nbd_sock, "bk")
        out["meta"] = await loop.run_in_executor(
            None, meta_context_replies, nbd_sock, "bk",
            ["qemu:dirty-bitmap:b0", "base:allocation", "qemu:allocation-depth"])
        out["map"] = await loop.run_in_executor(None, dirty_map, url, "b0")
        out["contexts"] = await loop.run_in_executor(
            None, lambda: [line.strip() for line in run("nbdinfo", "--list", "--content",
                                                        url).splitlines()
                           if line.strip().startswith(("base:", "qemu:"))])
        target = tmp / "target.raw"
        await loop.run_in_executor(None, pull, url, dirty_ranges(out["map"]), target, tmp)
        await loop.run_in_executor(None, run, "qemu-img", "compare", "-f", "raw", "-F", "raw",
                                   str(target), url)
        for name, args in error_script():
            try:
                out["errors"].append(await ex(name, args))
            except qmp.ExecuteError as e:
                out["errors"].append((e.error_class, str(e)))
    finally:
        await client.disconnect()
    return out


def daemon_args(tmp: Path, image: Path) -> list[str]:
    return ["--blockdev", f"driver=file,filename={image},node-name=file0",
            "--blockdev", "driver=qcow2,file=file0,node-name=disk",
            "--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'}"]


@needs_qemu
def test_incremental_pull_matches_qsd(tmp_path: Path) -> None:
    results = {}
    for kind, make in (("qsd", qsd), ("qblock", qblock)):
        d = tmp_path / kind
        d.mkdir()
        image = d / "disk.qcow2"
        make_image(image)
        # the backup from before the bitmap existed: the pull brings it up to date
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(d / "target.raw"))
        argv, sock = make(d, *daemon_args(d, image))
        with running(argv, sock):
            results[kind] = asyncio.run(drive(sock, d / "nbd.sock", d))
    ours, theirs = results["qblock"], results["qsd"]
    assert dirty_ranges(ours["map"]) == DIRTY
    assert ours["map"] == theirs["map"]
    assert ours["map"][-1][0] + ours["map"][-1][1] == 4 * MiB
    assert ours["contexts"] == theirs["contexts"]
    assert struct.pack(">I", 2) + b"qemu:dirty-bitmap:b0" in ours["meta"]
    assert ours["meta"] == theirs["meta"]  # QEMU's context ids: base:allocation 0, bitmap 2
    assert "qemu:dirty-bitmap:b0" in ours["contexts"]
    assert ours["errors"] == theirs["errors"]
    assert any("is currently in use" in str(e) for e in ours["errors"])


@needs_qemu
def test_qblock_nbd_bitmap_matches_qemu_nbd(tmp_path: Path) -> None:
    """``-B`` and ``--export ...,bitmaps.0=``: a persistent bitmap recorded by qemu-io,
    served read-only."""
    image = tmp_path / "p.qcow2"
    make_image(image)
    run("qemu-img", "bitmap", "--add", str(image), "pb")
    run("qemu-io", "-f", "qcow2", *[a for w in WRITES for a in ("-c", w)], str(image))
    maps = {}
    for kind, argv in (("qemu-nbd", ["qemu-nbd"]),
                       ("qblock", [sys.executable, "-m", "qblock.cli.main", "nbd"])):
        sock = tmp_path / f"{kind}.sock"
        proc = subprocess.Popen([*argv, "-r", "-f", "qcow2", "-B", "pb", "-k", str(sock),
                                 str(image)], env=env(), stderr=subprocess.PIPE)
        try:
            wait_for_socket(sock, proc)
            maps[kind] = dirty_map(nbd_url(sock, ""), "pb")
        finally:
            proc.terminate()
            proc.wait(timeout=TIMEOUT)
            assert proc.stderr is not None
            proc.stderr.close()
    # the daemon's --export names it with keyval list syntax
    sock = tmp_path / "d.sock"
    argv, qmp_sock = qblock(tmp_path, "--blockdev",
                            f"driver=qcow2,node-name=disk,read-only=on,file.driver=file,"
                            f"file.filename={image}",
                            "--nbd-server", f"addr.type=unix,addr.path={sock}",
                            "--export", "nbd,id=e,node-name=disk,name=,bitmaps.0=pb")
    with running(argv, qmp_sock):
        wait_for_socket(sock)
        maps["daemon"] = dirty_map(nbd_url(sock, ""), "pb")
    assert dirty_ranges(maps["qblock"]) == DIRTY
    assert maps["qblock"] == maps["qemu-nbd"] == maps["daemon"]


@needs_qemu
def test_qblock_nbd_unknown_bitmap(tmp_path: Path) -> None:
    image = tmp_path / "u.qcow2"
    make_image(image)
    res = subprocess.run([sys.executable, "-m", "qblock.cli.main", "nbd", "-r", "-B", "zz", "-k",
                          str(tmp_path / "s"), str(image)], env=env(), capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert res.returncode == 1
    assert "Bitmap 'zz' is not found" in res.stderr


BM_SIZE = 300 * 512  # not a multiple of the granularity: the last bit is partial


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, BM_SIZE - 1), st.integers(1, 20000)), max_size=6),
       st.integers(0, BM_SIZE - 1), st.integers(1, BM_SIZE), st.sampled_from([1, 3, 1 << 20]))
def test_bitmap_extents_model(writes: list[tuple[int, int]], offset: int, length: int,
                              limit: int) -> None:
    """bitmap_to_extents() against a per-byte model: the extents tile the request from its
    offset, alternate clean/dirty, say dirty exactly where a set granule covers the byte,
    and stop at ``limit`` extents (REQ_ONE: one)."""
    length = min(length, BM_SIZE - offset)
    bitmap = DirtyBitmap("m", BM_SIZE, 4096)
    model = np.zeros(BM_SIZE, dtype=bool)
    for off, n in writes:
        n = min(n, BM_SIZE - off)
        bitmap.set_range(off, n)
        model[off // 4096 * 4096:-(-(off + n) // 4096) * 4096] = True
    extents = _bitmap_extents(bitmap, offset, length, limit)
    assert 0 < len(extents) <= limit
    pos = offset
    for i, (n, flags) in enumerate(extents):
        assert n > 0 and flags in (0, 1)
        assert (model[pos:pos + n] == bool(flags)).all()
        if i:
            assert flags != extents[i - 1][1]
        pos += n
    assert pos == offset + length or len(extents) == limit
    if pos < offset + length:
        assert model[pos] != bool(extents[-1][1])
