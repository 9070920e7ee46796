"""Wait for a daemon to listen on a Unix socket without connecting to it.

The socket file appears at bind(), a moment before listen(): a client connecting in between is
refused.  /proc/net/unix shows when the socket listens, and probing it there leaves the daemon's
single-client monitor and its NBD server untouched.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

START_TIMEOUT = 30.0
_SO_ACCEPTCON = 0x10000  # include/linux/net.h: the socket is listening


def listening(path: Path) -> bool:
    """Whether a Unix socket bound at ``path`` accepts connections."""
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & _SO_ACCEPTCON:
                return True
    return False


def wait_listening(path: Path, proc: subprocess.Popen[bytes] | None = None,
                   what: str = "daemon", timeout: float = START_TIMEOUT) -> None:
    """Wait until ``proc`` listens on ``path``; RuntimeError if it exits (with what it wrote
    to a piped stderr) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and listening(path)):
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"{what} exited with status {proc.returncode}: {err}")
        if time.monotonic() > deadline:  # a running process's stderr would block: not read
            raise RuntimeError(f"{what} did not listen on {path} within {timeout:g} s")
        time.sleep(0.005)
