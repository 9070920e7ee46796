"""The public API: qblock.open / qblock.open_async over raw files, null-co and raw windows."""
from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import qblock
from qblock.block import io
from qblock.block.accounting import AcctType
from qblock.block.node import registry
from qblock.drivers.base import Status
from qblock.errors import InvalidArgument, NotSupported, OutOfBounds, QBlockError

SIZE = 1 << 20


def fill(length: int, seed: int) -> bytes:
    return ((np.arange(length) * 13 + seed) % 256).astype(np.uint8).tobytes()


def test_sync_disk_round_trip(make_image: Any) -> None:
    path = make_image(SIZE)
    with qblock.open(path) as disk:  # format probed: raw
        assert disk.node.drv.format_name == "raw"
        assert disk.node.file.node.drv.format_name == "file"
        assert disk.size == SIZE
        disk.write(4096, fill(8192, 1))
        disk.write(100, b"unaligned", fua=True)
        assert disk.read(4096, 8192) == fill(8192, 1)
        assert disk.read(100, 9) == b"unaligned"
        buf = bytearray(16)
        disk.readinto(4096, buf)
        assert buf == fill(16, 1)
        disk.write_zeroes(4096, 4096)
        disk.write_zeroes(8192, 4096, may_unmap=True)
        assert disk.read(4096, 8192) == bytes(8192)
        disk.write(65536, b"x" * 4096)
        disk.discard(65536, 4096)
        assert disk.read(65536, 4096) == bytes(4096)  # file-posix punches a hole
        disk.flush()
    data = path.read_bytes()
    assert data[100:109] == b"unaligned" and data[4096:12288] == bytes(8192)
    assert registry.nodes == {}  # closing the disk closed the implicit raw and file nodes


def test_block_status_reports_holes_and_data(make_image: Any) -> None:
    with qblock.open(make_image(SIZE), driver="raw") as disk:
        disk.write(65536, b"d" * 4096)
        hole = disk.block_status(0, SIZE)
        assert hole.status & Status.ZERO and not hole.status & Status.DATA
        assert hole.pnum == 65536
        data = disk.block_status(65536, SIZE)
        assert data.status & Status.DATA and not data.status & Status.ZERO
        assert (data.pnum, data.map) == (4096, 65536)
        assert data.file is disk.node.file.node
        tail = disk.block_status(69632, SIZE)
        assert tail.status & Status.EOF and tail.pnum == SIZE - 69632


def test_truncate_grows_and_shrinks_the_file(make_image: Any) -> None:
    path = make_image(SIZE)
    with qblock.open(path, driver="raw") as disk:
        disk.write(SIZE - 512, b"t" * 512)
        disk.truncate(2 * SIZE)
        assert disk.size == 2 * SIZE and path.stat().st_size == 2 * SIZE
        assert disk.read(SIZE - 512, 1024) == b"t" * 512 + bytes(512)
        disk.write(2 * SIZE - 1, b"!")
        disk.truncate(SIZE // 2)
        assert disk.size == SIZE // 2
        with pytest.raises(OutOfBounds):
            disk.read(SIZE // 2, 1)
    assert path.stat().st_size == SIZE // 2


def test_close_is_idempotent_and_closed_disk_refuses_io(make_image: Any) -> None:
    disk = qblock.open(make_image(SIZE), driver="raw")
    file_node = disk.node.file.node
    disk.close()
    disk.close()
    assert file_node.closed and file_node.drv.fd == -1
    with pytest.raises(QBlockError, match="No medium inserted"):
        disk.read(0, 1)


def test_sync_api_refuses_to_run_inside_an_event_loop(make_image: Any) -> None:
    path = make_image(SIZE)

    async def main() -> None:
        with pytest.raises(InvalidArgument, match="open_async"):
            qblock.open(path)

    asyncio.run(main())
    assert registry.nodes == {}


def test_async_disk_round_trip(make_image: Any) -> None:
    path = make_image(SIZE)

    async def main() -> None:
        async with await qblock.open_async(path, driver="raw") as disk:
            assert disk.size == SIZE
            await asyncio.gather(*(disk.write(i * 4096, fill(4096, i)) for i in range(16)))
            reads = await asyncio.gather(*(disk.read(i * 4096, 4096) for i in range(16)))
            assert reads == [fill(4096, i) for i in range(16)]
            await disk.write_zeroes(0, 4096)
            await disk.discard(4096, 4096)
            assert await disk.read(0, 8192) == bytes(8192)
            view = bytearray(4096)
            await disk.readinto(8192, view)
            assert view == fill(4096, 2)
            st = await disk.block_status(4096, 4096)  # the discarded block is a hole
            assert st.status & Status.ZERO and st.pnum == 4096
            await disk.flush()
            await disk.truncate(2 * SIZE)
            assert disk.size == 2 * SIZE
            stats = disk.blk.stats
            assert stats.nr_ops[AcctType.READ] == 16 + 2  # the gathered reads, 2 more
            assert stats.nr_ops[AcctType.WRITE] == 16 + 1  # the gathered writes, zeroes
            assert stats.nr_ops[AcctType.UNMAP] == stats.nr_ops[AcctType.FLUSH] == 1
        assert disk.blk.root is None

    asyncio.run(main())
    data = path.read_bytes()
    assert len(data) == 2 * SIZE and data[:8192] == bytes(8192)
    assert data[8192:16 * 4096] == b"".join(fill(4096, i) for i in range(2, 16))


def test_run_helper_uses_the_facade_loop(make_image: Any) -> None:
    disk = qblock.run(qblock.open_async(make_image(SIZE), driver="raw"))
    qblock.run(disk.write(0, b"via run"))
    assert qblock.run(disk.read(0, 7)) == b"via run"
    qblock.run(disk.close())


def test_probe_format(tmp_path: Path) -> None:
    raw = tmp_path / "a.img"
    raw.write_bytes(b"\0" * 512)
    qcow2 = tmp_path / "b.img"
    qcow2.write_bytes(b"QFI\xfb" + b"\0" * 508)
    assert qblock.probe_format(str(raw)) == "raw"
    assert qblock.probe_format(str(qcow2)) == "qcow2"


def test_null_co_read_zeroes() -> None:
    with qblock.open({"driver": "null-co", "size": SIZE, "read-zeroes": True}) as disk:
        assert disk.size == SIZE and disk.node.node_name.startswith("#block")
        disk.write(0, b"\xff" * 4096)  # a sink: accepted, then forgotten
        assert disk.read(0, 4096) == bytes(4096)
        buf = bytearray(b"\xee" * 512)
        disk.readinto(512, buf)
        assert buf == bytes(512)
        st = disk.block_status(0, SIZE)
        assert st.status & Status.ZERO and st.pnum == SIZE
        with pytest.raises(OutOfBounds):
            disk.read(SIZE, 1)


def test_null_co_default_size_is_one_gib() -> None:
    with qblock.open({"driver": "null-co"}) as disk:
        assert disk.size == 1 << 30


def test_raw_window_maps_offsets_into_the_file(make_image: Any) -> None:
    original = fill(SIZE, 7)
    path = make_image(SIZE, data=original)
    options = {"driver": "raw", "offset": 4096, "size": 8192,
               "file": {"driver": "file", "filename": str(path)}}
    with qblock.open(options) as disk:
        assert disk.size == 8192
        assert disk.read(0, 8192) == original[4096:12288]
        disk.write(0, b"A" * 512)
        disk.write(8192 - 3, b"END")
        disk.write_zeroes(1024, 1024)
        with pytest.raises(OutOfBounds):
            disk.write(8190, b"past")
        with pytest.raises(OutOfBounds):
            disk.read(8192, 1)
        with pytest.raises(NotSupported, match="Cannot resize fixed-size raw disks"):
            disk.truncate(4096)
        with pytest.raises(InvalidArgument) as exc:  # below the BlockBackend: raw's own check
            qblock.run(io.node_pwritev(disk.node, 8190, memoryview(b"past")))
        assert exc.value.errno == errno.ENOSPC
    expect = bytearray(original)
    expect[4096:4096 + 512] = b"A" * 512
    expect[12288 - 3:12288] = b"END"
    expect[4096 + 1024:4096 + 2048] = bytes(1024)
    assert path.read_bytes() == expect


def test_raw_offset_without_size_reaches_the_end(make_image: Any) -> None:
    path = make_image(SIZE, data=fill(SIZE, 2))
    with qblock.open({"driver": "raw", "offset": SIZE - 4096,
                      "file": {"driver": "file", "filename": str(path)}}) as disk:
        assert disk.size == 4096
        assert disk.read(0, 4096) == fill(SIZE, 2)[-4096:]
        disk.write(4096 - 2, b"ok")
    assert path.read_bytes()[-2:] == b"ok"
