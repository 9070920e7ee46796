"""``qblock img convert`` against the real ``qemu-img convert`` 7.2.

Both tools convert the same inputs (made by qemu-img/qemu-io); the outputs must hold the same
guest content (qemu-img compare), pass qemu-img check, and have the same qemu-img map
allocation; failing command lines must fail with the same exit code and message.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qblock.cli.imgconvert import SECTOR, Converter
from qblock.cli.main import main
from qemu_tools import QBLOCK_IMG, run_on_terminal

pytestmark = pytest.mark.interop
Tool = Callable[..., subprocess.CompletedProcess[str]]


def ours(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["img", "convert", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err.replace("qblock-img", "qemu-img")


def theirs(qemu_tool: Tool, *args: str | Path) -> tuple[int, str, str]:
    p = qemu_tool("qemu-img", "convert", *args)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def images(tmp_path: Path, qemu_tool: Tool, monkeypatch: pytest.MonkeyPatch) -> Path:
    """base.qcow2 (4 MiB: data, a zero cluster, a cluster of written zeroes), top.qcow2 over
    it (new data, a compressed cluster, a zeroed range hiding base data), r.raw with holes."""
    monkeypatch.chdir(tmp_path)

    def sh(*args: str) -> None:
        qemu_tool(*args, check=True)

    sh("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M")
    sh("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -z 2M 64k",
       "-c", "write -P 0 3M 64k", "-c", "write -P 7 3500k 100k", "base.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
       "top.qcow2")
    sh("qemu-io", "-c", "write -P 2 512k 128k", "-c", "write -c -P 3 2560k 64k",
       "-c", "write -z 128k 64k", "-c", "write -P 4 1M 12k", "top.qcow2")
    sh("qemu-img", "create", "-q", "-f", "raw", "r.raw", "1M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 1 64k 64k", "-c", "write -P 2 512k 4k",
       "-c", "write -P 0 768k 64k", "r.raw")
    return tmp_path


def _same_result(qemu_tool: Tool, a: Path, b: Path, fmt: str, *, check_map: bool = True,
                 backing: bool = False) -> None:
    cmp = qemu_tool("qemu-img", "compare", "-f", fmt, "-F", fmt, a, b)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    if fmt == "qcow2":
        chk = qemu_tool("qemu-img", "check", b)
        assert chk.returncode == 0, chk.stdout
    if check_map:
        opts = ["--output=json", "-f", fmt]
        theirs_map = qemu_tool("qemu-img", "map", *opts, a).stdout
        ours_map = qemu_tool("qemu-img", "map", *opts, b).stdout
        if backing:  # offsets name the image's own file
            theirs_map = theirs_map.replace(str(a), "X")
            ours_map = ours_map.replace(str(b), "X")
        assert ours_map == theirs_map


CASES = [
    ("raw-to-raw", ["-f", "raw", "-O", "raw", "r.raw"], "raw"),
    ("raw-to-qcow2", ["-f", "raw", "-O", "qcow2", "r.raw"], "qcow2"),
    ("chain-to-qcow2", ["-O", "qcow2", "top.qcow2"], "qcow2"),
    ("chain-to-raw", ["-O", "raw", "top.qcow2"], "raw"),
    ("chain-compressed", ["-c", "-O", "qcow2", "top.qcow2"], "qcow2"),
    ("sparse-64k", ["-S", "64k", "-O", "qcow2", "top.qcow2"], "qcow2"),
    ("concat", ["-O", "qcow2", "r.raw", "base.qcow2"], "qcow2"),
    ("cluster-size", ["-O", "qcow2", "-o", "cluster_size=4k", "top.qcow2"], "qcow2"),
    ("m1-W", ["-m", "1", "-W", "-O", "qcow2", "top.qcow2"], "qcow2"),
    ("m16", ["-m", "16", "-O", "raw", "top.qcow2"], "raw"),
    ("cache-none", ["-t", "none", "-T", "none", "-O", "qcow2", "top.qcow2"], "qcow2"),
    ("writethrough", ["-t", "writethrough", "-O", "raw", "top.qcow2"], "raw"),
]


@pytest.mark.parametrize("name,args,fmt", CASES, ids=[c[0] for c in CASES])
def test_convert_same_as_qemu(images: Path, qemu_tool: Tool,
                              capsys: pytest.CaptureFixture[str], name: str, args: list[str],
                              fmt: str) -> None:
    """Same content, clean check, same allocation map and silence as qemu-img convert."""
    q, b = images / f"q-{name}", images / f"b-{name}"
    assert theirs(qemu_tool, *args, q) == (0, "", "")
    assert ours(capsys, *args, b) == (0, "", "")
    _same_result(qemu_tool, q, b, fmt)


@pytest.mark.parametrize("evict", ["none", "second-half", "all"])
def test_convert_reads_cached_and_evicted_source_pages_alike(
        images: Path, qemu_tool: Tool, capsys: pytest.CaptureFixture[str], evict: str) -> None:
    """Source data in the page cache is written from a view of it (no read copy); evicted
    pages are read as usual.  Either way the target is qemu-img's."""
    src = images / "base.qcow2"
    fd = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if evict != "none":  # clean pages go with fadvise DONTNEED, no privilege needed
            start = size // 2 if evict == "second-half" else 0
            os.posix_fadvise(fd, start, size - start, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert ours(capsys, "-O", "qcow2", src, "b.qcow2") == (0, "", "")
    assert theirs(qemu_tool, "-O", "qcow2", src, "q.qcow2")[0] == 0
    _same_result(qemu_tool, images / "q.qcow2", images / "b.qcow2", "qcow2")


def test_convert_with_backing(images: Path, qemu_tool: Tool,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """-B/-F: only what top.qcow2 itself allocates is copied; the rest stays with base."""
    args = ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2"]
    assert theirs(qemu_tool, *args, "q.qcow2")[0] == 0
    assert ours(capsys, *args, "b.qcow2") == (0, "", "")
    _same_result(qemu_tool, images / "q.qcow2", images / "b.qcow2", "qcow2", backing=True)
    info = qemu_tool("qemu-img", "info", "--output=json", "b.qcow2").stdout
    assert '"backing-filename": "base.qcow2"' in info


def test_convert_no_create_and_zero_fill(images: Path, qemu_tool: Tool,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """-n into a dirty image of the same size: zero ranges are written as zeroes."""
    for name in ("q.raw", "b.raw"):
        qemu_tool("qemu-img", "create", "-q", "-f", "raw", name, "4M", check=True)
        qemu_tool("qemu-io", "-f", "raw", "-c", "write -P 9 0 4M", name, check=True)
    assert theirs(qemu_tool, "-n", "top.qcow2", "q.raw")[0] == 0
    assert ours(capsys, "-n", "top.qcow2", "b.raw") == (0, "", "")
    _same_result(qemu_tool, images / "q.raw", images / "b.raw", "raw", check_map=False)
    cmp = qemu_tool("qemu-img", "compare", "-F", "raw", "top.qcow2", "b.raw")
    assert cmp.returncode == 0


def test_convert_fully_allocated(images: Path, qemu_tool: Tool,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """-S 0: every byte of a raw target is written, as qemu-img does."""
    assert theirs(qemu_tool, "-S", "0", "top.qcow2", "q.raw")[0] == 0
    assert ours(capsys, "-S", "0", "top.qcow2", "b.raw") == (0, "", "")
    _same_result(qemu_tool, images / "q.raw", images / "b.raw", "raw")


ERRORS = [
    ["-m", "17", "r.raw", "x.raw"],
    ["-m", "0", "r.raw", "x.raw"],
    ["-S", "100", "r.raw", "x.raw"],
    ["r.raw"],
    ["missing.raw", "x.raw"],
    ["-O", "foo", "r.raw", "x.raw"],
    ["-c", "-O", "raw", "r.raw", "x.raw"],
    ["-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "x.qcow2"],
    ["-O", "qcow2", "-o", "foo=bar", "r.raw", "x.qcow2"],
    ["-n", "-o", "cluster_size=4k", "r.raw", "x.raw"],
    ["-n", "top.qcow2", "r.raw"],
    ["--target-is-zero", "r.raw", "x.raw"],
    ["-t", "bogus", "r.raw", "x.raw"],
    ["-T", "bogus", "r.raw", "x.raw"],
    ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "r.raw", "top.qcow2", "x.qcow2"],
    ["-x", "r.raw", "x.raw"],
    ["r.raw", "x.raw", "-O"],
]


@pytest.mark.parametrize("args", ERRORS, ids=[" ".join(a) for a in ERRORS])
def test_convert_errors_match(images: Path, qemu_tool: Tool,
                              capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """Bad command lines: qemu-img's exit status and message."""
    assert ours(capsys, *args) == theirs(qemu_tool, *args)


def _model_runs(zero: list[bool], sector: int, minimum: int,
                alignment: int) -> list[tuple[bool, int]]:
    """qemu-img.c is_allocated_sectors_min() looped as convert_co_write() does, sector by
    sector: the reference the numpy version must agree with."""
    def allocated(pos: int) -> tuple[bool, int]:
        n = len(zero) - pos
        is_zero = zero[pos]
        i = 1
        while i < n and zero[pos + i] == is_zero:
            i += 1
        if i == n:
            return not is_zero, i
        tail = (sector + pos + i) & (alignment - 1)
        if tail:
            if is_zero and i <= tail:
                is_zero = False
            if not is_zero:
                i = min(i + alignment - tail, n)
            else:
                i -= tail
        return not is_zero, i

    out = []
    pos = 0
    while pos < len(zero):
        data, num = allocated(pos)
        if data:
            used = checked = num
            least = min(minimum, len(zero) - pos)
            while pos + checked < len(zero):
                d, num = allocated(pos + checked)
                checked += num
                if d:
                    used = checked
                elif num >= least:
                    break
            num = used
        out.append((data, num))
        pos += num
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=64), st.integers(0, 63),
       st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([1, 2, 8, 16]))
def test_zero_detection_matches_qemu_model(zero: list[bool], sector: int, minimum: int,
                                           alignment: int) -> None:
    """The table-based split of a data chunk into data and zero runs equals QEMU's loop."""
    buf = bytearray(len(zero) * SECTOR)
    for i, z in enumerate(zero):
        if not z:
            buf[i * SECTOR + (i * 37) % SECTOR] = 1
    conv = Converter.__new__(Converter)
    conv.min_sparse, conv.alignment = minimum, alignment
    runs = conv._runs(buf, sector, len(zero))
    assert runs == _model_runs(zero, sector, minimum, alignment)
    assert sum(n for _, n in runs) == len(zero) and all(n > 0 for _, n in runs)


def test_progress_only_on_a_terminal(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-p draws "    (x.xx/100%)\\r" on a terminal and ends at 100%; not on a pipe."""
    assert ours(capsys, "-p", "-O", "raw", "top.qcow2", "pipe.raw") == (0, "", "")
    proc, shown = run_on_terminal([*QBLOCK_IMG, "convert", "-p", "-O", "raw", "top.qcow2",
                                   "tty.raw"])
    assert proc.returncode == 0, proc.stderr
    assert shown.startswith("    (0.00/100%)\r") and shown.endswith("    (100.00/100%)\r\r\n")


@pytest.fixture
def text_image(tmp_path: Path, qemu_tool: Tool) -> Path:
    """A raw image of 5 MiB + 1536 bytes spanning several 2 MiB copy buffers: compressible
    clusters, a cluster of written zeroes, an incompressible cluster, a short last cluster."""
    words = b"".join(b"%d qblock %x " % (i, i * 7919) for i in range(200000))
    data = bytearray(words[:5 * 1024 * 1024 + 1536])
    data[64 * 1024:128 * 1024] = bytes(64 * 1024)
    data[2 * 1024 * 1024:2 * 1024 * 1024 + 64 * 1024] = os.urandom(64 * 1024)
    data[3 * 1024 * 1024 - 4096:3 * 1024 * 1024 + 4096] = bytes(8192)  # zeroes across clusters
    path = tmp_path / "text.raw"
    path.write_bytes(data)
    return path


COMPRESSED_CASES = [
    ("default", []),
    ("out-of-order", ["-W", "-m", "4"]),
    ("no-sparse", ["-S", "0"]),
    ("4k-clusters", ["-o", "cluster_size=4k"]),
    ("zstd", ["-o", "compression_type=zstd"]),
]


@pytest.mark.parametrize("name,args", COMPRESSED_CASES, ids=[c[0] for c in COMPRESSED_CASES])
def test_compressed_convert_same_as_qemu(text_image: Path, qemu_tool: Tool,
                                         capsys: pytest.CaptureFixture[str], name: str,
                                         args: list[str]) -> None:
    """-c with clusters compressed in parallel: same content and check as qemu-img; in order,
    the same map and, with zlib, even the same file bytes (QEMU pads the file's end)."""
    q, b = text_image.parent / f"q-{name}", text_image.parent / f"b-{name}"
    argv = ["-c", "-f", "raw", "-O", "qcow2", *args, text_image]
    assert theirs(qemu_tool, *argv, q) == (0, "", "")
    assert ours(capsys, *argv, b) == (0, "", "")
    in_order = "-W" not in args  # out of order, where clusters land is up to timing
    _same_result(qemu_tool, q, b, "qcow2", check_map=in_order)
    if in_order and "compression_type=zstd" not in args:  # zstd frames differ in size
        ours_bytes, qemu_bytes = b.read_bytes(), q.read_bytes()
        # compared by hand: pytest's diff of two 1.6 MB byte strings outlasts the test timeout
        if qemu_bytes[:len(ours_bytes)] != ours_bytes:
            first = next((i for i, (x, y) in enumerate(zip(qemu_bytes, ours_bytes)) if x != y),
                         min(len(qemu_bytes), len(ours_bytes)))
            pytest.fail(f"files differ from byte {first} "
                        f"(sizes {len(qemu_bytes)}, {len(ours_bytes)})")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40), st.sampled_from([1, 2, 8]))
def test_cluster_runs_match_per_cluster_zero_check(zero: list[bool], cluster: int) -> None:
    """-c: a chunk splits into runs of whole clusters, written unless all zero."""
    buf = bytearray(len(zero) * SECTOR)
    for i, z in enumerate(zero):
        if not z:
            buf[i * SECTOR + (i * 101) % SECTOR] = 1
    conv = Converter.__new__(Converter)
    conv.cluster_sectors = cluster
    runs = conv._cluster_runs(memoryview(buf), len(zero))
    expect = [not all(zero[c:c + cluster]) for c in range(0, len(zero), cluster)]
    got = []
    for is_data, num in runs:
        got += [is_data] * -(-num // cluster)
    assert got == expect
    assert sum(n for _, n in runs) == len(zero)
    assert all(is_data != nxt for (is_data, _), (nxt, _) in zip(runs, runs[1:]))


@pytest.mark.parametrize("cache,synced", [(None, False), ("unsafe", False), ("writeback", True)])
def test_target_cache_mode_flushes(images: Path, qemu_tool: Tool,
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch, cache: str | None,
                                   synced: bool) -> None:
    """-t defaults to unsafe for convert (qemu-img --help): the copy never syncs the target
    file, metadata included; -t writeback does."""
    assert qemu_tool("qemu-img", "create", "-q", "-f", "qcow2", "t.qcow2", "4M").returncode == 0
    calls: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    args = ["-t", cache] if cache else []
    assert ours(capsys, "-n", *args, "-O", "qcow2", "top.qcow2", "t.qcow2") == (0, "", "")
    assert bool(calls) == synced
    _same_result(qemu_tool, images / "top.qcow2", images / "t.qcow2", "qcow2", check_map=False)
