"""NBD over TLS: ``tls-creds-x509`` objects in ``qblock daemon`` and ``qblock nbd``, STARTTLS
with Python's ssl, checked with libnbd's nbdinfo/nbdcopy and against qemu-nbd.

Certificates are made with openssl in tmp_path under QEMU's file names.  A client with the
CA and a client certificate reads the export (nbdcopy's copy equals the image); a client
without TLS, or without a client certificate (verify-peer is on by default), is refused.
Before STARTTLS every option gets NBD_REP_ERR_TLS_REQD with QEMU's message, byte for byte
the same as qemu-nbd's reply.
"""
from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_tools import env, qblock, qsd, running
from qblock.exports.nbd import protocol as p

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("openssl", "qemu-img", "qemu-nbd", "nbdinfo",
                                          "nbdcopy")),
    reason="openssl, qemu-img, qemu-nbd, nbdinfo and nbdcopy are needed")
TIMEOUT = 30
NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    assert not check or res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"
    return res


def make_certs(d: Path) -> None:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    d.mkdir()
    run("openssl", "req", "-x509", *NEW_KEY,
        "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"), "-days", "2",
        "-subj", "/CN=qblock test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for role, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                 "extendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (d / f"{role}.ext").write_text(
            ext + "basicConstraints=critical,CA:FALSE\n"
                  "keyUsage=critical,digitalSignature,keyEncipherment\n")
        run("openssl", "req", *NEW_KEY, "-keyout",
            str(d / f"{role}-key.pem"), "-out", str(d / f"{role}.csr"),
            "-subj", f"/CN={'localhost' if role == 'server' else 'qblock client'}")
        run("openssl", "x509", "-req", "-in", str(d / f"{role}.csr"), "-CA", str(d / "ca-cert.pem"),
            "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-days", "2",
            "-extfile", str(d / f"{role}.ext"), "-out", str(d / f"{role}-cert.pem"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls") / "pki"
    make_certs(d)
    only_ca = d.parent / "only-ca"
    only_ca.mkdir()
    shutil.copy(d / "ca-cert.pem", only_ca / "ca-cert.pem")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(400):
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server did not listen")


def image(tmp: Path) -> Path:
    img = tmp / "disk.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(img), "2M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 64k 300k", str(img))
    return img


def check_clients(port: int, export: str, certs: Path, img: Path, tmp: Path) -> None:
    """The right certificates read the whole export; no TLS or no client certificate fail."""
    url = f"nbds://localhost:{port}/{export}?tls-certificates={certs}"
    assert run("nbdinfo", "--size", url).stdout.strip() == str(2 * 1024 * 1024)
    out = tmp / "copy.raw"
    run("nbdcopy", url, str(out))
    run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(img), str(out))
    plain = run("nbdinfo", "--size", f"nbd://localhost:{port}/{export}", check=False)
    assert plain.returncode != 0
    assert "TLS" in plain.stderr or "tls" in plain.stderr
    no_cert = run("nbdinfo", "--size",
                  f"nbds://localhost:{port}/{export}?tls-certificates={certs.parent / 'only-ca'}",
                  check=False)
    assert no_cert.returncode != 0


def test_daemon_tls(tmp_path: Path, certs: Path) -> None:
    img = image(tmp_path)
    port = free_port()
    argv, sock = qblock(tmp_path,
                        "--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=server",
                        "--blockdev", f"driver=file,filename={img},node-name=file0",
                        "--blockdev", "driver=qcow2,file=file0,node-name=disk",
                        "--nbd-server",
                        f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0",
                        "--export", "nbd,id=e0,node-name=disk,name=e0")
    with running(argv, sock):
        check_clients(port, "e0", certs, img, tmp_path)


def test_daemon_unknown_creds(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "qblock.cli.main", "daemon", "--nbd-server",
                          "addr.type=inet,addr.host=127.0.0.1,addr.port=1,tls-creds=nope"],
                         env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 1
    assert "No TLS credentials with id 'nope'" in res.stderr


def tls_reqd_reply(port: int) -> bytes:
    """Client flags then NBD_OPT_LIST in clear: the whole option reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rb")
        assert len(f.read(18)) == 18
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 3, 0))
        head = f.read(20)
        (n,) = struct.unpack(">I", head[16:])
        return head + f.read(n)


@pytest.mark.parametrize("kind", ["qemu-nbd", "qblock"])
def test_nbd_cli_tls(tmp_path: Path, certs: Path, kind: str) -> None:
    img = image(tmp_path)
    port = free_port()
    prog = ["qemu-nbd"] if kind == "qemu-nbd" else [sys.executable, "-m", "qblock.cli.main",
                                                     "nbd"]
    proc = subprocess.Popen([*prog, "-f", "qcow2", "-t", "-x", "e", "-b", "127.0.0.1", "-p",
                             str(port), "--object",
                             f"tls-creds-x509,id=tls0,dir={certs},endpoint=server",
                             "--tls-creds", "tls0", str(img)], env=env(),
                            stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
        reply = tls_reqd_reply(port)
        assert reply[12:16] == struct.pack(">I", (1 << 31) | 5)  # NBD_REP_ERR_TLS_REQD
        assert reply[20:] == b"Option 0x3 not permitted before TLS"
        check_clients(port, "e", certs, img, tmp_path)
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
        assert proc.stderr is not None
        proc.stderr.close()


def _opt(option: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", 0x49484156454F5054, option, len(payload)) + payload


def test_sans_io_starttls_state() -> None:
    """The server core with TLS required: STARTTLS is acked and yields StartTLS, options are
    then served; ABORT before TLS gets TLS_REQD and closes; EXPORT_NAME drops."""
    exports = {"e": p.ExportInfo("e", 1 << 20)}
    conn = p.ServerConnection(exports, tls=True)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3) + _opt(p.Opt.STARTTLS))
    assert isinstance(conn.next_event(), p.StartTLS)
    assert conn.data_to_send()[12:16] == struct.pack(">I", p.Rep.ACK)
    conn.receive_data(_opt(p.Opt.STARTTLS))
    assert isinstance(conn.next_event(), p.NeedData)
    assert conn.data_to_send()[20:] == b"TLS already enabled"

    conn = p.ServerConnection(exports, tls=True)
    conn.receive_data(struct.pack(">I", 3) + _opt(p.Opt.ABORT))
    assert isinstance(conn.next_event(), p.Closed)
    assert conn.data_to_send()[18 + 12:18 + 16] == struct.pack(">I", p.Rep.ERR_TLS_REQD)

    conn = p.ServerConnection(exports, tls=True)
    conn.receive_data(struct.pack(">I", 3) + _opt(p.Opt.EXPORT_NAME, b"e"))
    with pytest.raises(p.ProtocolError, match="not permitted before TLS"):
        conn.next_event()


def test_client_driver_tls(tmp_path: Path, certs: Path) -> None:
    """``qblock daemon`` opens qemu-nbd's TLS export with ``--blockdev driver=nbd,
    tls-creds=`` (a client-endpoint object) and re-exports it in clear on a unix socket:
    the content equals the image; without tls-creds the node cannot be opened."""
    img = image(tmp_path)
    port = free_port()
    proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-t", "-x", "e", "-b", "127.0.0.1",
                             "-p", str(port), "-r", "--object",
                             f"tls-creds-x509,id=tls0,dir={certs},endpoint=server",
                             "--tls-creds", "tls0", str(img)], stderr=subprocess.PIPE)
    remote = f"driver=nbd,node-name=remote,server.type=inet,server.host=127.0.0.1," \
             f"server.port={port},export=e,read-only=on"
    try:
        wait_port(port, proc)
        nbd_sock = tmp_path / "re.sock"
        argv, sock = qblock(tmp_path,
                            "--object", f"tls-creds-x509,id=c0,dir={certs},endpoint=client",
                            "--blockdev", remote + ",tls-creds=c0",
                            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
                            "--export", "nbd,id=x,node-name=remote,name=x")
        with running(argv, sock):
            run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(img),
                f"nbd+unix:///x?socket={nbd_sock}")
        res = subprocess.run([sys.executable, "-m", "qblock.cli.main", "daemon",
                              "--blockdev", remote], env=env(), capture_output=True,
                             text=True, timeout=TIMEOUT)
        assert res.returncode == 1
        assert "TLS negotiation required before option" in res.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
        assert proc.stderr is not None
        proc.stderr.close()


def test_qmp_tls_creds_errors_match_qsd(tmp_path: Path, certs: Path) -> None:
    """nbd-server-start's tls-creds checks, and a working start, give qsd's replies."""
    qmp = pytest.importorskip("qemu.qmp")
    port = free_port()

    async def script(sock: Path) -> list[object]:
        client = qmp.QMPClient("test")
        await client.connect(str(sock))
        out: list[object] = []
        addr = {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}
        try:
            for creds in ("nope", "c0", "tls0"):
                try:
                    out.append(await client.execute("nbd-server-start",
                                                    {"addr": addr, "tls-creds": creds}))
                except qmp.ExecuteError as e:
                    out.append((e.error_class, str(e)))
            out.append(await client.execute("nbd-server-stop"))
        finally:
            await client.disconnect()
        return out

    results = {}
    for kind, make in (("qsd", qsd), ("qblock", qblock)):
        d = tmp_path / kind
        d.mkdir()
        argv, sock = make(d, "--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=server",
                          "--object", f"tls-creds-x509,id=c0,dir={certs},endpoint=client")
        with running(argv, sock):
            results[kind] = asyncio.run(script(sock))
    assert results["qblock"] == results["qsd"]
    assert results["qblock"][-2:] == [{}, {}]
