"""``qblock ctl`` against running daemons: the real qemu-storage-daemon (the oracle) and
``qblock daemon`` started with the same command line.

domblkinfo must give libvirt's numbers (REFERENCE §9): for qcow2 on a file capacity =
virtual-size, allocation = actual-size = st_blocks·512, physical = st_size; for raw with writes
allocation = wr_highest_offset.  The graph must be drawn the same from both daemons.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from daemon_tools import running

pytestmark = pytest.mark.interop

SRC = Path(__file__).resolve().parents[2] / "src"
QSD = shutil.which("qemu-storage-daemon")
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
requires_qsd = pytest.mark.skipif(QSD is None or QEMU_IMG is None or QEMU_IO is None,
                                  reason="qemu-storage-daemon, qemu-img, qemu-io needed")
ENV = {**os.environ, "PYTHONPATH": str(SRC), "LC_ALL": "C"}

# Seed 000's command line, with a relative filename as given there.
SEED_BLOCKDEVS = [
    "--blockdev", "node-name=file01,driver=file,aio=threads,filename=test01.qcow2,"
                  "cache.direct=on,cache.no-flush=off",
    "--blockdev", "node-name=drive01,driver=qcow2,cache.direct=on,cache.no-flush=off,"
                  "file=file01"]


def _daemon_argv(kind: str) -> list[str]:
    if kind == "qsd":
        return [QSD or "qemu-storage-daemon"]
    return [sys.executable, "-m", "qblock.cli.main", "daemon"]


@contextlib.contextmanager
def daemon(kind: str, workdir: Path, args: list[str]) -> Iterator[Path]:
    """Start a daemon in ``workdir`` with a QMP socket there; always stop it."""
    sock = workdir / "qmp.sock"
    argv = [*_daemon_argv(kind), *args,
            "--chardev", f"socket,path={sock},server=on,wait=off,id=mon0",
            "--monitor", "chardev=mon0"]
    with running(argv, sock, cwd=workdir):
        yield sock


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qblock.cli.main", "ctl", *args],
                          capture_output=True, text=True, env=ENV, timeout=60)


def parse_domblkinfo(out: str) -> dict[str, int]:
    values = {}
    for line in out.splitlines()[:3]:
        label, value = line.split(":", 1)
        values[label] = int(value)
    return values


def qmp(sock: Path, command: str, arguments: dict[str, Any] | None = None) -> Any:
    async def run() -> Any:
        client = QMPClient("test")
        await client.connect(str(sock))
        try:
            return await client.execute(command, arguments)
        finally:
            await client.disconnect()
    return asyncio.run(run())


def seed_image(workdir: Path) -> Path:
    path = workdir / "test01.qcow2"
    subprocess.run([QEMU_IMG or "qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"],
                   check=True)
    subprocess.run([QEMU_IO or "qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 3M",
                    "-c", "write -P 0x22 9M 512k", str(path)], check=True, capture_output=True)
    return path


def _qblock_daemon_ready() -> None:
    if importlib.util.find_spec("qblock.cli.daemon") is None:
        pytest.skip("qblock daemon is not written yet")


@pytest.fixture(params=["qsd", "qblock"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "qblock":
        _qblock_daemon_ready()
    return request.param


@requires_qsd
def test_domblkinfo_qcow2_on_file(tmp_path: Path, kind: str) -> None:
    image = seed_image(tmp_path)
    with daemon(kind, tmp_path, SEED_BLOCKDEVS) as sock:
        proc = ctl("domblkinfo", "drive01", "--socket", str(sock))
        assert proc.returncode == 0, proc.stderr
        got = parse_domblkinfo(proc.stdout)
        named = {n["node-name"]: n for n in qmp(sock, "query-named-block-nodes", {"flat": True})}
        st = os.stat(image)
    header_size = struct.unpack(">Q", image.read_bytes()[24:32])[0]  # qcow2.txt "Header": size
    assert got == {"Capacity": header_size, "Allocation": st.st_blocks * 512,
                   "Physical": st.st_size}
    # ... which is what libvirt reads from the daemon's replies
    assert got["Capacity"] == named["drive01"]["image"]["virtual-size"] == 64 << 20
    assert got["Allocation"] == named["drive01"]["image"]["actual-size"]
    assert f"Host allocated: {st.st_blocks * 512}" in proc.stdout
    assert "For qcow2 on a file, Allocation counts the clusters" in proc.stdout


@requires_qsd
def test_domblkinfo_offline_agrees_with_running(tmp_path: Path, kind: str) -> None:
    image = seed_image(tmp_path)
    offline = ctl("domblkinfo", "--offline", str(image), "--brief")
    with daemon(kind, tmp_path, SEED_BLOCKDEVS) as sock:
        running = ctl("domblkinfo", "drive01", "--socket", str(sock), "--brief")
    assert offline.returncode == running.returncode == 0, offline.stderr + running.stderr
    assert offline.stdout == running.stdout


@requires_qsd
def test_domblkinfo_unknown_node(tmp_path: Path, kind: str) -> None:
    seed_image(tmp_path)
    with daemon(kind, tmp_path, SEED_BLOCKDEVS) as sock:
        proc = ctl("domblkinfo", "nosuch", "--socket", str(sock))
    assert proc.returncode == 1
    assert proc.stderr == "qblock ctl: cannot find statistics for device 'nosuch'\n"


@requires_qsd
def test_graph_text_same_from_both_daemons(tmp_path: Path) -> None:
    _qblock_daemon_ready()
    seed_image(tmp_path)
    texts = {}
    for kind in ("qsd", "qblock"):
        with daemon(kind, tmp_path, SEED_BLOCKDEVS) as sock:
            proc = ctl("graph", "--socket", str(sock))
        assert proc.returncode == 0, proc.stderr
        texts[kind] = proc.stdout
    assert texts["qsd"].splitlines()[:2] == ["drive01 (qcow2) test01.qcow2",
                                             "└── file: file01 (file) test01.qcow2"]
    assert texts["qblock"] == texts["qsd"]


@requires_qsd
def test_domblkinfo_raw_uses_wr_highest_offset_and_png(tmp_path: Path) -> None:
    """Through an NBD export (qsd only until qblock has one): raw on a file reports the highest
    host offset written as Allocation, QEMU's actual-size as Physical; the graph with the
    export's BlockBackend is seed 000's picture."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    nbd = tmp_path / "nbd.sock"
    args = ["--blockdev", "driver=file,node-name=file01,filename=disk.raw",
            "--blockdev", "driver=raw,node-name=drive01,file=file01",
            "--nbd-server", f"addr.type=unix,addr.path={nbd}",
            "--export", "type=nbd,id=exp01,node-name=drive01,name=drive01,writable=on"]
    with daemon("qsd", tmp_path, args) as sock:
        subprocess.run([QEMU_IO or "qemu-io", "-f", "raw", "-c", "write -P 0x33 4M 1M",
                        f"nbd+unix:///drive01?socket={nbd}"], check=True, capture_output=True)
        proc = ctl("domblkinfo", "drive01", "--socket", str(sock))
        graph = ctl("graph", "--socket", str(sock))
        png = tmp_path / "seed000.png"
        picture = ctl("graph", "--socket", str(sock), "--format", "png", "-o", str(png))
        st = os.stat(image)
    assert proc.returncode == 0, proc.stderr
    assert parse_domblkinfo(proc.stdout) == {"Capacity": 16 << 20, "Allocation": 5 << 20,
                                             "Physical": st.st_blocks * 512}
    assert "Allocation = wr_highest_offset" in proc.stdout
    assert graph.stdout.splitlines()[:2] == ["BlockBackend (export exp01)",
                                             "└── root: drive01 (raw) disk.raw"]
    assert picture.returncode == 0 and picture.stderr == ""
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



@requires_qsd
def test_graph_over_tcp(tmp_path: Path, kind: str) -> None:
    seed_image(tmp_path)
    with socket.socket() as s:  # a free port; the daemon binds it right after
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*SEED_BLOCKDEVS, "--chardev", f"socket,host=127.0.0.1,port={port},server=on,"
            "wait=off,id=tcp0", "--monitor", "chardev=tcp0"]
    with daemon(kind, tmp_path, args):
        proc = ctl("graph", "--tcp", f"127.0.0.1:{port}", "--format", "dot")
    assert proc.returncode == 0, proc.stderr
    assert '[label="drive01\\nqcow2\\ntest01.qcow2"' in proc.stdout
    assert '[label="file01\\nfile\\ntest01.qcow2"' in proc.stdout
    assert proc.stdout.count(" -> ") == 1 and '[label="file\\nperm: ' in proc.stdout
