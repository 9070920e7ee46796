"""A ``qblock daemon`` or qemu-storage-daemon driven over QMP for one benchmark run.

Shared by the scenarios that time QMP scripts from outside (commit, bitmaps): spawn the daemon
with a monitor socket, connect qemu.qmp's QMPClient, run a script, quit, and fail loudly on a
non-zero exit or anything on stderr.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from qemu.qmp import QMPClient

from bench.sockets import wait_listening
from bench.workload import worker_env

TIMEOUT = 600.0
T = TypeVar("T")


def daemon_argv(side: str, sock: Path) -> list[str]:
    """The daemon of ``side`` ("qblock" or "qemu") with its QMP monitor on ``sock``."""
    tool = ([sys.executable, "-m", "qblock.cli.main", "daemon"] if side == "qblock"
            else ["qemu-storage-daemon"])
    return [*tool, "--chardev", f"socket,path={sock},server=on,wait=off,id=m0",
            "--monitor", "chardev=m0"]


async def with_daemon(side: str, script: Callable[[QMPClient], Awaitable[T]]) -> tuple[float, T]:
    """Spawn a daemon, run ``script`` on its monitor, quit it.

    Returns the wall time from spawn to exit and what ``script`` returned.
    """
    sockdir = Path(tempfile.mkdtemp(prefix="qblock-bench-"))
    sock = sockdir / "qmp.sock"
    start = time.perf_counter()
    proc = subprocess.Popen(daemon_argv(side, sock), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=worker_env() if side == "qblock" else None)
    client = QMPClient("bench")
    try:
        wait_listening(sock, proc, f"{side} daemon")
        await client.connect(str(sock))
        result = await script(client)
        await client.execute("quit")
        try:
            await client.disconnect()
        except EOFError:  # the daemon closed the monitor as it quit: what quit asks for
            pass
        proc.wait(timeout=TIMEOUT)
        elapsed = time.perf_counter() - start
        err = proc.stderr.read().decode().strip() if proc.stderr else ""
        if proc.returncode != 0 or err:
            raise RuntimeError(f"{side} daemon failed (exit {proc.returncode}): {err[:2000]}")
        return elapsed, result
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(sockdir, ignore_errors=True)
