"""The NBD export against real clients: qemu-img, qemu-io, nbdinfo, nbdcopy, raw sockets, and
the real qemu-storage-daemon exporting the same image."""
from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from daemon_tools import env, qblock, qsd, running, wait_for_socket
from qblock.exports.nbd import protocol as p

pytestmark = pytest.mark.skipif(not (shutil.which("nbdinfo") and shutil.which("qemu-img")),
                                reason="needs nbdinfo and qemu-img")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=check)


def make_image(path: Path) -> Path:
    """A 16 MiB qcow2 with data, a zeroed cluster and holes."""
    run("qemu-img", "create", "-f", "qcow2", str(path), "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 1M", "-c", "write -z 4M 64k",
        "-c", "write -P 0x01 8M 4k", str(path))
    return path


def export_args(image: Path, nbd: Path, *extra: str) -> list[str]:
    return ["--blockdev", f"driver=file,node-name=file01,filename={image}",
            "--blockdev", "driver=qcow2,node-name=drive01,file=file01",
            "--nbd-server", f"addr.type=unix,addr.path={nbd}",
            "--export", "type=nbd,id=exp01,node-name=drive01,name=drive01,writable=on" +
            "".join(extra)]


def uri(nbd: Path, name: str = "drive01") -> str:
    return f"nbd+unix:///{name}?socket={nbd}"


@contextmanager
def qblock_export(tmp: Path, image: Path, *extra: str) -> Iterator[Path]:
    nbd = tmp / "nbd.sock"
    argv, sock = qblock(tmp, *export_args(image, nbd, *extra))
    with running(argv, sock):
        yield nbd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def map_json(target: str) -> list[dict[str, object]]:
    out = json.loads(run("qemu-img", "map", "-f", "raw" if target.startswith("nbd") else "qcow2",
                         "--output=json", target).stdout)
    return [{k: e[k] for k in ("start", "length", "zero", "data")} for e in out]


def test_qemu_tools_and_nbdcopy_over_unix(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2")
    with qblock_export(tmp_path, image) as nbd:
        info = json.loads(run("qemu-img", "info", "--output=json", uri(nbd)).stdout)
        assert info["virtual-size"] == 16 << 20 and info["format"] == "raw"
        assert run("qemu-img", "compare", "-U", str(image), uri(nbd)).returncode == 0
        merged = map_json(uri(nbd))
        assert {(e["start"], e["data"]) for e in merged if e["data"]} == {(1 << 20, True),
                                                                         (8 << 20, True)}
        out = run("qemu-io", "-f", "raw", "-c", "write -P 0xcd 2M 512k", "-c",
                  "read -P 0xcd 2M 512k", "-c", "read -P 0xab 1M 1M", "-c",
                  "write -z 8M 4k", "-c", "read -P 0 8M 4k", uri(nbd)).stdout
        assert "Pattern verification failed" not in out and out.count("read ") == 3
        for conns in ("1", "4"):
            dest = tmp_path / f"copy{conns}.raw"
            run("nbdcopy", "-C", conns, uri(nbd), str(dest))
            assert run("qemu-img", "compare", "-U", "-f", "raw", str(dest), uri(nbd)).returncode == 0
    # the daemon has shut down: the image holds what was written, and is consistent
    assert run("qemu-img", "check", str(image)).returncode == 0
    expect = tmp_path / "expect.qcow2"
    make_image(expect)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 2M 512k", "-c", "write -z 8M 4k",
        str(expect))
    assert run("qemu-img", "compare", str(image), str(expect)).returncode == 0


def test_qblock_nbd_over_tcp_read_only(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2")
    port = free_port()
    argv = [sys.executable, "-m", "qblock.cli.main", "nbd", "-r", "-t", "-x", "ro",
            "-b", "127.0.0.1", "-p", str(port), "-f", "qcow2", str(image)]
    proc = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    target = f"nbd://127.0.0.1:{port}/ro"
    try:
        for _ in range(200):
            if run("nbdinfo", "--size", target, check=False).returncode == 0:
                break
            time.sleep(0.05)
        assert run("nbdinfo", "--size", target).stdout.strip() == str(16 << 20)
        assert "is_read_only: true" in run("nbdinfo", target).stdout
        assert run("qemu-img", "compare", "-U", str(image), target).returncode == 0
        copy = tmp_path / "copy.qcow2"
        run("qemu-img", "convert", "-O", "qcow2", target, str(copy))
        assert run("qemu-img", "compare", "-U", str(image), str(copy)).returncode == 0
        assert '"virtual-size": 16777216' in run("qemu-img", "info", "--output=json",
                                                 target).stdout
        assert '"data": true' in run("qemu-img", "map", "--output=json", target).stdout
        res = run("qemu-io", "-f", "raw", "-c", "write 0 4k", target, check=False)
        assert res.returncode == 1 and "Permission denied" in res.stderr  # READ_ONLY flag
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        for stream in (proc.stdout, proc.stderr):
            assert stream is not None
            stream.close()
    assert proc.returncode == 0


def nbdinfo_views(target: str) -> list[str]:
    plain = [line for line in run("nbdinfo", target).stdout.splitlines()
             if not line.strip().startswith(("uri:", "content:"))]
    return [*plain, run("nbdinfo", "--map", target).stdout,
            run("nbdinfo", "--map=qemu:allocation-depth", target).stdout]


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs qsd")
def test_nbdinfo_matches_qemu_storage_daemon(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    base = make_image(tmp_path / "base.qcow2")
    for d in (ours, theirs):
        run("qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
            str(d / "top.qcow2"))
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1536k 1M", str(d / "top.qcow2"))
    with qblock_export(ours, ours / "top.qcow2", ",allocation-depth=on") as nbd:
        got = nbdinfo_views(uri(nbd))
    nbd = theirs / "nbd.sock"
    argv, sock = qsd(theirs, *export_args(theirs / "top.qcow2", nbd, ",allocation-depth=on"))
    with running(argv, sock):
        wait_for_socket(nbd)
        want = nbdinfo_views(uri(nbd))
    assert got == want
    assert any("qemu:allocation-depth" in line for line in got)


def handshake(nbd: Path, name: bytes = b"drive01") -> socket.socket:
    """A raw client that reached transmission with structured replies."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(nbd))
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", p.IHAVEOPT, p.Opt.STRUCTURED_REPLY, 0))
    recv_exact(s, 20)
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", p.IHAVEOPT, p.Opt.GO, len(data)) + data)
    while True:
        _, _, rep, n = struct.unpack(">QIII", recv_exact(s, 20))
        payload = recv_exact(s, n)
        assert not rep & (1 << 31), payload
        if rep == p.Rep.ACK:
            return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def req(cmd: int, offset: int, length: int, flags: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, 1, offset, length) + data


def error_of(s: socket.socket) -> int:
    _, _, _, _, n = struct.unpack(">IHHQI", recv_exact(s, 20))
    return struct.unpack(">I", recv_exact(s, n)[:4])[0]


def test_hostile_clients_do_not_hurt_others(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2")
    with qblock_export(tmp_path, image) as nbd:
        with socket.socket(socket.AF_UNIX) as s:  # wrong magic in the options
            s.connect(str(nbd))
            recv_exact(s, 18)
            s.sendall(struct.pack(">I", 1) + b"NOTMAGIC" + bytes(8))
            assert s.recv(100) == b""
        with socket.socket(socket.AF_UNIX) as s:  # unknown option
            s.connect(str(nbd))
            recv_exact(s, 18)
            s.sendall(struct.pack(">I", 1) + struct.pack(">QII", p.IHAVEOPT, 77, 0))
            assert struct.unpack(">QIII", recv_exact(s, 20))[2] == p.Rep.ERR_UNSUP
        with handshake(nbd) as s:
            s.sendall(req(p.Cmd.READ, 16 << 20, 4096))
            assert error_of(s) == p.NBD_EINVAL
            s.sendall(req(p.Cmd.WRITE, (16 << 20) - 1, 2, data=b"zz"))
            assert error_of(s) == p.NBD_ENOSPC
            s.sendall(req(p.Cmd.READ, 0, 64 << 20))
            assert error_of(s) == p.NBD_EINVAL
            s.sendall(req(p.Cmd.WRITE, 0, 64 << 20))
            assert error_of(s) == p.NBD_EINVAL
            assert s.recv(100) == b""  # the payload cannot be skipped: dropped
        with handshake(nbd) as s:  # disconnects in the middle of a write payload
            s.sendall(req(p.Cmd.WRITE, 0, 65536, data=b"\xee" * 1000))
        stalled = handshake(nbd)  # asks for 64 MiB of reads and never reads a reply
        for i in range(64):
            stalled.sendall(req(p.Cmd.READ, (i % 16) << 20, 1 << 20))
        with handshake(nbd) as s:  # an unaligned read and write of odd sizes are served
            s.sendall(req(p.Cmd.WRITE, 3 << 20 | 7, 5, data=b"\xab" * 5))
            assert struct.unpack(">IIQ", recv_exact(s, 16))[:2] == (p.SIMPLE_REPLY_MAGIC, 0)
        flood = [socket.socket(socket.AF_UNIX) for _ in range(50)]
        for s in flood:
            s.connect(str(nbd))
        out = run("qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 1M", uri(nbd)).stdout
        assert "read 1048576/1048576" in out
        for s in flood:
            s.close()
        stalled.close()
    expect = make_image(tmp_path / "expect.qcow2")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 3145735 5", str(expect))
    assert run("qemu-img", "compare", str(image), str(expect)).returncode == 0


def test_read_only_export_refuses_writes(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2")
    nbd = tmp_path / "nbd.sock"
    args = export_args(image, nbd)
    args[-1] = args[-1].replace("writable=on", "writable=off")
    argv, sock = qblock(tmp_path, *args)
    with running(argv, sock), handshake(nbd) as s:
        for cmd in (p.Cmd.WRITE, p.Cmd.TRIM, p.Cmd.WRITE_ZEROES):
            s.sendall(req(cmd, 0, 4, data=b"abcd" if cmd == p.Cmd.WRITE else b""))
            assert error_of(s) == p.NBD_EPERM
    assert run("qemu-img", "compare", str(image),
               str(make_image(tmp_path / "expect.qcow2"))).returncode == 0


def test_seed_flow_writes_through_export(tmp_path: Path) -> None:
    """Seed 004: the seed's --blockdev lines (cache.direct=on) plus a writable export; qemu-io
    writes through it; afterwards the image equals the same writes made by qemu-io directly."""
    image, expect = tmp_path / "test01.qcow2", tmp_path / "expect.qcow2"
    for path in (image, expect):
        run("qemu-img", "create", "-f", "qcow2", str(path), "128M")
    nbd = tmp_path / "nbd.sock"
    writes = ["-c", "write -P 0xcd 1M 2M", "-c", "write -P 0xef 64M 16M",
              "-c", "write -z 1536k 64k"]
    argv, sock = qblock(
        tmp_path, "--blockdev", f"node-name=file01,driver=file,aio=threads,filename={image},"
                                "cache.direct=on,cache.no-flush=off",
        "--blockdev", "node-name=drive01,driver=qcow2,cache.direct=on,cache.no-flush=off,"
                      "file=file01",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "type=nbd,id=exp01,node-name=drive01,name=drive01,writable=on")
    with running(argv, sock):
        wait_for_socket(nbd)
        out = run("qemu-io", "-f", "raw", *writes, uri(nbd)).stdout
        assert out.count("wrote") == 3
    run("qemu-io", "-f", "qcow2", *writes, str(expect))
    assert run("qemu-img", "check", str(image)).returncode == 0
    assert run("qemu-img", "compare", str(image), str(expect)).stdout == "Images are identical.\n"


def test_pipelined_requests_all_answered(tmp_path: Path) -> None:
    """32 requests sent at once (more than the 16 in flight): every cookie gets its reply,
    the reads see the data, nothing is lost when replies come back in any order."""
    image = make_image(tmp_path / "disk.qcow2")
    with qblock_export(tmp_path, image) as nbd, handshake(nbd) as s:
        batch = b""
        for i in range(16):
            batch += struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 100 + i,
                                 (2 << 20) + i * 4096, 4096) + bytes([i]) * 4096
            batch += struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, 200 + i,
                                 (1 << 20) + i * 65536, 65536)
        s.sendall(batch + struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.CACHE, 300, 0,
                                      16 << 20))
        seen: dict[int, bytes] = {}
        while len(seen) < 33:
            magic = struct.unpack(">I", recv_exact(s, 4))[0]
            if magic == p.SIMPLE_REPLY_MAGIC:
                error, cookie = struct.unpack(">IQ", recv_exact(s, 12))
                assert error == 0
                seen[cookie] = b""
                continue
            flags, rtype, cookie, n = struct.unpack(">HHQI", recv_exact(s, 16))
            payload = recv_exact(s, n)
            assert rtype == p.ReplyType.OFFSET_DATA and flags & p.REPLY_FLAG_DONE
            seen[cookie] = payload[8:]
        assert sorted(seen) == [*range(100, 116), *range(200, 216), 300]
        assert all(seen[200 + i] == b"\xab" * 65536 for i in range(16))
    out = run("qemu-io", "-f", "qcow2", *[a for i in range(16) for a in
                                          ("-c", f"read -P {i} {(2 << 20) + i * 4096} 4k")],
              str(image)).stdout
    assert "Pattern verification failed" not in out and out.count("read 4096/4096") == 16


def test_handshake_timeout_drops_idle_client(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2")
    nbd = tmp_path / "nbd.sock"
    args = export_args(image, nbd)
    args[5] += ",handshake-max-seconds=1"
    argv, sock = qblock(tmp_path, *args)
    with running(argv, sock), socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(nbd))
        recv_exact(s, 18)
        start = time.monotonic()
        assert s.recv(100) == b""
        assert 0.5 < time.monotonic() - start < 5


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-nbd")
def test_qblock_nbd_answers_like_qemu_nbd(tmp_path: Path) -> None:
    """``qblock nbd -x NAME -k SOCK`` and ``qemu-nbd`` with the same options on copies of one
    image: nbdinfo and nbdinfo --map agree; without -t both exit after the client leaves."""
    views = []
    for tool in ("qblock", "qemu-nbd"):
        image = make_image(tmp_path / f"{tool}.qcow2")
        nbd = tmp_path / f"{tool}.sock"
        prog = ([sys.executable, "-m", "qblock.cli.main", "nbd"] if tool == "qblock"
                else ["qemu-nbd"])
        proc = subprocess.Popen([*prog, "-x", "d", "-k", str(nbd), "-f", "qcow2",
                                 "-D", "a disk", str(image)], env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for_socket(nbd, proc)
            views.append([line for line in run("nbdinfo", uri(nbd, "d")).stdout.splitlines()
                          if not line.strip().startswith(("uri:", "content:"))])
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                assert stream is not None
                stream.close()
    assert views[0] == views[1]


def test_qblock_nbd_fork(tmp_path: Path) -> None:
    """--fork: the parent exits 0 once the socket listens; the server exits (removing its
    socket) after its only client leaves, since -t was not given."""
    image = make_image(tmp_path / "disk.qcow2")
    nbd = tmp_path / "fork.sock"
    parent = subprocess.run([sys.executable, "-m", "qblock.cli.main", "nbd", "--fork", "-k",
                             str(nbd), str(image)], env=env(), capture_output=True, timeout=60)
    assert parent.returncode == 0 and nbd.exists()
    assert run("nbdinfo", "--size", f"nbd+unix:///?socket={nbd}").stdout.strip() == str(16 << 20)
    for _ in range(200):
        if not nbd.exists():
            break
        time.sleep(0.05)
    assert not nbd.exists()
