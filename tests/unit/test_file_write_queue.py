"""file driver: buffered writes of one file go through one queue (drivers/file.py WriteQueue)."""
from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qblock.drivers.file import MERGE_MAX_BUFFERS, WriteQueue


def _writer(fd: int, gate: threading.Event, log: list[int | tuple[int, ...]]):
    """Writes once the gate opens; logs each call's offset, or its buffers' offsets."""
    def write(offset: int, buffers: list[memoryview]) -> None:
        gate.wait(5)
        pos, offsets = offset, []
        for buf in buffers:
            offsets.append(pos)
            pos += len(buf)
        log.append(offsets[0] if len(offsets) == 1 else tuple(offsets))
        os.pwritev(fd, buffers, offset)
    return write


@dataclass
class Gated:
    """A 1 MiB file and a queue whose writes wait for ``gate``; ``log`` as _writer()."""

    path: Path
    queue: WriteQueue
    gate: threading.Event
    log: list[int | tuple[int, ...]]


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[Gated]:
    path = tmp_path / "f"
    path.write_bytes(bytes(1 << 20))
    fd = os.open(path, os.O_RDWR)
    gate, log = threading.Event(), []
    try:
        yield Gated(path, WriteQueue(_writer(fd, gate, log)), gate, log)
    finally:
        os.close(fd)


def test_writes_are_made_in_queue_order_by_one_worker(gated: Gated) -> None:
    queue, gate, log = gated.queue, gated.gate, gated.log

    async def main() -> None:
        # every other block: no two writes continue each other, none are merged
        tasks = [asyncio.create_task(queue.write(2 * i * 4096,
                                                 memoryview(bytes([i + 1]) * 4096)))
                 for i in range(16)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in tasks)  # all wait behind the gated first write
        gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert log == [2 * i * 4096 for i in range(16)]
    data = gated.path.read_bytes()
    assert all(data[2 * i * 4096:(2 * i + 1) * 4096] == bytes([i + 1]) * 4096
               for i in range(16))


def test_writes_queued_one_after_the_other_in_the_file_go_in_one_call(gated: Gated) -> None:
    queue, gate, log = gated.queue, gated.gate, gated.log
    # while the first write waits at the gate: three that continue each other, one elsewhere,
    # then MERGE_MAX_BUFFERS + 2 more in a row
    plan = [0, 512, 1024, 1536, 65536]
    plan += [131072 + i * 512 for i in range(MERGE_MAX_BUFFERS + 2)]

    async def main() -> None:
        tasks = [asyncio.create_task(queue.write(plan[0], memoryview(b"\x01" * 512)))]
        await asyncio.sleep(0.05)  # the worker holds the first write at the gate
        tasks += [asyncio.create_task(queue.write(off, memoryview(bytes([k % 251 + 1]) * 512)))
                  for k, off in enumerate(plan) if k]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    run = tuple(131072 + i * 512 for i in range(MERGE_MAX_BUFFERS))
    assert log == [0, (512, 1024, 1536), 65536, run,
                   (131072 + MERGE_MAX_BUFFERS * 512, 131072 + (MERGE_MAX_BUFFERS + 1) * 512)]
    data = gated.path.read_bytes()
    for k, off in enumerate(plan):
        assert data[off:off + 512] == bytes([k % 251 + 1]) * 512, off


def test_a_failed_merged_write_fails_every_write_in_it(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(8192))
    ro = os.open(path, os.O_RDONLY)
    gate = threading.Event()

    def write(offset: int, buffers: list[memoryview]) -> None:
        gate.wait(5)
        os.pwritev(ro, buffers, offset)

    queue = WriteQueue(write)

    async def main() -> list[BaseException | None]:
        tasks = [asyncio.create_task(queue.write(i * 512, memoryview(b"z" * 512)))
                 for i in range(4)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        os.close(ro)
    assert all(isinstance(r, OSError) and r.errno == errno.EBADF for r in results)
    assert path.read_bytes() == bytes(8192)


def test_a_cancelled_write_that_has_not_started_is_never_made(gated: Gated) -> None:
    queue, gate, log = gated.queue, gated.gate, gated.log

    async def main() -> None:
        first = asyncio.create_task(queue.write(0, memoryview(b"a" * 4096)))
        await asyncio.sleep(0.05)  # the worker holds the first write at the gate
        second = asyncio.create_task(queue.write(4096, memoryview(b"b" * 4096)))
        await asyncio.sleep(0.01)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        gate.set()
        await first
        # a later write still runs: the queue is not stuck on the cancelled entry
        await queue.write(4096, memoryview(b"c" * 4096))

    asyncio.run(main())
    assert log == [0, 4096]
    assert gated.path.read_bytes() == b"a" * 4096 + b"c" * 4096 + bytes((1 << 20) - 8192)


def test_the_error_of_a_write_reaches_its_caller_and_the_next_write_runs(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(4096))
    ro = os.open(path, os.O_RDONLY)
    rw = os.open(path, os.O_RDWR)

    def write(offset: int, buffers: list[memoryview]) -> None:
        os.pwritev(ro if offset == 0 else rw, buffers, offset)

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
