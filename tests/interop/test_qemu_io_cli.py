"""``qblock io`` against the real qemu-io 7.2: same lines for the same commands.

Each script runs on two copies of one image, one per tool; stdout (timing lines reduced to
their "N KiB, 1 ops" head), stderr (program name normalised) and exit status must match, and
so must the images afterwards.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qblock.cli.main import main

pytestmark = pytest.mark.interop
Tool = Callable[..., subprocess.CompletedProcess[str]]
_TIMING = re.compile(r"^(.*, \d+ ops); .*$", re.M)


def _filter(text: str) -> str:
    return _TIMING.sub(r"\1; TIME", text).replace("qblock-io: ", "qemu-io: ")


def ours(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["io", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, _filter(out), _filter(err)


def theirs(qemu_tool: Tool, *args: str | Path) -> tuple[int, str, str]:
    p = qemu_tool("qemu-io", *args)
    return p.returncode, _filter(p.stdout), _filter(p.stderr)


def _cmds(script: list[str]) -> list[str]:
    return [x for c in script for x in ("-c", c)]


@pytest.fixture
def images(tmp_path: Path, qemu_tool: Tool, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 1 MiB raw image and a 1 MiB qcow2 image (64k clusters) holding some data."""
    monkeypatch.chdir(tmp_path)
    qemu_tool("qemu-img", "create", "-q", "-f", "raw", "img.raw", "1M", check=True)
    qemu_tool("qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "1M", check=True)
    for fmt in ("raw", "qcow2"):
        qemu_tool("qemu-io", "-f", fmt, "-c", "write -P 0x5a 64k 64k", f"img.{fmt}",
                  check=True)
    return tmp_path


SCRIPTS = {
    "write-read": ["write -P 0xab 0 4k", "read -P 0xab 0 4k", "read -q -P 0xab 0 4k",
                   "read -P 0x5a 64k 64k", "read -P 0x5a -s 4k -l 512 64k 8k", "length"],
    "pattern-fail": ["read -P 0xac 0 4k", "length"],
    "hexdump": ["write -P 0x41 100 37", "read -v 96 48", "read -v 0 16"],
    "zeroes-discard": ["write -z 64k 64k", "write -z -u 128k 64k", "read -P 0 64k 128k",
                       "discard 0 4k", "flush", "map"],
    "vectors": ["writev -P 3 0 4k 512 1k", "readv -P 3 0 4k 512 1k", "readv -P 4 0 512",
                "writev -q -P 5 8k 512", "readv -v 8k 32"],
    "aio": ["aio_write -P 6 256k 4k", "aio_flush", "aio_read -P 6 256k 4k", "aio_flush",
            "read -P 6 256k 4k"],
    "alloc-map": ["write -P 1 512k 64k", "alloc 0 1M", "alloc 64k", "alloc 192k 64k",
                  "map"],
    "sizes": ["write 0 1k", "write 4k 1536", "read 0 1M", "write -P 7 768k 256k", "length"],
    "errors": ["read 1M 4k", "write -P 0x100 0 4k", "read abc 4k", "foo", "read 0",
               "write -z -P 1 0 4k", "write -u 0 4k", "alloc", "length"],
    "info": ["info"],
    "close-open": ["close", "read 0 1", "length", "quit", "length"],
}


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_same_output_as_qemu_io(images: Path, qemu_tool: Tool,
                                capsys: pytest.CaptureFixture[str], script: str,
                                fmt: str) -> None:
    """Same lines, same exit code, and equal images afterwards."""
    shutil.copy(f"img.{fmt}", f"q.{fmt}")
    shutil.copy(f"img.{fmt}", f"b.{fmt}")
    cmds = _cmds(SCRIPTS[script])
    expected = theirs(qemu_tool, "-f", fmt, *cmds, f"q.{fmt}")
    assert ours(capsys, "-f", fmt, *cmds, f"b.{fmt}") == expected
    cmp = qemu_tool("qemu-img", "compare", "-f", fmt, "-F", fmt, f"q.{fmt}", f"b.{fmt}")
    assert cmp.returncode == 0, cmp.stdout


def test_qcow2_compressed_write_and_map(images: Path, qemu_tool: Tool,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """write -c makes a compressed cluster; map and alloc see it as allocated."""
    shutil.copy("img.qcow2", "q.qcow2")
    shutil.copy("img.qcow2", "b.qcow2")
    cmds = _cmds(["write -c -P 2 256k 64k", "read -P 2 256k 64k", "map", "alloc 256k 64k"])
    assert ours(capsys, *cmds, "b.qcow2") == theirs(qemu_tool, *cmds, "q.qcow2")
    chk = qemu_tool("qemu-img", "check", "b.qcow2")
    assert chk.returncode == 0 and "compressed clusters" in chk.stdout


def test_open_errors_and_read_only(images: Path, qemu_tool: Tool,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A missing file, a write on a read-only open, and open/close inside a script."""
    for args in (["-c", "read 0 1", "missing.raw"],
                 ["-r", "-f", "raw", "-c", "write 0 1", "-c", "read 0 1", "img.raw"],
                 ["--image-opts", "driver=qcow2,file.driver=file,file.filename=img.qcow2",
                  "-c", "read 64k 4k -P 0x5a", "-c", "map"],
                 ["-c", "open -r -o driver=qcow2 img.qcow2", "-c", "length",
                  "-c", "open img.qcow2", "-c", "close", "-c", "open -o driver=raw img.raw",
                  "-c", "info"]):
        assert ours(capsys, *args) == theirs(qemu_tool, *args)


def test_interactive_prompt(images: Path, qemu_tool: Tool) -> None:
    """Without -c, commands come from stdin after a "qemu-io> " prompt."""
    script = "write -P 9 0 4k\nread -P 9 0 4k\nlength\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    shutil.copy("img.raw", "q.raw")
    shutil.copy("img.raw", "b.raw")
    mine = subprocess.run([sys.executable, "-m", "qblock.cli.main", "io", "-f", "raw",
                           "b.raw"], input=script, capture_output=True, text=True, env=env,
                          timeout=60)
    ref = qemu_tool("qemu-io", "-f", "raw", "q.raw", input=script)
    assert (mine.returncode, _filter(mine.stdout)) == (ref.returncode, _filter(ref.stdout))
    assert _filter(mine.stdout).startswith("qemu-io> wrote 4096/4096 bytes at offset 0\n")


def test_raw_file_of_odd_length_reads_like_qemu_io(tmp_path: Path, qemu_tool: Tool,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A 1000-byte raw file is 1024 bytes long to the block layer (whole sectors); the tail
    past the file's end reads as zeroes, and writing it extends the file, as in qemu-io."""
    data = bytes(range(256)) * 3 + bytes(232)
    script = ["length", "read -v 990 34", "write -P 0x77 1000 24", "read -v 996 28", "length"]
    for who in ("q", "b"):
        (tmp_path / f"{who}.raw").write_bytes(data[:1000])
    expected = theirs(qemu_tool, "-f", "raw", *_cmds(script), tmp_path / "q.raw")
    assert expected[0] == 0 and "1 KiB" in expected[1]
    assert ours(capsys, "-f", "raw", *_cmds(script), tmp_path / "b.raw") == expected
    assert (tmp_path / "b.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()
