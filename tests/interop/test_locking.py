"""Image locking and data exchange between qblock and the real QEMU 7.2 tools.

Both sides use OFD locks on bytes 100+bit (permission taken) and 200+bit (permission not
shared), file-posix.c raw_apply_lock_bytes.  QEMU 7.2's qemu-io and qemu-img open a raw image
sharing every permission (blk_new_open: shared = BLK_PERM_ALL) and qemu-img info takes none
(BDRV_O_NO_IO); qblock.open takes qemu-io's permissions, so it fares exactly as qemu-io.
"""
from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import qblock
from qblock.block.perm import Perm
from qblock.errors import LockError

pytestmark = pytest.mark.interop

SIZE = 1 << 20
PROMPT = b"qemu-io> "


class QemuIo:
    """An interactive ``qemu-io`` holding an image open until ``close``."""

    def __init__(self, *args: str | os.PathLike[str]) -> None:
        self.proc = subprocess.Popen(["qemu-io", *map(os.fspath, args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output = self._until_prompt()

    def _until_prompt(self, timeout: float = 20.0) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        out = b""
        deadline = time.monotonic() + timeout
        while not out.endswith(PROMPT):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no qemu-io prompt, got {out!r}")
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"qemu-io exited: {out!r}")
                out += chunk
        return out

    def command(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._until_prompt()[:-len(PROMPT)].decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def qemu_io_holding() -> Iterator[Callable[..., QemuIo]]:
    started: list[QemuIo] = []

    def start(*args: str | os.PathLike[str]) -> QemuIo:
        io = QemuIo(*args)
        started.append(io)
        return io

    yield start
    for io in started:
        io.close()


def lock_hint(path: Path) -> str:
    return f"Is another process using the image [{path}]?"


def _second_opener_outcomes(path: Path, qemu_tool: Any) -> list[tuple[int, bool]]:
    """What QEMU's tools can do next to the current holder: (exit code, lock error seen)."""
    runs = [("qemu-io", "-f", "raw", "-c", "write -P 0x18 512 512", path),
            ("qemu-io", "-r", "-f", "raw", "-c", "read 0 512", path),
            ("qemu-io", "-U", "-r", "-f", "raw", "-c", "read 0 512", path),
            ("qemu-img", "resize", "-f", "raw", path, "2M"),
            ("qemu-img", "info", "-f", "raw", path)]
    outcomes = []
    for args in runs:
        res = qemu_tool(*args)
        outcomes.append((res.returncode, "lock" in res.stderr))
    return outcomes


def test_qblock_holder_locks_like_a_qemu_io_holder(make_image: Any, qemu_tool: Any,
                                                   qemu_io_holding: Any) -> None:
    """The oracle: every QEMU tool run next to qblock fares as it does next to qemu-io."""
    with_qemu = make_image(SIZE, name="q.raw")
    holder = qemu_io_holding("-f", "raw", with_qemu)
    expected = _second_opener_outcomes(with_qemu, qemu_tool)
    holder.close()
    with_qblock = make_image(SIZE, name="b.raw")
    with qblock.open(with_qblock, driver="raw") as disk:
        assert _second_opener_outcomes(with_qblock, qemu_tool) == expected
        assert disk.read(512, 512) == b"\x18" * 512  # the other writer's data is visible


def test_qblock_opens_next_to_a_qemu_io_writer_like_qemu_io(make_image: Any, qemu_tool: Any,
                                                           qemu_io_holding: Any) -> None:
    path = make_image(SIZE)
    holder = qemu_io_holding("-f", "raw", path)
    assert "wrote 512/512" in holder.command("write -P 0x42 0 512")
    second = qemu_tool("qemu-io", "-f", "raw", "-c", "read -P 0x42 0 512", path)
    assert second.returncode == 0, second.stderr  # raw shares everything in QEMU 7.2
    with qblock.open(path, driver="raw") as disk:
        assert disk.read(0, 512) == b"\x42" * 512


def test_qemu_io_unsharing_write_blocks_qblock_writer(tmp_path: Path, qemu_tool: Any,
                                                      qemu_io_holding: Any) -> None:
    # qcow2 never shares write on its file, so a qemu-io holding a qcow2 image refuses
    # every other writer of that file, whatever format the other side reads it as
    path = tmp_path / "held.qcow2"
    qemu_tool("qemu-img", "create", "-f", "qcow2", path, "1M", check=True)
    holder = qemu_io_holding("-f", "qcow2", path)
    with pytest.raises(LockError) as exc:
        qblock.open(path, driver="raw")
    assert str(exc.value) == f'Failed to get "write" lock\n{lock_hint(path)}'
    with qblock.open(path, driver="raw", read_only=True, share=True) as disk:
        assert disk.read(0, 4) == b"QFI\xfb"
    holder.close()
    with qblock.open(path, driver="raw") as disk:
        assert disk.read(0, 4) == b"QFI\xfb"


def test_exclusive_user_blocks_qemu_and_releases_on_close(make_image: Any,
                                                          qemu_tool: Any) -> None:
    """A user that does not share write (a guest device with share-rw=off) locks QEMU out."""
    path = make_image(SIZE)
    disk = qblock.open(path, driver="raw")
    disk.backend.set_perm(Perm.CONSISTENT_READ | Perm.WRITE,
                          Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
    res = qemu_tool("qemu-io", "-f", "raw", "-c", "write 0 512", path)
    assert res.returncode == 1
    assert f'Failed to get "write" lock\n{lock_hint(path)}' in res.stderr
    with pytest.raises(LockError, match='Failed to get "write" lock'):
        qblock.open(path, driver="raw")  # OFD locks also separate two opens of one process
    disk.close()
    res = qemu_tool("qemu-io", "-f", "raw", "-c", "write 0 512", path)
    assert res.returncode == 0, res.stderr


def test_data_written_by_qblock_reads_back_in_qemu_io(make_image: Any, qemu_tool: Any) -> None:
    path = make_image(SIZE)
    with qblock.open(path, driver="raw") as disk:
        disk.write(65536, b"\xab" * 8192)
        disk.write(100, b"\xcd" * 300)  # unaligned
        disk.write_zeroes(196608, 65536, may_unmap=True)
    res = qemu_tool("qemu-io", "-f", "raw",
                    "-c", "read -P 0xab 65536 8192",
                    "-c", "read -P 0xcd 100 300",
                    "-c", "read -P 0 0 100",
                    "-c", "read -P 0 196608 65536", path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Pattern verification failed" not in res.stdout
    assert res.stdout.count("read ") == 4


def test_data_written_by_qemu_io_reads_back_in_qblock(make_image: Any, qemu_tool: Any) -> None:
    path = make_image(SIZE)
    res = qemu_tool("qemu-io", "-f", "raw",
                    "-c", "write -P 0x5c 131072 8192",
                    "-c", "write -P 0x3e 7 13",
                    "-c", "write -z 131072 512", path)
    assert res.returncode == 0, res.stderr
    with qblock.open(path, driver="raw", read_only=True) as disk:
        assert disk.read(131072, 8192) == bytes(512) + b"\x5c" * (8192 - 512)
        assert disk.read(0, 32) == bytes(7) + b"\x3e" * 13 + bytes(12)


def test_lock_error_names_taken_permissions_first(make_image: Any, tmp_path: Path) -> None:
    """qemu-nbd takes consistent-read and write and unshares resize (locks 100, 101, 203).

    qblock's backend wants resize (blocked by 203), as qemu-io's does.
    """
    path = make_image(SIZE)
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        with pytest.raises(LockError) as exc:
            qblock.open(path, driver="raw")
        assert str(exc.value) == f'Failed to get "resize" lock\n{lock_hint(path)}'
    finally:
        proc.terminate()
        proc.wait(timeout=20)
