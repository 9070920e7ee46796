"""Crash safety: SIGKILL a qblock writer at random moments (issue 3, acceptance item 3).

A writer subprocess does random allocating writes on a qcow2 image and reports each completed
flush.  After every kill:

* ``qemu-img check`` finds no corruption (leaks are allowed: a crash may leak clusters but must
  never leave an L2 entry pointing at a cluster whose refcount is 0).  With lazy refcounts the
  image may be dirty, and ``qemu-img check -r all`` must repair (a copy of) it to 0 errors,
  0 leaks; the image itself stays dirty so the next writer's open has to repair it.
* every write completed before the last reported flush reads back exactly, and every other
  sector holds either its old or its new content (nothing else: never garbage, never zeroes in
  place of data).

The same image is reused across kills, so each writer also reopens an image left by a crash.
CI kills 21 times in all; QBLOCK_SLOW=1 kills 201 times.
"""
from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from qemu_tools import check, create, qemu_io, requires_qemu, slow_mode, to_raw

SECTOR = 512
SIZE = 32 * 1024 * 1024
MAX_OPS = 3000
FLUSH_EVERY = 8
VARIANTS = {
    "plain": {"cluster_size": 65536},
    "lazy-refcounts": {"cluster_size": 4096, "lazy_refcounts": True},
    "backing": {"cluster_size": 65536},
}
KILLS = 67 if slow_mode() else 7

pytestmark = [pytest.mark.interop, pytest.mark.slow, requires_qemu]


def crash_ops(seed: int, cluster_size: int) -> list[tuple[int, int]]:
    """Non-overlapping random (offset, length) writes, sector aligned, up to two clusters."""
    rng = random.Random(seed)
    touched = np.zeros(SIZE // SECTOR, dtype=bool)
    ops = []
    max_sectors = 2 * cluster_size // SECTOR
    for _ in range(MAX_OPS):
        for _attempt in range(20):
            n = rng.randrange(1, max_sectors + 1)
            first = rng.randrange(0, SIZE // SECTOR - n + 1)
            if not touched[first:first + n].any():
                break
        else:
            break
        touched[first:first + n] = True
        ops.append((first * SECTOR, n * SECTOR))
    return ops


def op_data(seed: int, index: int, length: int) -> bytes:
    return random.Random(seed * 1_000_003 + index).randbytes(length)


def writer_main(argv: list[str]) -> None:
    """Body of the writer subprocess: path, seed, cluster size."""
    import qblock

    path, seed, cluster_size = argv[0], int(argv[1]), int(argv[2])
    ops = crash_ops(seed, cluster_size)
    with qblock.open(path) as disk:
        print("ready", flush=True)
        for i, (offset, length) in enumerate(ops):
            disk.write(offset, op_data(seed, i, length))
            if i % FLUSH_EVERY == FLUSH_EVERY - 1 or i == len(ops) - 1:
                disk.flush()
                print(f"flushed {i}", flush=True)


WRITER = ("import sys; sys.path[:0] = [sys.argv[1]]; "
          "from test_qcow2_crash import writer_main; writer_main(sys.argv[2:])")


def run_and_kill(path: Path, seed: int, cluster_size: int, rng: random.Random) -> list[str]:
    """Start a writer, SIGKILL it at a random moment, return the lines it printed."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(Path(__file__).parent),
                             str(path), str(seed), str(cluster_size)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            ready.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    if rng.random() < 0.1:
        time.sleep(rng.uniform(0, 0.3))       # sometimes during open (header updates, repair)
    else:
        ready.wait(timeout=60)
        time.sleep(rng.uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    thread.join(timeout=30)
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode not in (0, -signal.SIGKILL):
        pytest.fail(f"writer failed with {proc.returncode}: {stderr}")
    if proc.returncode == 0 and "flushed" not in " ".join(lines):
        pytest.fail(f"writer exited without writing: {stderr}")
    return lines


def verify_content(actual: bytes, old: bytes, seed: int, cluster_size: int,
                   lines: list[str]) -> None:
    """Flushed writes are durable; every other sector is its old or its new content."""
    ops = crash_ops(seed, cluster_size)
    durable = max((int(line.split()[1]) for line in lines if line.startswith("flushed")),
                  default=-1)
    new = bytearray(old)
    must_be_new = np.zeros(SIZE // SECTOR, dtype=bool)
    for i, (offset, length) in enumerate(ops):
        new[offset:offset + length] = op_data(seed, i, length)
        if i <= durable:
            must_be_new[offset // SECTOR:(offset + length) // SECTOR] = True
    got = np.frombuffer(actual, dtype=np.uint8).reshape(-1, SECTOR)
    is_old = (got == np.frombuffer(old, dtype=np.uint8).reshape(-1, SECTOR)).all(axis=1)
    is_new = (got == np.frombuffer(bytes(new), dtype=np.uint8).reshape(-1, SECTOR)).all(axis=1)
    bad = np.flatnonzero(~(is_old | is_new))
    assert not bad.size, (f"{bad.size} sectors hold neither old nor new data, first at "
                          f"offset {int(bad[0]) * SECTOR}")
    lost = np.flatnonzero(must_be_new & ~is_new)
    assert not lost.size, (f"{lost.size} sectors written before flush {durable} were lost, "
                           f"first at offset {int(lost[0]) * SECTOR}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigkill_leaves_image_consistent(tmp_path: Path, variant: str) -> None:
    options = VARIANTS[variant]
    cluster_size = int(options["cluster_size"])
    img = tmp_path / "img.qcow2"
    if variant == "backing":
        create(tmp_path / "base.qcow2", SIZE, cluster_size=4096)
        qemu_io(tmp_path / "base.qcow2", ["write -q -P 0x5a 0 12M", "write -q -P 0xa5 20M 8M"])
        create(img, SIZE, backing="base.qcow2", backing_fmt="qcow2", **options)
    else:
        create(img, SIZE, **options)
    old = to_raw(img, tmp_path / "old.raw")
    rng = random.Random(f"crash-{variant}")
    for kill in range(KILLS):
        seed = rng.randrange(1 << 30)
        lines = run_and_kill(img, seed, cluster_size, rng)
        where = f"kill {kill} (seed {seed}, {len(lines)} lines)"
        result = check(img)
        if options.get("lazy_refcounts"):
            # Repair a copy: the next writer must open the dirty image and repair it itself.
            shutil.copyfile(img, tmp_path / "repaired.qcow2")
            repaired = check(tmp_path / "repaired.qcow2", repair="all")
            assert repaired.clean, f"{where}: check -r all did not repair: {repaired}"
        else:
            assert result.corruptions == 0 and result.check_errors == 0, f"{where}: {result}"
        actual = to_raw(img, tmp_path / "actual.raw")
        verify_content(actual, old, seed, cluster_size, lines)
        old = actual
