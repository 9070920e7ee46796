"""Shared fixtures: scratch images, the real QEMU tools, and a clean global state per test."""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qblock import trace
from qblock.block.node import registry

QEMU_TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "nbdinfo", "nbdcopy")
TOOL_TIMEOUT = 60


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_image(size, name="disk.raw", data=None)`` creates a raw file.

    ``data`` (bytes) is written at offset 0; the rest of the file is a hole.
    """
    def make(size: int, name: str = "disk.raw", data: bytes | None = None) -> Path:
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)
            if data:
                f.write(data)
        return path

    return make


@pytest.fixture
def qemu_tool() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a real QEMU tool: ``qemu_tool("qemu-img", "info", path)`` -> CompletedProcess.

    Output is captured as text; a missing tool skips the test.
    """
    def run(name: str, *args: str | os.PathLike[str], input: str | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        if shutil.which(name) is None:
            pytest.skip(f"{name} is not installed")
        return subprocess.run([name, *map(os.fspath, args)], input=input, capture_output=True,
                              text=True, timeout=TOOL_TIMEOUT, check=check)

    return run


@pytest.fixture(autouse=True)
def _isolated_globals() -> Iterator[None]:
    """Each test starts with no named nodes and no trace sinks, and leaves none behind.

    A test that fails half-way may leave nodes open; their file descriptors (and OFD locks)
    are released here so later tests are not affected.
    """
    trace.reset()
    before = dict(registry.nodes)
    yield
    trace.reset()
    for name, node in list(registry.nodes.items()):
        if before.get(name) is node:
            continue
        close = getattr(node.drv, "fd", -1)
        if isinstance(close, int) and close >= 0:
            os.close(close)
            node.drv.fd = -1
        node.closed = True
        del registry.nodes[name]
