"""qcow2 allocations in flight: the data of a whole-cluster allocating write is written without
the driver lock (qcow2_co_pwritev_task()); overlapping requests wait for it (l2meta
dependencies), and the caller learns when the allocation is done (io.write_allocated).

Checked with the real qemu-img: content (qemu-img compare against a raw model) and a clean
qemu-img check (no cluster allocated twice, nothing leaked).
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import qblock
from qblock import api
from qblock.block import io
from qblock.drivers.base import ReqFlags
from tests.interop.qemu_tools import check, compare, create, requires_qemu

pytestmark = [pytest.mark.interop, requires_qemu]

CS = 65536


def _pattern(byte: int, clusters: int) -> bytes:
    return bytes([byte]) * (clusters * CS)


async def _overlapping(path: Path, later: str) -> None:
    """Write A (clusters 0-15) and, while A's data is in flight, ``later`` over 8-23."""
    options = api.image_options(str(path))
    options["discard"] = "unmap"
    disk = await qblock.open_async(options)
    drv = disk.node.drv
    a_allocated = asyncio.Event()

    async def write_a() -> None:
        token = io.write_allocated.set(a_allocated.set)
        try:
            await disk.write(0, _pattern(0xAA, 16))
        finally:
            io.write_allocated.reset(token)

    async def write_b() -> None:
        await a_allocated.wait()
        assert drv.allocs_in_flight, "A's data write should still be in flight"
        if later == "write":
            await disk.write(8 * CS, _pattern(0xBB, 16))
        elif later == "zeroes":
            await disk.write_zeroes(8 * CS, 16 * CS)
        else:
            await disk.discard(8 * CS, 16 * CS)

    try:
        await asyncio.gather(write_a(), write_b())
        assert not drv.allocs_in_flight
    finally:
        await disk.close()


@pytest.mark.parametrize("later", ["write", "zeroes", "discard"])
def test_request_overlapping_an_allocation_in_flight_waits(tmp_path: Path, later: str) -> None:
    """The later request lands after A whole: its bytes win on the overlap, no double
    allocation or leak."""
    img = tmp_path / "t.qcow2"
    create(img, 32 * CS, cluster_size=CS)
    qblock.run(_overlapping(img, later))
    model = bytearray(32 * CS)
    model[:16 * CS] = _pattern(0xAA, 16)
    if later == "write":
        model[8 * CS:24 * CS] = _pattern(0xBB, 16)
    else:
        model[8 * CS:24 * CS] = bytes(16 * CS)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    assert compare(raw, img, fmt_a="raw").returncode == 0
    result = check(img)
    assert result.clean, str(result)


async def _hook_calls(path: Path) -> list[tuple[int, bool]]:
    """For a fresh and then an in-place write: which called the hook, and whether its
    allocation was still in flight (data not yet linked) at that moment."""
    disk = await qblock.open_async(str(path))
    calls: list[tuple[int, bool]] = []
    try:
        for i in range(2):
            def hook(i: int = i) -> None:
                calls.append((i, bool(disk.node.drv.allocs_in_flight)))

            token = io.write_allocated.set(hook)
            try:
                await disk.write(0, _pattern(0x11 * (i + 1), 4))
            finally:
                io.write_allocated.reset(token)
        st = await disk.block_status(0, 4 * CS)
        assert st.pnum == 4 * CS
    finally:
        await disk.close()
    return calls


def test_allocation_hook_only_for_allocating_writes(tmp_path: Path) -> None:
    """The hook runs once for the write that allocates, while its data is in flight, and not
    for the rewrite in place."""
    img = tmp_path / "h.qcow2"
    create(img, 8 * CS, cluster_size=CS)
    assert qblock.run(_hook_calls(img)) == [(0, True)]
    assert check(img).clean


async def _compressed_write_hook_calls(path: Path) -> int:
    """A compressed write whose first cluster does not shrink (stored as is, through the
    allocating path) and whose other clusters do: how often the hook ran."""
    disk = await qblock.open_async(str(path))
    calls = 0

    def hook() -> None:
        nonlocal calls
        calls += 1

    token = io.write_allocated.set(hook)
    try:
        data = os.urandom(CS) + _pattern(0x33, 3)
        await disk.blk.pwritev(0, data, ReqFlags.WRITE_COMPRESSED)
    finally:
        io.write_allocated.reset(token)
        await disk.close()
    return calls


def test_compressed_write_does_not_report_an_early_allocation(tmp_path: Path) -> None:
    """The hook means "the whole request is allocated": a compressed request whose first
    cluster is stored uncompressed must not fire it while its other clusters still have to be
    placed (in-order convert -c would let the next chunk take their place)."""
    img = tmp_path / "c.qcow2"
    create(img, 8 * CS, cluster_size=CS)
    assert qblock.run(_compressed_write_hook_calls(img)) == 0
    assert check(img).clean
