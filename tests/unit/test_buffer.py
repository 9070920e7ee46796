"""qblock.blockalign: page-aligned, zero-filled, writable I/O buffers."""
from __future__ import annotations

import ctypes
import mmap
import os

import pytest

import qblock


def _address(buf: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@pytest.mark.parametrize("size", [1, 512, 4096, 65536 + 3, 2 << 20])
def test_buffer_starts_on_a_page_and_reads_as_zeroes(size: int) -> None:
    buf = qblock.blockalign(size)
    assert len(buf) == size and not buf.readonly
    assert _address(buf) % mmap.PAGESIZE == 0
    assert not any(buf.tobytes())


def test_buffer_takes_preadv_and_pwritev(tmp_path) -> None:
    data = os.urandom(3 * mmap.PAGESIZE + 100)
    path = tmp_path / "f"
    path.write_bytes(data)
    buf = qblock.blockalign(len(data))
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.preadv(fd, [buf], 0) == len(data)
        assert buf.tobytes() == data
        buf[:5] = b"hello"
        assert os.pwritev(fd, [buf[:5]], 1) == 5
    finally:
        os.close(fd)
    assert path.read_bytes() == data[:1] + b"hello" + data[6:]


def test_empty_and_negative_sizes() -> None:
    assert len(qblock.blockalign(0)) == 0
    with pytest.raises(ValueError):
        qblock.blockalign(-1)
