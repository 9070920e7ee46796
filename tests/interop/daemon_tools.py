"""Start and stop a real ``qblock daemon`` or ``qemu-storage-daemon`` for the interop tests."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bench.sockets import wait_listening as wait_for_socket

QSD = shutil.which("qemu-storage-daemon")
SRC = str(Path(__file__).resolve().parents[2] / "src")
T = TypeVar("T")


def graph_shape(graph: dict[str, Any]) -> list[tuple[Any, ...]]:
    """x-debug-query-block-graph as edges by node name (implicit #block names masked) with
    their permissions, sorted: comparable between daemons."""
    names = {n["id"]: ("#block" if n["name"].startswith("#block") else n["name"], n["type"])
             for n in graph["nodes"]}
    return sorted((names[e["parent"]], names[e["child"]], e["name"], sorted(e["perm"]),
                   sorted(e["shared-perm"])) for e in graph["edges"])


def event_waiter(client: Any, events: list[dict[str, Any]],
                 timeout: float = 30) -> Callable[..., Awaitable[None]]:
    """``await until(NAME, **match)``: record every event of a QMPClient into ``events``
    until one named NAME arrives whose data holds the ``match`` values."""
    async def until(name: str, **match: Any) -> None:
        async def wait() -> None:
            while True:
                ev = await client.events.get()
                data = ev.get("data", {})
                events.append({"event": ev["event"], "data": data})
                if ev["event"] == name and all(data.get(k) == v for k, v in match.items()):
                    return
        await asyncio.wait_for(wait(), timeout)
    return until


def qblock_daemon_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "qblock.cli.main", "daemon", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


@contextmanager
def running(argv: Sequence[str], sock: Path,
            cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run a daemon (in ``cwd``) until the block ends; always stopped (SIGTERM, then
    SIGKILL)."""
    proc = subprocess.Popen(list(argv), env=env(), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def qblock(tmp: Path, *args: str, name: str = "qmp.sock") -> tuple[list[str], Path]:
    sock = tmp / name
    return qblock_daemon_argv(*args, "--chardev", f"socket,path={sock},server=on,wait=off,id=m0",
                              "--monitor", "chardev=m0"), sock


def qsd(tmp: Path, *args: str, name: str = "qsd.sock") -> tuple[list[str], Path]:
    if QSD is None:
        pytest.skip("qemu-storage-daemon is not installed")
    sock = tmp / name
    return [QSD, *args, "--chardev", f"socket,path={sock},server=on,wait=off,id=m0",
            "--monitor", "chardev=m0"], sock


def raw_exchange(sock: Path, data: bytes, *, negotiate: bool = True,
                 quiet: float = 0.5) -> bytes:
    """Send ``data`` on a fresh connection; return everything received until ``quiet``
    seconds pass without output (the greeting and negotiation reply excluded)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        f = s.makefile("rb")
        f.readline()
        if negotiate:
            s.sendall(b'{"execute": "qmp_capabilities"}')
            f.readline()
        s.sendall(data)
        s.settimeout(quiet)
        out = b""
        try:
            while chunk := s.recv(1 << 16):
                out += chunk
        except TimeoutError:
            pass
        return out


def on_both_daemons(tmp: Path, prepare: Callable[[Path], object],
                    drive: Callable[[Path, Path], Awaitable[T]]) -> dict[str, T]:
    """Run one QMP script on qemu-storage-daemon, then on qblock daemon, each in its own folder
    that ``prepare`` fills first; returns each side's result by "qsd" / "qblock"."""
    results: dict[str, T] = {}
    for who, start in (("qsd", qsd), ("qblock", qblock)):
        d = tmp / who
        d.mkdir()
        prepare(d)
        argv, sock = start(d)
        with running(argv, sock):
            results[who] = asyncio.run(drive(sock, d))
    return results
