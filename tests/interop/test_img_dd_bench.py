"""``qblock img dd``, ``qblock img bench`` and ``qblock img check -p`` against qemu-img 7.2.

dd: the same operands give the same messages, exit codes, output sizes and contents.
bench: the same lines (the run time aside), errors and exit codes; writes leave the same image.
check -p: the progress line on a terminal only.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qblock.cli.main import main
from qemu_tools import QBLOCK_IMG, run_on_terminal

pytestmark = pytest.mark.interop
Tool = Callable[..., subprocess.CompletedProcess[str]]
_TIME = re.compile(r"Run completed in [0-9]+\.[0-9]{3} seconds\.")


def ours(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["img", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err.replace("qblock-img", "qemu-img")


def theirs(qemu_tool: Tool, *args: str | Path) -> tuple[int, str, str]:
    p = qemu_tool("qemu-img", *args)
    return p.returncode, p.stdout, p.stderr


def untimed(result: tuple[int, str, str]) -> tuple[int, str, str]:
    rc, out, err = result
    return rc, _TIME.sub("Run completed in T seconds.", out), err


def virtual_size(qemu_tool: Tool, path: str) -> int:
    info = json.loads(qemu_tool("qemu-img", "info", "--output=json", path, check=True).stdout)
    return int(info["virtual-size"])


@pytest.fixture
def images(tmp_path: Path, qemu_tool: Tool, monkeypatch: pytest.MonkeyPatch) -> Path:
    """in.raw (1 MiB + 1.5 KiB of patterns and holes), in.qcow2 (3 MiB over a backing file,
    with data, zeroes and a compressed cluster), bench.qcow2 (1 MiB, partly written)."""
    monkeypatch.chdir(tmp_path)

    def sh(*args: str) -> None:
        qemu_tool(*args, check=True)

    sh("qemu-img", "create", "-q", "-f", "raw", "in.raw", str((1 << 20) + 1536))
    sh("qemu-io", "-f", "raw", "-c", "write -P 1 0 100k", "-c", "write -P 2 300k 5000",
       "-c", "write -P 3 1020k 5632", "in.raw")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "3M")
    sh("qemu-io", "-c", "write -P 4 0 2M", "base.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
       "in.qcow2")
    sh("qemu-io", "-c", "write -P 5 64k 100k", "-c", "write -z 1M 128k",
       "-c", "write -c -P 6 2M 64k", "in.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "bench.qcow2", "1M")
    sh("qemu-io", "-c", "write -P 9 128k 256k", "bench.qcow2")
    return tmp_path


# -- dd --------------------------------------------------------------------------------------
DD_CASES = [
    ("in.raw", "raw", []),
    ("in.raw", "raw", ["bs=4k"]),
    ("in.raw", "qcow2", ["bs=1.5k", "count=7"]),
    ("in.raw", "raw", ["bs=64k", "skip=3"]),
    ("in.raw", "raw", ["bs=1k", "count=100", "skip=40"]),  # count counts the skipped blocks
    ("in.raw", "raw", ["bs=3000"]),
    ("in.raw", "raw", ["count=1G", "bs=1M"]),               # count past the end
    ("in.raw", "raw", ["bs=1M", "skip=10"]),                # skip past the end: a warning
    ("in.raw", "raw", ["bs=0x1000", "count=0x10"]),
    ("in.raw", "raw", ["count=0"]),
    ("in.raw", "raw", ["bs=1", "count=1001"]),              # size rounded up to a sector
    ("in.qcow2", "qcow2", ["bs=64k", "count=20", "skip=2"]),
    ("in.qcow2", "raw", ["bs=512", "count=3000", "skip=1000"]),
    ("in.qcow2", "qcow2", ["-f", "qcow2", "bs=1M"]),
    ("in.qcow2", "raw", ["-U", "bs=100k", "skip=7"]),
]


@pytest.mark.parametrize(("src", "out_fmt", "extra"), DD_CASES,
                         ids=[" ".join([c[0], c[1], *c[2]]) for c in DD_CASES])
def test_dd_same_as_qemu(images: Path, qemu_tool: Tool, capsys: pytest.CaptureFixture[str],
                         src: str, out_fmt: str, extra: list[str]) -> None:
    options = [e for e in extra if "=" not in e]
    operands = [e for e in extra if "=" in e]
    expected = theirs(qemu_tool, "dd", *options, "-O", out_fmt, *operands, f"if={src}",
                      "of=q.out")
    got = ours(capsys, "dd", *options, "-O", out_fmt, *operands, f"if={src}", "of=b.out")
    assert got == expected
    assert virtual_size(qemu_tool, "b.out") == virtual_size(qemu_tool, "q.out")
    compare = qemu_tool("qemu-img", "compare", "-f", out_fmt, "-F", out_fmt, "q.out", "b.out")
    assert compare.returncode == 0, compare.stdout
    if out_fmt == "qcow2":
        assert qemu_tool("qemu-img", "check", "b.out").returncode == 0


DD_ERRORS = [
    [],
    ["foo"],
    ["foo=1", "if=in.raw", "of=x.raw"],
    ["if=in.raw"],
    ["of=x.raw"],
    ["bs=0", "if=in.raw", "of=x.raw"],
    ["bs=3G", "if=in.raw", "of=x.raw"],
    ["bs=abc", "if=in.raw", "of=x.raw"],
    ["bs=", "if=in.raw", "of=x.raw"],
    ["bs=1.5", "if=in.raw", "of=x.raw"],
    ["count=-1", "if=in.raw", "of=x.raw"],
    ["count=8E", "if=in.raw", "of=x.raw"],
    ["count=0x1.8k", "if=in.raw", "of=x.raw"],
    ["skip=1kk", "if=in.raw", "of=x.raw"],
    ["if=in.raw", "of=x.raw", "junk"],
    ["if=missing.raw", "of=x.raw"],
    ["-O", "foo", "if=in.raw", "of=x.raw"],
    ["-f", "qcow2", "if=in.raw", "of=x.raw"],
    ["-f", "foo", "if=in.raw", "of=x.raw"],
    ["if=in.raw", "of=nodir/x.raw"],
    ["-x", "if=in.raw", "of=x.raw"],
    ["-O"],
]


@pytest.mark.parametrize("args", DD_ERRORS, ids=[" ".join(a) or "none" for a in DD_ERRORS])
def test_dd_errors_same_as_qemu(images: Path, qemu_tool: Tool,
                                capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    expected = theirs(qemu_tool, "dd", *args)
    assert expected[0] != 0
    assert ours(capsys, "dd", *args) == expected


def test_dd_image_opts(images: Path, qemu_tool: Tool, capsys: pytest.CaptureFixture[str]) -> None:
    """--image-opts takes the input as blockdev options."""
    spec = "if=driver=qcow2,file.filename=in.qcow2"
    assert theirs(qemu_tool, "dd", "--image-opts", "bs=64k", spec, "of=q.raw") == (0, "", "")
    assert ours(capsys, "dd", "--image-opts", "bs=64k", spec, "of=b.raw") == (0, "", "")
    assert qemu_tool("qemu-img", "compare", "q.raw", "b.raw").returncode == 0


def run_quietly(*args: str) -> tuple[int, str, str]:
    """``qblock img ARGS`` in this process, its output captured (hypothesis-friendly)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["img", *args])
    return rc, out.getvalue(), err.getvalue()


@settings(max_examples=40, deadline=None)
@given(sectors=st.integers(1, 40), bs=st.integers(1, 5000),
       count=st.none() | st.integers(0, 60), skip=st.none() | st.integers(0, 60),
       seed=st.integers(0, 2 ** 32 - 1))
def test_dd_matches_model(sectors: int, bs: int, count: int | None, skip: int | None,
                          seed: int) -> None:
    """img_dd() as a slice: input[skip*bs : min(size, count*bs)], padded to a sector; a skip
    past the end warns and leaves an empty output."""
    data = np.random.default_rng(seed).integers(0, 256, sectors * 512, dtype=np.uint8).tobytes()
    end = len(data) if count is None or count * bs >= len(data) else count * bs
    start = (skip or 0) * bs
    expected = data[start:end] if start <= end else b""
    expected += bytes(-len(expected) % 512)
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.raw"), os.path.join(d, "out.raw")
        with open(src, "wb") as f:
            f.write(data)
        args = [f"bs={bs}"] + ([f"count={count}"] if count is not None else []) + \
            ([f"skip={skip}"] if skip is not None else [])
        rc, out, err = run_quietly("dd", *args, f"if={src}", f"of={dst}")
        assert (rc, out) == (0, "")
        assert err == ("" if start <= end else f"qblock-img: {src}: cannot skip to specified "
                       "offset\n")
        with open(dst, "rb") as f:
            assert f.read() == expected


# -- bench -----------------------------------------------------------------------------------
BENCH_READS = [
    ["-c", "100", "-d", "1"],
    ["-c", "200", "-d", "16"],
    ["-c", "300", "-d", "16", "-S", "8k", "-o", "4k"],   # wraps at the image end
    ["-c", "40", "-s", "64k", "-d", "4"],
    ["-c", "0x20", "-d", "010", "-q"],
    ["-c", "10", "-f", "raw", "-U"],
    ["-c", "10", "-s", "0"],
    ["-c", "5", "-t", "writethrough", "-i", "threads"],
    ["-c", "5", "--image-opts"],
]


@pytest.mark.parametrize("args", BENCH_READS, ids=[" ".join(a) for a in BENCH_READS])
def test_bench_read_same_lines(images: Path, qemu_tool: Tool,
                               capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    image = "driver=qcow2,file.filename=bench.qcow2" if "--image-opts" in args else "bench.qcow2"
    expected = untimed(theirs(qemu_tool, "bench", *args, image))
    assert expected[0] == 0 and expected[1].startswith("Sending ")
    assert untimed(ours(capsys, "bench", *args, image)) == expected


BENCH_WRITES = [
    ["-c", "100", "-d", "16", "--pattern=0xab"],
    ["-c", "50", "-d", "1", "-S", "12k", "-o", "8k", "--pattern=7"],
    ["-c", "64", "-d", "16", "--flush-interval=16", "--pattern=3"],
    ["-c", "70", "-d", "4", "--flush-interval=8", "--no-drain", "--pattern=5"],
    ["-c", "300", "-d", "16", "-s", "8k", "--pattern=0x11"],          # wraps: 2.4 MiB on 1 MiB
    ["-c", "400", "-d", "8", "-s", "3000", "-S", "5000", "--pattern=200"],  # unaligned
    ["-c", "20", "-t", "unsafe", "--flush-interval=64", "--pattern=1"],
]


@pytest.mark.parametrize("args", BENCH_WRITES, ids=[" ".join(a) for a in BENCH_WRITES])
def test_bench_write_same_lines_and_image(images: Path, qemu_tool: Tool,
                                          capsys: pytest.CaptureFixture[str],
                                          args: list[str]) -> None:
    shutil.copy("bench.qcow2", "q.qcow2")
    shutil.copy("bench.qcow2", "b.qcow2")
    expected = untimed(theirs(qemu_tool, "bench", "-w", *args, "q.qcow2"))
    assert expected[0] == 0
    assert untimed(ours(capsys, "bench", "-w", *args, "b.qcow2")) == expected
    compare = qemu_tool("qemu-img", "compare", "-s", "q.qcow2", "b.qcow2")
    assert compare.returncode == 0, compare.stdout
    assert qemu_tool("qemu-img", "check", "b.qcow2").returncode == 0
    untouched = qemu_tool("qemu-img", "compare", "bench.qcow2", "b.qcow2")
    assert untouched.returncode == 1  # the run did write


@settings(max_examples=40, deadline=None)
@given(size_kib=st.integers(4, 64), count=st.integers(0, 120), depth=st.integers(1, 20),
       bufsize=st.integers(0, 3000), step=st.integers(0, 5000), offset=st.integers(0, 70000),
       pattern=st.integers(1, 255), flush=st.sampled_from([0, 20, 33]), drain=st.booleans())
def test_bench_writes_match_model(size_kib: int, count: int, depth: int, bufsize: int,
                                  step: int, offset: int, pattern: int, flush: int,
                                  drain: bool) -> None:
    """Request i writes the pattern at offset + i*step, wrapped modulo the image size after
    the first; a request past the end fails the run with qemu-img's message."""
    size = size_kib * 1024
    flush = max(flush, depth) if flush else 0
    model = bytearray(size)
    failed = False
    pos = offset
    for i in range(count):
        if pos + bufsize > size:
            failed = True
            break
        model[pos:pos + bufsize] = bytes([pattern]) * bufsize
        pos = (pos + (step or bufsize)) % size
    with tempfile.TemporaryDirectory() as d:
        image = os.path.join(d, "img.raw")
        with open(image, "wb") as f:
            f.truncate(size)
        args = ["-w", "-f", "raw", "-c", str(count), "-d", str(depth), "-s", str(bufsize),
                "-S", str(step), "-o", str(offset), f"--pattern={pattern}"]
        if flush:
            args += [f"--flush-interval={flush}"] + ([] if drain else ["--no-drain"])
        rc, out, err = run_quietly("bench", *args, image)
        assert out.startswith(f"Sending {count} write requests, {bufsize} bytes each, "
                              f"{depth} in parallel (starting at offset {offset}, step size "
                              f"{step or bufsize})\n")
        if failed:
            assert (rc, err) == (1, "qblock-img: Failed request: Input/output error\n")
            return
        assert (rc, err) == (0, "")
        assert _TIME.search(out)
        with open(image, "rb") as f:
            assert f.read() == bytes(model)


BENCH_ERRORS = [
    [],
    ["a", "b"],
    ["missing.qcow2"],
    ["-x"],
    ["-c"],
    ["-c", "x"],
    ["-c", "-1"],
    ["-c", "2147483648"],
    ["-d", "x"],
    ["-s", "x"],
    ["-s", "3G"],
    ["-S", "1.5"],
    ["-o", "x"],
    ["-o", "8E"],
    ["--pattern=256"],
    ["--pattern=x"],
    ["--flush-interval=64"],
    ["-w", "--flush-interval=4"],
    ["-w", "--flush-interval=x"],
    ["-t", "foo"],
    ["-i", "foo"],
    ["-n"],
    ["-i", "native"],
    ["-f", "foo"],
    ["-c", "3", "-o", "2M"],               # the first request is past the end
    ["-c", "3", "-o", "1020k", "-s", "8k"],  # ... straddles the end
]


@pytest.mark.parametrize("args", BENCH_ERRORS, ids=[" ".join(a) or "none" for a in BENCH_ERRORS])
def test_bench_errors_same_as_qemu(images: Path, qemu_tool: Tool,
                                   capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    image = [] if not args or args in (["a", "b"], ["missing.qcow2"], ["-c"]) else \
        ["bench.qcow2"]
    expected = theirs(qemu_tool, "bench", *args, *image)
    assert expected[0] == 1
    assert ours(capsys, "bench", *args, *image) == expected


# -- check -p --------------------------------------------------------------------------------
def test_check_progress_only_on_a_terminal(images: Path, qemu_tool: Tool,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """-p draws "    (x.xx/100%)\\r" on a terminal, from 0% to 100%; a pipe gets the report
    exactly as qemu-img check prints it."""
    qemu_tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "l2.qcow2",
              "4M", check=True)
    qemu_tool("qemu-io", "-c", "write -P 1 0 4M", "l2.qcow2", check=True)  # 128 L2 tables
    report = theirs(qemu_tool, "check", "l2.qcow2")
    assert report[0] == 0
    assert ours(capsys, "check", "-p", "l2.qcow2") == report
    proc, shown = run_on_terminal([*QBLOCK_IMG, "check", "-p", "l2.qcow2"])
    assert proc.returncode == 0, proc.stderr
    bar, _, rest = shown.rpartition("\r\r\n")
    steps = bar.split("\r")
    assert steps[0] == "    (0.00/100%)" and steps[-1] == "    (100.00/100%)"
    assert len(steps) > 10
    assert rest == report[1].replace("\n", "\r\n")
