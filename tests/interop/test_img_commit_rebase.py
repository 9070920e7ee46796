"""``qblock img commit`` and ``qblock img rebase`` against the real qemu-img 7.2.

Every case builds one backing chain with qemu-img/qemu-io, copies it, runs qemu-img on one copy
and qblock on the other (each from inside its copy, so relative backing names resolve alike),
and then requires: the same exit code, stdout and stderr (our "qblock-img: " prefix read as
"qemu-img: "); every image of the two copies the same guest content (qemu-img compare, which
also reads each chain through its backing files); our qcow2 images clean under qemu-img check;
the same qemu-img info (backing-filename, backing-filename-format, format-specific, sizes)
except actual-size, and the same qemu-img map allocation once host offsets are left out (host
offsets and file sizes follow allocation order, which differs).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qblock import api
from qblock.cli.imgrebase import differing_runs
from qblock.cli.main import main
from qemu_tools import QBLOCK_IMG, run_on_terminal, slow_mode

pytestmark = pytest.mark.interop
Tool = Callable[..., subprocess.CompletedProcess[str]]
MIB = 1 << 20


def sh(qemu_tool: Tool, *args: str) -> None:
    p = qemu_tool(*args)
    assert p.returncode == 0, f"{args}: {p.stderr}"


# -- chains -----------------------------------------------------------------------------------
def chain_2deep(t: Tool) -> list[str]:
    """base (64k clusters, written) <- top (data, a zero range, a discarded cluster)."""
    sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M")
    sh(t, "qemu-io", "-c", "write -P 1 0 4M", "base.qcow2")
    sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
       "top.qcow2")
    sh(t, "qemu-io", "-c", "write -P 2 1M 1M", "-c", "write -z 3M 64k",
       "-c", "discard 2M 64k", "-c", "write -P 3 100k 3k", "top.qcow2")
    return ["top.qcow2", "base.qcow2"]


def chain_3deep(t: Tool) -> list[str]:
    """base (4k clusters) <- mid (64k) <- top (16k, 6 MiB: bigger than the chain below)."""
    sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "base.qcow2",
       "4M")
    sh(t, "qemu-io", "-c", "write -P 1 0 3M", "-c", "write -P 0 3M 4k", "base.qcow2")
    sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
       "mid.qcow2")
    sh(t, "qemu-io", "-c", "write -P 7 2M 64k", "-c", "write -z 512k 128k", "mid.qcow2")
    sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", "-b",
       "mid.qcow2", "-F", "qcow2", "top.qcow2", "6M")
    sh(t, "qemu-io", "-c", "write -P 2 1M 1M", "-c", "write -z 3M 64k", "-c", "write -P 5 4M 1M",
       "-c", "discard 2M 64k", "-c", "write -P 6 520k 10k", "top.qcow2")
    return ["top.qcow2", "mid.qcow2", "base.qcow2"]


def chain_raw_base(t: Tool) -> list[str]:
    """raw base with holes <- top (512-byte clusters, 5 MiB)."""
    sh(t, "qemu-img", "create", "-q", "-f", "raw", "base.raw", "4M")
    sh(t, "qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", "-c", "write -P 4 3M 512k",
       "base.raw")
    sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b",
       "base.raw", "-F", "raw", "top.qcow2", "5M")
    sh(t, "qemu-io", "-c", "write -P 2 512k 1M", "-c", "write -z 3200k 100k",
       "-c", "write -P 8 4M 64k", "top.qcow2")
    return ["top.qcow2", "base.raw"]


CHAINS = {"2deep": chain_2deep, "3deep": chain_3deep, "rawbase": chain_raw_base}


# -- running both ------------------------------------------------------------------------------
def ours(capsys: pytest.CaptureFixture[str], where: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    old = os.getcwd()
    os.chdir(where)
    try:
        rc = main(["img", *args])
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    return rc, out, err.replace("qblock-img", "qemu-img")


def theirs(where: Path, *args: str) -> tuple[int, str, str]:
    p = subprocess.run(["qemu-img", *args], cwd=where, capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout, p.stderr


def setup_pair(tmp_path: Path, qemu_tool: Tool, monkeypatch: pytest.MonkeyPatch,
               chain: str) -> tuple[Path, Path, Path, list[str]]:
    """The chain in ``orig``, and two copies: ``q`` for qemu-img, ``b`` for qblock."""
    orig = tmp_path / "orig"
    orig.mkdir()
    monkeypatch.chdir(orig)
    files = CHAINS[chain](qemu_tool)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(orig, tmp_path / "q")
    shutil.copytree(orig, tmp_path / "b")
    return orig, tmp_path / "q", tmp_path / "b", files


def img_json(*args: str | Path) -> Any:
    p = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                       check=True, timeout=120)
    return json.loads(p.stdout)


def compare(a: Path, b: Path, *extra: str) -> None:
    p = subprocess.run(["qemu-img", "compare", *extra, str(a), str(b)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, f"{a} vs {b}: {p.stdout}{p.stderr}"


def map_without_offsets(path: Path) -> list[dict[str, Any]]:
    """qemu-img map, host offsets dropped and the entries they kept apart merged."""
    merged: list[dict[str, Any]] = []
    for e in img_json("map", "--output=json", path):
        e.pop("offset", None)
        keys = ("depth", "present", "zero", "data", "compressed")
        if merged and all(merged[-1].get(k) == e.get(k) for k in keys):
            merged[-1]["length"] += e["length"]
        else:
            merged.append(e)
    return merged


def info_fields(path: Path) -> dict[str, Any]:
    """qemu-img info without the host allocation and the copy's own directory name."""
    info = img_json("info", "--output=json", path)
    info.pop("actual-size", None)
    for key in ("filename", "full-backing-filename"):
        if key in info:
            info[key] = os.path.basename(info[key])
    return info


def assert_same_results(q: Path, b: Path, files: list[str], maps: bool = True) -> None:
    for name in files:
        compare(q / name, b / name)
        if name.endswith(".qcow2"):
            check = subprocess.run(["qemu-img", "check", str(b / name)], capture_output=True,
                                   text=True, timeout=120)
            assert check.returncode == 0, check.stdout + check.stderr
            assert info_fields(b / name) == info_fields(q / name), name
            if maps:
                assert map_without_offsets(b / name) == map_without_offsets(q / name), name


def run_both(capsys: pytest.CaptureFixture[str], q: Path, b: Path,
             *args: str) -> tuple[int, str, str]:
    expected = theirs(q, *args)
    got = ours(capsys, b, *args)
    assert got == expected
    return got


# -- commit ------------------------------------------------------------------------------------
@pytest.mark.parametrize("chain", sorted(CHAINS))
@pytest.mark.parametrize("drop", [False, True])
def test_commit_into_backing(tmp_path: Path, qemu_tool: Tool, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str], chain: str, drop: bool) -> None:
    """Commit into the direct backing file; without -d the top is emptied as qemu-img does
    (on v3 images the file shrinks to header, reftable, refblock and L1)."""
    orig, q, b, files = setup_pair(tmp_path, qemu_tool, monkeypatch, chain)
    args = ["commit", *(["-d"] if drop else []), "top.qcow2"]
    rc, out, err = run_both(capsys, q, b, *args)
    assert (rc, out, err) == (0, "Image committed.\n", "")
    assert_same_results(q, b, files)
    compare(orig / "top.qcow2", b / "top.qcow2")  # the guest still sees the same disk
    if not drop:
        assert (b / "top.qcow2").stat().st_size == (q / "top.qcow2").stat().st_size


def test_commit_to_base_through_intermediate(tmp_path: Path, qemu_tool: Tool,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """-b BASE below an intermediate: top and mid both land in base; -b implies -d."""
    orig, q, b, files = setup_pair(tmp_path, qemu_tool, monkeypatch, "3deep")
    rc, out, _ = run_both(capsys, q, b, "commit", "-b", "base.qcow2", "top.qcow2")
    assert (rc, out) == (0, "Image committed.\n")
    assert_same_results(q, b, files)
    compare(orig / "top.qcow2", b / "base.qcow2")  # base alone now holds the whole disk
    assert (b / "top.qcow2").read_bytes() == (orig / "top.qcow2").read_bytes()


def test_commit_rate_limit_and_quiet(tmp_path: Path, qemu_tool: Tool,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """-q prints nothing, -r takes a size with a suffix, -b names the direct backing file
    (relative to the overlay), -p is silent when stdout is not a terminal."""
    _, q, b, files = setup_pair(tmp_path, qemu_tool, monkeypatch, "2deep")
    assert run_both(capsys, q, b, "commit", "-q", "-p", "-r", "1G", "-t", "none",
                    "-b", "base.qcow2", "top.qcow2") == (0, "", "")
    assert_same_results(q, b, files)


@pytest.mark.parametrize("args", [
    ["commit", "base.qcow2"],                          # Image does not have a backing file
    ["commit", "-b", "nothere", "top.qcow2"],          # Did not find ... in the backing chain
    ["commit", "-b", "top.qcow2", "top.qcow2"],        # the image itself is not in its chain
    ["commit", "-r", "-5", "top.qcow2"],
    ["commit", "-r", "abc", "top.qcow2"],
    ["commit", "-t", "bogus", "top.qcow2"],
    ["commit"],
    ["commit", "top.qcow2", "extra"],
    ["commit", "-x", "top.qcow2"],
    ["commit", "top.qcow2", "-b"],
    ["commit", "missing.qcow2"],
    ["commit", "-f", "raw", "top.qcow2"],              # raw has no backing file
])
def test_commit_errors(tmp_path: Path, qemu_tool: Tool, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    orig, q, b, files = setup_pair(tmp_path, qemu_tool, monkeypatch, "2deep")
    rc, _, err = run_both(capsys, q, b, *args)
    assert rc == 1 and err
    for name in files:  # nothing was changed
        assert (b / name).read_bytes() == (orig / name).read_bytes()


# -- rebase ------------------------------------------------------------------------------------
def make_base_b(t: Tool, where: Path, fmt: str = "qcow2", size: str = "3M") -> None:
    """A new base that agrees with the old one in parts: same data, other data, a hole."""
    sh(t, "qemu-img", "create", "-q", "-f", fmt, str(where / f"newbase.{fmt}"), size)
    sh(t, "qemu-io", "-f", fmt, "-c", "write -P 1 0 1M", "-c", "write -P 9 1536k 4k",
       "-c", "write -P 1 2M 1M", "-c", "write -P 1 1100k 1000", str(where / f"newbase.{fmt}"))


@pytest.mark.parametrize("chain", sorted(CHAINS))
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_rebase_safe(tmp_path: Path, qemu_tool: Tool, monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str], chain: str, fmt: str) -> None:
    """Safe rebase onto a different (smaller) base: the guest content is unchanged and the
    image gains what qemu-img writes (only the differing sectors)."""
    orig, q, b, files = setup_pair(tmp_path, qemu_tool, monkeypatch, chain)
    for d in (q, b):
        make_base_b(qemu_tool, d, fmt)
    rc, out, err = run_both(capsys, q, b, "rebase", "-b", f"newbase.{fmt}", "-F", fmt,
                            "top.qcow2")
    assert (rc, out, err) == (0, "", "")
    assert_same_results(q, b, [*files, f"newbase.{fmt}"])
    compare(orig / "top.qcow2", b / "top.qcow2")
    assert img_json("info", "--output=json", b / "top.qcow2")["backing-filename"] == \
        f"newbase.{fmt}"


def test_rebase_onto_chain_member(tmp_path: Path, qemu_tool: Tool,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Rebasing past an intermediate (prefix_chain_bs): only what mid changed is copied."""
    orig, q, b, files = setup_pair(tmp_path, qemu_tool, monkeypatch, "3deep")
    assert run_both(capsys, q, b, "rebase", "-b", "base.qcow2", "-F", "qcow2",
                    "top.qcow2") == (0, "", "")
    assert_same_results(q, b, files)
    compare(orig / "top.qcow2", b / "top.qcow2")


@pytest.mark.parametrize("chain", ["2deep", "3deep"])
def test_rebase_flatten(tmp_path: Path, qemu_tool: Tool, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str], chain: str) -> None:
    """-b "": everything the backing chain supplied is copied; no backing file is left."""
    orig, q, b, files = setup_pair(tmp_path, qemu_tool, monkeypatch, chain)
    assert run_both(capsys, q, b, "rebase", "-b", "", "top.qcow2") == (0, "", "")
    assert_same_results(q, b, files)
    compare(orig / "top.qcow2", b / "top.qcow2")
    assert "backing-filename" not in img_json("info", "--output=json", b / "top.qcow2")


@pytest.mark.parametrize("args", [
    ["-u", "-b", "newbase.qcow2", "-F", "qcow2"],
    ["-u", "-b", "elsewhere/gone.qcow2", "-F", "raw"],  # unsafe: the file need not exist
    ["-u", "-b", ""],
    ["-u", "-b", "newbase.qcow2", "-F", "qcow2", "-p", "-q", "-U"],
])
def test_rebase_unsafe_header_only(tmp_path: Path, qemu_tool: Tool,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """-u rewrites the backing name and format only: no cluster is touched."""
    orig, q, b, files = setup_pair(tmp_path, qemu_tool, monkeypatch, "2deep")
    for d in (q, b):
        make_base_b(qemu_tool, d)
    (b / "base.qcow2").rename(b / "base-moved.qcow2")  # the old backing may be gone
    (q / "base.qcow2").rename(q / "base-moved.qcow2")
    assert run_both(capsys, q, b, "rebase", *args, "top.qcow2") == (0, "", "")
    assert info_fields(b / "top.qcow2") == info_fields(q / "top.qcow2")
    if args[2] != "elsewhere/gone.qcow2":
        compare(q / "top.qcow2", b / "top.qcow2")
    cluster0 = 65536
    assert (b / "top.qcow2").read_bytes()[cluster0:] == (orig / "top.qcow2").read_bytes()[
        cluster0:]


def test_rebase_relative_to_image(tmp_path: Path, qemu_tool: Tool,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A relative -b is resolved against the image's directory, not the working directory."""
    orig, q, b, files = setup_pair(tmp_path, qemu_tool, monkeypatch, "2deep")
    for d in (q, b):
        make_base_b(qemu_tool, d)
    args = ["rebase", "-b", "newbase.qcow2", "-F", "qcow2"]
    assert theirs(tmp_path, *args, "q/top.qcow2") == (0, "", "")
    assert ours(capsys, tmp_path, *args, "b/top.qcow2") == (0, "", "")
    compare(orig / "top.qcow2", b / "top.qcow2")
    assert_same_results(q, b, files)


@pytest.mark.parametrize("args", [
    ["rebase", "top.qcow2"],                                  # -b or -u required
    ["rebase", "-b", "newbase.qcow2", "top.qcow2"],            # safe: copies, then no format
    ["rebase", "-u", "-b", "newbase.qcow2", "top.qcow2"],       # backing format must be given
    ["rebase", "-b", "newbase.qcow2", "-F", "foo", "top.qcow2"],
    ["rebase", "-b", "nothere.qcow2", "-F", "qcow2", "top.qcow2"],
    ["rebase", "-b", "sub/base.qcow2", "-F", "qcow2", "top.qcow2"],
    ["rebase", "-c", "-b", "newbase.qcow2", "-F", "qcow2", "top.qcow2"],  # no -c in 7.2
    ["rebase", "-b", "newbase.qcow2", "-F", "qcow2", "-t", "bogus", "top.qcow2"],
    ["rebase", "-b", "newbase.qcow2", "-F", "qcow2", "-T", "bogus", "top.qcow2"],
    ["rebase", "-b", "newbase.qcow2", "-F", "qcow2", "top.qcow2", "extra"],
    ["rebase", "-b", "newbase.qcow2", "-F", "qcow2", "missing.qcow2"],
    ["rebase", "-b", "newbase.qcow2", "-F", "qcow2", "-f", "raw", "base.qcow2"],
    ["rebase", "-b", "newbase.qcow2", "-F", "qcow2", "-f", "foo", "top.qcow2"],
    ["rebase", "--bogus", "top.qcow2"],
])
def test_rebase_errors(tmp_path: Path, qemu_tool: Tool, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """Same message and exit code; and whatever qemu-img changed before failing, we did too."""
    orig, q, b, files = setup_pair(tmp_path, qemu_tool, monkeypatch, "2deep")
    for d in (q, b):
        make_base_b(qemu_tool, d)
    rc, _, err = run_both(capsys, q, b, *args)
    assert rc == 1 and err
    for name in files:
        compare(q / name, b / name)
    compare(orig / "top.qcow2", b / "top.qcow2")


# -- property: safe rebase keeps the guest content ---------------------------------------------
SIZE = 256 * 1024
write_op = st.tuples(st.integers(0, SIZE - 1), st.integers(1, 40000), st.integers(0, 3))


def apply_ops(path: Path, size: int, ops: list[tuple[int, int, int]], model: bytearray) -> None:
    """Pattern writes (pattern 0 = write zeroes) through qblock, mirrored into ``model``."""
    with api.open(str(path)) as disk:
        for off, n, pat in ops:
            if off >= size:
                continue
            n = min(n, size - off)
            if pat == 0:
                disk.write_zeroes(off, n)
            else:
                disk.write(off, bytes([pat]) * n)
            model[off:off + n] = bytes([pat]) * n


@settings(max_examples=60 if slow_mode() else 12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a_ops=st.lists(write_op, max_size=6), b_ops=st.lists(write_op, max_size=6),
       t_ops=st.lists(write_op, max_size=6),
       sizes=st.tuples(st.sampled_from([SIZE // 2, SIZE]), st.sampled_from([SIZE // 4, SIZE])),
       cluster=st.sampled_from([512, 4096, 65536]))
def test_rebase_keeps_content_property(tmp_path_factory: pytest.TempPathFactory,
                                       capsys: pytest.CaptureFixture[str],
                                       a_ops: list[tuple[int, int, int]],
                                       b_ops: list[tuple[int, int, int]],
                                       t_ops: list[tuple[int, int, int]],
                                       sizes: tuple[int, int], cluster: int) -> None:
    """Random writes in base A, base B and top; after rebasing top from A to B the guest
    sees exactly what it saw before (the model: A's bytes under top's writes)."""
    d = tmp_path_factory.mktemp("prop")
    a_size, b_size = sizes
    model_a, model_b = bytearray(a_size), bytearray(b_size)
    api.create(d / "a.qcow2", a_size, cluster_size=cluster)
    api.create(d / "b.qcow2", b_size)
    api.create(d / "t.qcow2", SIZE, cluster_size=cluster, backing_file="a.qcow2",
               backing_fmt="qcow2")
    apply_ops(d / "a.qcow2", a_size, a_ops, model_a)
    apply_ops(d / "b.qcow2", b_size, b_ops, model_b)
    model = bytearray(SIZE)
    model[:a_size] = model_a
    apply_ops(d / "t.qcow2", SIZE, t_ops, model)
    assert ours(capsys, d, "rebase", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2") == (0, "", "")
    with api.open(str(d / "t.qcow2"), read_only=True) as disk:
        assert disk.read(0, SIZE) == bytes(model)
        assert disk.node.backing is not None
        assert os.path.basename(disk.node.backing.node.filename) == "b.qcow2"
    with api.open(str(d / "b.qcow2"), read_only=True) as disk:
        assert disk.read(0, b_size) == bytes(model_b)  # the new base is only read


@given(old=st.binary(min_size=1, max_size=3000), flips=st.lists(st.integers(0, 2999)))
def test_differing_runs_model(old: bytes, flips: list[int]) -> None:
    """compare_buffers() runs: cover exactly the 512-byte sectors that differ, in order."""
    new = bytearray(old)
    for i in flips:
        if i < len(new):
            new[i] ^= 0xFF
    runs = differing_runs(old, new)
    covered = bytearray(len(old))
    for start, length in runs:
        assert start % 512 == 0 and (length % 512 == 0 or start + length == len(old))
        covered[start:start + length] = b"\1" * length
    for s in range(0, len(old), 512):
        differs = old[s:s + 512] != bytes(new[s:s + 512])
        assert all(covered[s:s + 512]) == differs and any(covered[s:s + 512]) == differs
    assert all(a[0] + a[1] < b[0] for a, b in zip(runs, runs[1:]))


@pytest.mark.parametrize("args,tail", [
    (["commit", "-p", "top.qcow2"], "    (100.00/100%)\r\r\nImage committed.\r\n"),
    (["rebase", "-p", "-b", "", "top.qcow2"], "    (100.00/100%)\r\r\n"),
])
def test_progress_on_a_terminal(tmp_path: Path, qemu_tool: Tool,
                                monkeypatch: pytest.MonkeyPatch, args: list[str],
                                tail: str) -> None:
    """-p draws qemu-img's "    (x.xx/100%)\\r" line on a terminal, from 0% to 100%, like
    qemu-img does on its copy."""
    _, q, b, _ = setup_pair(tmp_path, qemu_tool, monkeypatch, "2deep")
    shown = []
    for where, argv in ((q, ["qemu-img"]), (b, QBLOCK_IMG)):
        proc, text = run_on_terminal([*argv, *args], cwd=where)
        shown.append(text)
        assert proc.returncode == 0, proc.stderr
    for text in shown:
        assert text.startswith("    (0.00/100%)\r") and text.endswith(tail), repr(text)
