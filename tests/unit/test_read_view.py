"""Read views (BlockBackend.read_view): a qcow2 image's data handed out as a view of the
file's cached pages instead of being copied, only where that is safe, and always the bytes a
read returns.

A view needs: one run of data clusters contiguous in the file, a read-only node whose file
nobody may resize (a shrunk mapping faults with SIGBUS), locks on, no O_DIRECT, and every page
in the page cache (a view must not stall the event loop on the disk).  Anything else gives
None, and the caller reads instead.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qblock import api, trace
from qblock.block.accounting import AcctType
from qblock.drivers.base import ReqFlags
from qblock.drivers.qcow2.create import create

CLUSTER = 65536
SIZE = 32 * CLUSTER
# cluster index -> what the image holds there: data, zero-flagged, compressed or nothing
LAYOUT = {0: "data", 1: "data", 2: "data", 3: "zero", 5: "data", 6: "compressed",
          8: "data", 9: "data"}


def _pattern(length: int, seed: int) -> bytes:
    return ((np.arange(length, dtype=np.uint32) * 13 + seed) % 253 + 1).astype(np.uint8).tobytes()


async def _make(path: Path) -> bytes:
    """A qcow2 image laid out as LAYOUT; returns its guest content."""
    await create(str(path), SIZE, cluster_size=CLUSTER)
    model = bytearray(SIZE)
    disk = await api.open_async(str(path), driver="qcow2")
    try:
        for cluster, kind in LAYOUT.items():
            off = cluster * CLUSTER
            data = _pattern(CLUSTER, cluster) if kind != "zero" else bytes(CLUSTER)
            if kind == "compressed":
                await disk.blk.pwritev(off, data, ReqFlags.WRITE_COMPRESSED)
            elif kind == "zero":
                await disk.write(off, _pattern(CLUSTER, 99))
                await disk.write_zeroes(off, CLUSTER)
            else:
                await disk.write(off, data)
            model[off:off + CLUSTER] = data
    finally:
        await disk.close()
    os.sync()
    return bytes(model)


async def _filled(path: Path, size: int, data: bytes, **create_args: str) -> None:
    """A new qcow2 image of ``size`` with ``data`` written at 0."""
    await create(str(path), size, cluster_size=CLUSTER, **create_args)
    disk = await api.open_async(str(path), driver="qcow2")
    try:
        await disk.write(0, data)
    finally:
        await disk.close()


def _drop_cache(path: Path) -> None:
    """Evict the file's clean pages (fadvise DONTNEED needs no privilege)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _warm(path: Path) -> None:
    path.read_bytes()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("view") / "img.qcow2"
    return path, asyncio.run(_make(path))


async def _view(path: Path, offset: int, length: int, **open_args: object) -> bytes | None:
    disk = await api.open_async(str(path), driver="qcow2", **open_args)
    try:
        stats = disk.blk.stats
        ops, nbytes = stats.nr_ops[AcctType.READ], stats.nr_bytes[AcctType.READ]
        view = await disk.blk.read_view(offset, length)
        data = None if view is None else bytes(view)
        del view
        # a view is a read in the statistics, a refusal is not
        assert stats.nr_ops[AcctType.READ] - ops == (0 if data is None else 1)
        assert stats.nr_bytes[AcctType.READ] - nbytes == (0 if data is None else length)
        return data
    finally:
        await disk.close()


def test_data_clusters_come_as_a_view_of_the_cached_file(image: tuple[Path, bytes]) -> None:
    path, model = image
    _warm(path)
    got = asyncio.run(_view(path, 100, 3 * CLUSTER - 200, read_only=True))
    assert got == model[100:3 * CLUSTER - 100]


@pytest.mark.parametrize(("cluster", "count"), [(3, 1), (4, 1), (6, 1), (2, 2), (9, 2)],
                         ids=["zero", "unallocated", "compressed", "data-then-zero",
                              "data-then-unallocated"])
def test_no_view_unless_all_of_it_is_data(image: tuple[Path, bytes], cluster: int,
                                          count: int) -> None:
    path, _ = image
    _warm(path)
    assert asyncio.run(_view(path, cluster * CLUSTER, count * CLUSTER, read_only=True)) is None


def test_no_view_of_clusters_apart_in_the_file(image: tuple[Path, bytes]) -> None:
    """Clusters 5 and 8 are data but lie in the file wherever they were allocated."""
    path, _ = image
    _warm(path)
    assert asyncio.run(_view(path, 8 * CLUSTER, 2 * CLUSTER, read_only=True)) is not None
    assert asyncio.run(_view(path, 1 * CLUSTER, 1 * CLUSTER, read_only=True)) is not None
    assert asyncio.run(_view(path, 4 * CLUSTER, 2 * CLUSTER, read_only=True)) is None


@pytest.mark.parametrize("open_args", [{"read_only": False}, {"read_only": True, "share": True},
                                       {"read_only": True, "cache_direct": True}],
                         ids=["writable", "force-share", "O_DIRECT"])
def test_no_view_where_the_file_may_change_under_it(image: tuple[Path, bytes],
                                                    open_args: dict[str, bool]) -> None:
    """Writable, -U (others may resize: a view past the new end faults with SIGBUS) or
    O_DIRECT: reads only."""
    path, _ = image
    _warm(path)
    assert asyncio.run(_view(path, 0, CLUSTER, **open_args)) is None


def test_no_view_without_locks(image: tuple[Path, bytes]) -> None:
    """locking=off: nothing keeps another process from shrinking the file under a view."""
    path, _ = image
    _warm(path)

    async def view() -> memoryview | None:
        disk = await api.open_async({"driver": "qcow2", "file": {
            "driver": "file", "filename": str(path), "locking": "off"}}, read_only=True)
        try:
            return await disk.blk.read_view(0, CLUSTER)
        finally:
            await disk.close()

    assert asyncio.run(view()) is None
    assert asyncio.run(_view(path, 0, CLUSTER, read_only=True)) is not None


def test_no_view_of_pages_not_in_the_page_cache(tmp_path: Path) -> None:
    """The last of 64 data clusters: far from the metadata that opening the image reads
    (and the kernel's readahead around it)."""
    path = tmp_path / "big.qcow2"

    asyncio.run(_filled(path, 64 * CLUSTER, _pattern(64 * CLUSTER, 5)))
    last = 63 * CLUSTER
    _drop_cache(path)
    assert asyncio.run(_view(path, last, CLUSTER, read_only=True)) is None
    _warm(path)
    assert asyncio.run(_view(path, last, CLUSTER, read_only=True)) == \
        _pattern(64 * CLUSTER, 5)[last:]


def test_a_raw_file_shares_resize_so_gives_no_view(tmp_path: Path) -> None:
    """A raw node is a filter: its backend shares resize with other processes."""
    path = tmp_path / "disk.raw"
    path.write_bytes(_pattern(CLUSTER, 1))

    async def view() -> memoryview | None:
        disk = await api.open_async(str(path), driver="raw", read_only=True)
        try:
            return await disk.blk.read_view(0, CLUSTER)
        finally:
            await disk.close()

    assert asyncio.run(view()) is None


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, SIZE - 1), st.integers(1, 4 * CLUSTER))
def test_a_view_holds_what_a_read_returns(image: tuple[Path, bytes], offset: int,
                                          length: int) -> None:
    """Against the model: any range the image has, viewed or not, read back the same."""
    path, model = image
    length = min(length, SIZE - offset)
    _warm(path)

    async def both() -> tuple[bytes | None, bytes]:
        disk = await api.open_async(str(path), driver="qcow2", read_only=True)
        try:
            view = await disk.blk.read_view(offset, length)
            viewed = None if view is None else bytes(view)
            del view
            return viewed, await disk.read(offset, length)
        finally:
            await disk.close()

    viewed, read = asyncio.run(both())
    assert read == model[offset:offset + length]
    assert viewed is None or viewed == read
    clusters = {LAYOUT.get(c)
                for c in range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1)}
    if viewed is not None:
        assert clusters == {"data"}


def test_a_view_is_traced_at_every_layer_as_it_is_handed_up(image: tuple[Path, bytes]) -> None:
    """A read view is traced like a read, from the file up: each layer traces it once it
    has one to hand up (a refusal traces nothing, the read that follows does)."""
    path, _ = image
    _warm(path)

    async def traced() -> list[tuple[str, dict[str, object]]]:
        disk = await api.open_async(str(path), driver="qcow2", read_only=True)
        try:
            await disk.read(0, 512)  # the L2 table is loaded (and its read traced) before
            with trace.capture("blk_co_*", "bdrv_co_*", "file_co_*") as records:
                assert await disk.blk.read_view(CLUSTER, 4096) is not None
                assert await disk.blk.read_view(3 * CLUSTER, 4096) is None
            host = disk.node.drv.map
            return [(name, dict(fields)) for name, fields in records] + [
                ("host", {"offset": (await host.lookup(CLUSTER, 4096))[0].host})]
        finally:
            await disk.close()

    records = asyncio.run(traced())
    host = records.pop()[1]["offset"]
    assert [name for name, _ in records] == [
        "file_co_preadv", "bdrv_co_preadv_part", "bdrv_co_preadv_part", "blk_co_preadv"]
    assert [fields["offset"] for _, fields in records] == [host, host, CLUSTER, CLUSTER]
    assert {fields["bytes"] for _, fields in records} == {4096}


def test_unallocated_clusters_come_as_a_view_of_the_backing_file(tmp_path: Path) -> None:
    """Clusters top.qcow2 leaves to its backing file are viewed there; a range that mixes
    top's own data with them, or reaches past the shorter backing file, is read."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"

    async def make() -> tuple[bytes | None, bytes | None, bytes | None, bytes]:
        await _filled(base, 4 * CLUSTER, _pattern(4 * CLUSTER, 7))
        await _filled(top, 8 * CLUSTER, _pattern(CLUSTER, 8), backing_file=str(base),
                      backing_fmt="qcow2")
        _warm(base)
        _warm(top)
        disk = await api.open_async(str(top), driver="qcow2", read_only=True)
        try:
            views = []
            for offset, length in ((CLUSTER, 2 * CLUSTER), (0, 2 * CLUSTER),
                                   (3 * CLUSTER, 2 * CLUSTER)):
                view = await disk.blk.read_view(offset, length)
                views.append(None if view is None else bytes(view))
                del view
            return views[0], views[1], views[2], await disk.read(CLUSTER, 2 * CLUSTER)
        finally:
            await disk.close()

    from_base, mixed, past_base, read = asyncio.run(make())
    assert from_base == read == _pattern(4 * CLUSTER, 7)[CLUSTER:3 * CLUSTER]
    assert mixed is None and past_base is None
