"""The ``nbd`` client driver against qemu-nbd, qemu-storage-daemon and qblock's own server.

Each server exports a 1 MiB qcow2 image.  qblock opens it as ``{driver: nbd, server, export}``
and hypothesis drives unaligned writes, zero writes (with and without unmap) and discards
against a bytearray model (discarded bytes become unknown, as NBD_CMD_TRIM allows); after
every example the whole disk reads back equal to the model where known, and block status
covers the range with ZERO claimed only where the model is zero.  Afterwards the image on
disk equals the model (qemu-img compare with the known bytes) and is clean (qemu-img check).
The node also works as a qcow2 ``file`` and as a backing node.
"""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qblock
from qblock.drivers.base import Status
from daemon_tools import env, qblock as qblock_daemon, qsd, running, wait_for_socket

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-img", "qemu-io", "qemu-nbd",
                                          "qemu-storage-daemon")),
    reason="qemu-img, qemu-io, qemu-nbd and qemu-storage-daemon are needed")
TIMEOUT = 30
SIZE = 1 << 20
KINDS = ["qemu-nbd", "qsd", "qblock-nbd", "qblock-daemon"]


def run(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"
    return res.stdout


@pytest.fixture
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, dict]]:
    """(image, nbd driver options) for a writable export of a fresh qcow2 image."""
    kind = request.param
    img = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k", str(img), str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 64k", str(img))
    sock = tmp_path / "nbd.sock"
    opts = {"driver": "nbd", "server": {"type": "unix", "path": str(sock)}, "export": "e"}
    if kind in ("qemu-nbd", "qblock-nbd"):
        prog = ["qemu-nbd"] if kind == "qemu-nbd" else [sys.executable, "-m",
                                                         "qblock.cli.main", "nbd"]
        proc = subprocess.Popen([*prog, "-f", "qcow2", "-x", "e", "-k", str(sock), str(img)],
                                env=env(), stderr=subprocess.PIPE)
        try:
            wait_for_socket(sock, proc)
            yield img, opts
        finally:
            proc.terminate()
            proc.wait(timeout=TIMEOUT)
            assert proc.stderr is not None
            proc.stderr.close()
        return
    args = ["--blockdev", f"driver=file,filename={img},node-name=file0",
            "--blockdev", "driver=qcow2,file=file0,node-name=disk,discard=unmap",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "nbd,id=e,node-name=disk,name=e,writable=on"]
    argv, qmp = (qsd if kind == "qsd" else qblock_daemon)(tmp_path, *args)
    with running(argv, qmp):
        wait_for_socket(sock)
        yield img, opts


OFFSETS = st.integers(0, SIZE - 1)
OPS = st.lists(st.tuples(st.sampled_from(["write", "zero", "zero-unmap", "discard"]),
                         OFFSETS, st.integers(1, 40000), st.integers(1, 255)),
               min_size=1, max_size=6)


def check_status(disk: qblock.Disk, model: np.ndarray, known: np.ndarray) -> None:
    """block_status walks the disk; every ZERO extent is zero in the model where known."""
    pos = 0
    while pos < SIZE:
        st_ = disk.block_status(pos, SIZE - pos)
        assert 0 < st_.pnum <= SIZE - pos
        if st_.status & Status.ZERO:
            seg = slice(pos, pos + st_.pnum)
            assert not model[seg][known[seg]].any()
        pos += st_.pnum


@pytest.mark.parametrize("served", KINDS, indirect=True)
def test_client_matches_model(served: tuple[Path, dict], tmp_path: Path) -> None:
    img, opts = served
    model = np.zeros(SIZE, dtype=np.uint8)
    model[:64 * 1024] = 0x77
    known = np.ones(SIZE, dtype=bool)
    disk = qblock.open(opts)
    try:
        assert disk.size == SIZE

        @settings(max_examples=8, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(OPS)
        def apply(ops: list[tuple[str, int, int, int]]) -> None:
            for op, off, n, byte in ops:
                n = min(n, SIZE - off)
                if op == "write":
                    disk.write(off, bytes([byte]) * n)
                    model[off:off + n] = byte
                    known[off:off + n] = True
                elif op == "discard":
                    disk.discard(off, n)
                    known[off:off + n] = False
                else:
                    disk.write_zeroes(off, n, may_unmap=op == "zero-unmap")
                    model[off:off + n] = 0
                    known[off:off + n] = True
            data = np.frombuffer(disk.read(0, SIZE), dtype=np.uint8)
            assert np.array_equal(data[known], model[known])
            check_status(disk, model, known)

        apply()
        disk.flush()
        final = np.frombuffer(disk.read(0, SIZE), dtype=np.uint8)
    finally:
        disk.close()
    assert np.array_equal(final[known], model[known])
    # the image itself: equal to what the client last read, and consistent
    expected = tmp_path / "expected.raw"
    expected.write_bytes(final.tobytes())
    run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(img), str(expected))
    run("qemu-img", "check", "-U", "-f", "qcow2", str(img))


@pytest.fixture
def raw_export(tmp_path: Path) -> Iterator[tuple[Path, dict]]:
    """qemu-nbd exporting the bytes of a file (-f raw): a remote qcow2 container, with room
    to allocate clusters (an NBD export cannot grow)."""
    container = tmp_path / "remote.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(container), "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5e 128k 64k", str(container))
    with open(container, "r+b") as f:
        f.truncate(2 << 20)
    sock = tmp_path / "raw.sock"
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), "-t", str(container)],
                            stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        yield container, {"driver": "nbd", "server": {"type": "unix", "path": str(sock)}}
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
        assert proc.stderr is not None
        proc.stderr.close()


def test_nbd_node_as_qcow2_file(raw_export: tuple[Path, dict], tmp_path: Path) -> None:
    container, nbd_opts = raw_export
    disk = qblock.open({"driver": "qcow2", "file": nbd_opts})
    try:
        assert disk.read(128 * 1024, 4) == b"\x5e" * 4
        disk.write(300 * 1024, b"\xa1" * 70000)
        disk.write_zeroes(128 * 1024, 4096)
        disk.flush()
    finally:
        disk.close()
    run("qemu-img", "check", "-U", "-f", "qcow2", str(container))
    probe = run("qemu-io", "-U", "-r", "-f", "qcow2", "-c", "read -P 0xa1 300k 70000",
                "-c", "read -P 0 128k 4k", "-c", "read -P 0x5e 132k 60k", str(container))
    assert "Pattern verification failed" not in probe


def test_nbd_node_as_backing(raw_export: tuple[Path, dict], tmp_path: Path) -> None:
    container, nbd_opts = raw_export
    overlay = tmp_path / "overlay.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(overlay), "1M")
    disk = qblock.open({"driver": "qcow2", "file": {"driver": "file", "filename": str(overlay)},
                        "backing": {"driver": "qcow2", "file": nbd_opts}})
    try:
        assert disk.read(128 * 1024, 64 * 1024) == b"\x5e" * 65536
        disk.write(130 * 1024, b"\x01" * 512)
        assert disk.read(129 * 1024, 2048) == b"\x5e" * 1024 + b"\x01" * 512 + b"\x5e" * 512
    finally:
        disk.close()
    assert run("qemu-img", "map", "-U", "--output=json", "-f", "qcow2", str(container))


def test_connect_errors(tmp_path: Path) -> None:
    with pytest.raises(qblock.QBlockError, match="Failed to connect to"):
        qblock.open({"driver": "nbd", "server": {"type": "unix",
                                                 "path": str(tmp_path / "none")}})
    with pytest.raises(qblock.QBlockError, match="server.path"):
        qblock.open({"driver": "nbd", "server": {"type": "unix"}})


def test_daemon_reexports_remote_node(tmp_path: Path) -> None:
    """qsd serves a qcow2 image; ``qblock daemon`` opens it with ``--blockdev driver=nbd``
    (reconnect-delay accepted) and exports that node again: the allocation map and the
    content seen through qblock equal qsd's."""
    if shutil.which("nbdinfo") is None:
        pytest.skip("nbdinfo is needed")
    img = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(img), "2M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x19 64k 128k", "-c", "write -z 1M 64k",
        str(img))
    s1, s2 = tmp_path / "qsd-nbd.sock", tmp_path / "qblock-nbd.sock"
    qsd_argv, qsd_qmp = qsd(tmp_path, "--blockdev", f"driver=file,filename={img},node-name=f0",
                            "--blockdev", "driver=qcow2,file=f0,node-name=disk",
                            "--nbd-server", f"addr.type=unix,addr.path={s1}",
                            "--export", "nbd,id=e,node-name=disk,name=e")
    ours, ours_qmp = qblock_daemon(
        tmp_path, "--blockdev", f"driver=nbd,node-name=remote,server.type=unix,"
                                f"server.path={s1},export=e,reconnect-delay=1,read-only=on",
        "--nbd-server", f"addr.type=unix,addr.path={s2}",
        "--export", "nbd,id=x,node-name=remote,name=x")
    with running(qsd_argv, qsd_qmp):
        wait_for_socket(s1)
        with running(ours, ours_qmp):
            wait_for_socket(s2)
            theirs_url, ours_url = f"nbd+unix:///e?socket={s1}", f"nbd+unix:///x?socket={s2}"
            assert run("nbdinfo", "--map", ours_url) == run("nbdinfo", "--map", theirs_url)
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", ours_url, theirs_url)


def _serve(img: Path, sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-k", str(sock), str(img)],
                            stderr=subprocess.DEVNULL)
    wait_for_socket(sock, proc)
    return proc


def _stop(proc: subprocess.Popen[bytes], sock: Path) -> None:
    proc.terminate()
    proc.wait(timeout=TIMEOUT)
    sock.unlink(missing_ok=True)


@pytest.mark.parametrize("delay", [0, 5])
def test_reconnect_delay(tmp_path: Path, delay: int) -> None:
    """The server restarts under an open node: with reconnect-delay a read issued while it
    is down waits for it and succeeds, and a write after it lands in the image; without,
    the read fails with EIO and so does the flush when closing (nothing is reported
    durable that may not be)."""
    img, sock = tmp_path / "r.raw", tmp_path / "r.sock"
    img.write_bytes(b"\x42" * SIZE)
    proc = _serve(img, sock)
    procs: list[subprocess.Popen[bytes]] = []
    disk = qblock.open({"driver": "nbd", "server": {"type": "unix", "path": str(sock)},
                        "reconnect-delay": delay})
    try:
        assert disk.read(0, 4) == b"\x42" * 4
        _stop(proc, sock)
        restart = threading.Timer(0.5, lambda: procs.append(_serve(img, sock)))
        restart.start()
        if delay:
            assert disk.read(4096, 4) == b"\x42" * 4
            disk.write(8192, b"\x01\x02")
            disk.close()
        else:
            with pytest.raises(qblock.QBlockError) as err:
                disk.read(4096, 4)
            assert err.value.errno == errno.EIO
            with pytest.raises(qblock.QBlockError) as err:
                disk.close()
            assert err.value.errno == errno.EIO
        restart.join()
    finally:
        qblock.run(disk.backend.close())
        for p in procs:
            _stop(p, sock)
    assert img.read_bytes()[8192:8194] == (b"\x01\x02" if delay else b"\x42\x42")
