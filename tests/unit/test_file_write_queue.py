"""file driver: buffered writes of one file go through one queue (drivers/file.py WriteQueue)."""
from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest

from qblock.drivers.file import WriteQueue


def _writer(fd: int, gate: threading.Event, log: list[int]):
    def write(offset: int, data: memoryview) -> None:
        gate.wait(5)
        log.append(offset)
        os.pwritev(fd, [data], offset)
    return write


def test_writes_are_made_in_queue_order_by_one_worker(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(64 * 1024))
    fd = os.open(path, os.O_RDWR)
    gate, log = threading.Event(), []
    queue = WriteQueue(_writer(fd, gate, log))

    async def main() -> None:
        tasks = [asyncio.create_task(queue.write(i * 4096, memoryview(bytes([i + 1]) * 4096)))
                 for i in range(16)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in tasks)  # all wait behind the gated first write
        gate.set()
        await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
    finally:
        os.close(fd)
    assert log == [i * 4096 for i in range(16)]
    data = path.read_bytes()
    assert all(data[i * 4096:(i + 1) * 4096] == bytes([i + 1]) * 4096 for i in range(16))


def test_a_cancelled_write_that_has_not_started_is_never_made(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(8192))
    fd = os.open(path, os.O_RDWR)
    gate, log = threading.Event(), []
    queue = WriteQueue(_writer(fd, gate, log))

    async def main() -> None:
        first = asyncio.create_task(queue.write(0, memoryview(b"a" * 4096)))
        second = asyncio.create_task(queue.write(4096, memoryview(b"b" * 4096)))
        await asyncio.sleep(0.05)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        gate.set()
        await first
        # a later write still runs: the queue is not stuck on the cancelled entry
        await queue.write(4096, memoryview(b"c" * 4096))

    try:
        asyncio.run(main())
    finally:
        os.close(fd)
    assert log == [0, 4096]
    assert path.read_bytes() == b"a" * 4096 + b"c" * 4096


def test_the_error_of_a_write_reaches_its_caller_and_the_next_write_runs(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(4096))
    ro = os.open(path, os.O_RDONLY)
    rw = os.open(path, os.O_RDWR)

    def write(offset: int, data: memoryview) -> None:
        os.pwritev(ro if offset == 0 else rw, [data], offset)

    queue = WriteQueue(write)

    async def main() -> None:
        with pytest.raises(OSError) as e:
            await queue.write(0, memoryview(b"x" * 512))
        assert e.value.errno == errno.EBADF
        await queue.write(512, memoryview(b"y" * 512))

    try:
        asyncio.run(main())
    finally:
        os.close(ro)
        os.close(rw)
    assert path.read_bytes() == bytes(512) + b"y" * 512 + bytes(3072)
