"""A real ``qblock daemon`` process driven by QEMU's own clients.

qemu.qmp's QMPClient runs the control commands, ``qmp-shell`` talks to the daemon in its
``name key=value`` syntax, and shutdown by SIGTERM or ``quit`` leaves the qcow2 image clean
(``qemu-img check``, no dirty flag) with the socket and pid file removed.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_tools import env, qblock, qblock_daemon_argv, running, wait_for_socket

qmp = pytest.importorskip("qemu.qmp")
pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

QEMU_IMG = shutil.which("qemu-img")
requires_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")


def seed_blockdevs(image: Path) -> list[str]:
    """The two --blockdev lines of the seed, as given."""
    return ["--blockdev", f"node-name=file01,driver=file,aio=threads,filename={image},"
                          "cache.direct=on,cache.no-flush=off",
            "--blockdev", "node-name=drive01,driver=qcow2,cache.direct=on,cache.no-flush=off,"
                          "file=file01"]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    if QEMU_IMG is None:
        pytest.skip("qemu-img is not installed")
    path = tmp_path / "test01.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def image_is_clean(path: Path) -> None:
    check = subprocess.run([QEMU_IMG, "check", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    info = json.loads(subprocess.run([QEMU_IMG, "info", "--output=json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["dirty-flag"] is False


async def control_session(sock: Path) -> dict[str, object]:
    client = qmp.QMPClient("test")
    await client.connect(str(sock))
    try:
        return {
            "greeting": client.greeting._raw,
            "version": await client.execute("query-version"),
            "commands": await client.execute("query-commands"),
            "schema": await client.execute("query-qmp-schema"),
            "nodes": await client.execute("query-named-block-nodes", {"flat": True}),
        }
    finally:
        await client.disconnect()


def test_seed_command_line_and_qmpclient(tmp_path: Path, image: Path) -> None:
    argv, sock = qblock(tmp_path, *seed_blockdevs(image), "--pidfile", str(tmp_path / "pid"))
    with running(argv, sock) as proc:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert (tmp_path / "pid").read_text() == f"{proc.pid}\n"
        out = asyncio.run(control_session(sock))
        assert out["greeting"]["QMP"]["capabilities"] == ["oob"]
        assert out["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
        assert out["version"]["package"].startswith("qblock ")
        names = [c["name"] for c in out["commands"]]
        for name in ("qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
                     "quit", "blockdev-add", "query-named-block-nodes"):
            assert name in names
        assert {"name": "query-version", "meta-type": "command", "arg-type": "q_empty",
                "ret-type": "any", "allow-oob": False} in out["schema"]
        assert {n["node-name"] for n in out["nodes"]} >= {"file01", "drive01"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert not sock.exists() and not (tmp_path / "pid").exists()
    image_is_clean(image)


def test_write_then_sigterm_leaves_image_clean(tmp_path: Path, image: Path) -> None:
    """A metadata write through QMP (block_resize rewrites the qcow2 header), then SIGTERM:
    the image is consistent, not dirty, and has the new size."""
    argv, sock = qblock(tmp_path, *seed_blockdevs(image))

    async def resize() -> None:
        client = qmp.QMPClient("test")
        await client.connect(str(sock))
        try:
            await client.execute("block_resize", {"node-name": "drive01", "size": 32 << 20})
        finally:
            await client.disconnect()

    with running(argv, sock) as proc:
        asyncio.run(resize())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    image_is_clean(image)
    info = json.loads(subprocess.run([QEMU_IMG, "info", "--output=json", str(image)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == 32 << 20


def test_quit_command_shuts_down(tmp_path: Path, image: Path) -> None:
    argv, sock = qblock(tmp_path, *seed_blockdevs(image))

    async def quit_() -> object:
        client = qmp.QMPClient("test")
        await client.connect(str(sock))
        reply = await client.execute("quit")
        with contextlib.suppress(EOFError):  # the server hangs up after replying, as QEMU does
            await client.disconnect()
        return reply

    with running(argv, sock) as proc:
        assert asyncio.run(quit_()) == {}
        assert proc.wait(timeout=20) == 0
    assert not sock.exists()
    image_is_clean(image)


def test_qmp_shell(tmp_path: Path, image: Path) -> None:
    shell = shutil.which("qmp-shell") or str(Path(sys.executable).parent / "qmp-shell")
    if not os.path.exists(shell):
        pytest.skip("qmp-shell is not installed")
    argv, sock = qblock(tmp_path, *seed_blockdevs(image))
    with running(argv, sock):
        result = subprocess.run(
            [shell, str(sock)], input="query-version\nquery-named-block-nodes flat=true\n"
            "qmp_capabilities\nnope-command\n", capture_output=True, text=True, timeout=60)
    out = result.stdout
    assert "Connected to QEMU 7.2.0" in out
    assert '"package": "qblock' in out
    assert '"node-name": "drive01"' in out
    assert "Capabilities negotiation is already complete, command ignored" in out
    assert "The command nope-command has not been found" in out


def test_daemonize_and_pidfile(tmp_path: Path, image: Path) -> None:
    pidfile = tmp_path / "qsd.pid"
    argv, sock = qblock(tmp_path, *seed_blockdevs(image), "--daemonize", "--pidfile",
                        str(pidfile))
    parent = subprocess.run(argv, env=env(), capture_output=True, timeout=60)
    assert parent.returncode == 0, parent.stderr
    wait_for_socket(sock)
    pid = int(pidfile.read_text())
    try:
        assert pid != os.getpid()
        os.kill(pid, 0)
        # A second daemon on the same pid file fails to start; --daemonize reports it.
        argv2, _ = qblock(tmp_path, "--daemonize", "--pidfile", str(pidfile), name="b.sock")
        second = subprocess.run(argv2, env=env(), capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "Cannot lock pid file" in second.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        if not pidfile.exists():
            break
        asyncio.run(asyncio.sleep(0.05))
    assert not pidfile.exists() and not sock.exists()
    image_is_clean(image)


@pytest.mark.parametrize("args, message", [
    (["--blockdev", "driver=file,node-name=a,filename=/nonexistent/x"], "No such file"),
    (["--monitor", "chardev=nope"], 'chardev "nope" not found'),
    (["--object", "foo,id=x"], "Parameter 'qom-type' does not accept value 'foo'"),
    (["--blockdev", "driver=null-co,node-name=n0", "--export", "type=nbd,id=e0,node-name=n0"],
     "--export type=nbd,id=e0,node-name=n0: NBD server not running"),
    (["--bogus"], "unrecognized option '--bogus'"),
    (["extra"], "extra: Unexpected argument"),
])
def test_startup_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = subprocess.run(qblock_daemon_argv(*args), env=env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert message in result.stderr


def test_help_version_and_iothread(tmp_path: Path) -> None:
    help_ = subprocess.run(qblock_daemon_argv("--help"), env=env(), capture_output=True,
                           text=True, timeout=60)
    assert help_.returncode == 0 and "--blockdev" in help_.stdout
    version = subprocess.run(qblock_daemon_argv("-V"), env=env(), capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and "version 7.2.0" in version.stdout
    argv, sock = qblock(tmp_path, "--object", "iothread,id=io0")
    with running(argv, sock) as proc:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0


def test_quit_with_a_client_connected_is_silent(tmp_path: Path) -> None:
    """quit while another client is attached: clean exit, nothing on stderr."""
    argv, sock = qblock(tmp_path, "--blockdev", "driver=null-co,node-name=n0")
    proc = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)

        async def scenario() -> None:
            idle, quitter = qmp.QMPClient("idle"), qmp.QMPClient("quitter")
            await idle.connect(str(sock))
            await quitter.connect(str(sock))
            await quitter.execute("quit")

        try:
            asyncio.run(scenario())
        except EOFError:
            pass  # qemu.qmp reports the server closing first, as it does with QEMU
        assert proc.wait(timeout=20) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
