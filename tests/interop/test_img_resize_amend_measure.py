"""``qblock img resize``, ``amend`` and ``measure`` against qemu-img 7.2.

Each case runs qemu-img on one copy of an input and ``qblock img`` on a byte-identical twin:
stdout, stderr (our "qblock-img" prefix normalized) and exit codes must match, and so must the
resulting images -- guest content (``qemu-img compare``), ``qemu-img check`` (clean),
``qemu-img info --output=json`` and, where QEMU's layout is reproduced, every byte.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qblock.cli.main import main
from qemu_tools import qemu_img, requires_qemu, run

pytestmark = [pytest.mark.interop, requires_qemu]

Result = tuple[int, str, str]


def ours(*args: str | Path) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["img", *map(str, args)])
    return rc, out.getvalue(), err.getvalue().replace("qblock-img", "qemu-img")


def theirs(*args: str | Path) -> Result:
    p = qemu_img(*args, check=False)
    return p.returncode, p.stdout, p.stderr


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run([*args, path])


class Twins:
    """An input image ``a.*`` for qemu-img and its copy ``b.*`` for qblock."""

    def __init__(self, a: Path) -> None:
        self.a = a
        self.b = a.with_name("b" + a.name[1:])
        shutil.copyfile(a, self.b)

    def both(self, *args: str) -> tuple[Result, Result]:
        """Run ``args`` (with "{}" for the image) through qemu-img on a and qblock on b."""
        mine = ours(*(x.replace("{}", str(self.b)) for x in args))
        qemu = theirs(*(x.replace("{}", str(self.a)) for x in args))
        return (mine[0], mine[1].replace(str(self.b), str(self.a)),
                mine[2].replace(str(self.b), str(self.a))), qemu

    def same(self, *args: str) -> Result:
        mine, qemu = self.both(*args)
        assert mine == qemu, f"qemu-img {' '.join(args)}"
        return mine

    def info(self, path: Path) -> dict:
        data = json.loads(theirs("info", "--output=json", path)[1])
        data["filename"] = "x"
        # Allocation on the host file system follows how each tool wrote the file (holes
        # punched or zeroes written), not the qcow2 layout.
        data.pop("actual-size", None)
        for child in data.get("children", []):
            child["info"]["filename"] = "x"
            child["info"].pop("actual-size", None)
        return data

    def assert_equal_images(self, *, exact: bool = True, fmt: str = "qcow2") -> None:
        assert theirs("compare", "-f", fmt, "-F", fmt, self.a, self.b)[0] == 0
        assert self.info(self.a) == self.info(self.b)
        if fmt == "qcow2":
            check = theirs("check", self.b)
            assert check[0] == 0, check
        if exact:
            assert self.a.read_bytes() == self.b.read_bytes()


def make_qcow2(tmp_path: Path, size: str = "4M", name: str = "a.qcow2", **opts: object) -> Path:
    path = tmp_path / name
    args: list[str | Path] = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    qemu_img(*args, path, size)
    return path


DATA = ("write -P 1 0 1M", "write -z 1M 128k", "write -P 2 2M 64k", "write -z 2M 64k")


# -- resize ----------------------------------------------------------------------------------
RESIZE_ERRORS = [
    ["resize"], ["resize", "{}"], ["resize", "{}", "2M", "extra"], ["resize", "--bogus", "{}",
                                                                      "2M"],
    ["resize", "-x", "{}", "1M"], ["resize", "{}", "-f"], ["resize", "{}", "abc"],
    ["resize", "{}", "18E"], ["resize", "{}", "9E"], ["resize", "-q", "{}", "0"],
    ["resize", "{}", "--", "-100M"], ["resize", "{}", "1000"], ["resize", "{}", "512K"],
    ["resize", "--preallocation=bogus", "{}", "8M"], ["resize", "--preallocation", "{}", "8M"],
    ["resize", "--shrink", "--preallocation=full", "{}", "1M"],
    ["resize", "--preallocation=metadata", "{}", "4M"],
    ["resize", "-f", "raw", "{}", "--", "-1M"],
]


@pytest.mark.parametrize("args", RESIZE_ERRORS, ids=lambda a: " ".join(a[1:]) or "none")
def test_resize_refusals_match(tmp_path: Path, args: list[str]) -> None:
    """Every refusal: same message, exit code, and the image left untouched."""
    t = Twins(make_qcow2(tmp_path))
    rc, _, _ = t.same(*args)
    assert rc == 1
    assert t.a.read_bytes() == t.b.read_bytes()


@pytest.mark.parametrize("fmt_args", [[], ["-f", "raw"]], ids=["probed", "explicit"])
def test_resize_raw_matches(tmp_path: Path, fmt_args: list[str]) -> None:
    """Raw files: relative and absolute sizes, shrink, falloc/full preallocation, and the
    refusals (metadata preallocation, shrink without --shrink), with the probing warning."""
    a = tmp_path / "a.raw"
    a.write_bytes(bytes(range(256)) * 4096)
    t = Twins(a)
    for args in (["+1M"], ["--preallocation=falloc", "3M"], ["--preallocation=full", "+512K"],
                 ["--preallocation=metadata", "+1M"], ["1M"], ["--shrink", "1M"],
                 ["-q", "1.5M"], ["--", "+0"]):
        t.same("resize", *fmt_args, "{}", *args)
        assert t.a.read_bytes() == t.b.read_bytes()


@pytest.mark.parametrize("cluster_size,refcount_bits", [(512, 1), (4096, 16), (65536, 64),
                                                        (2 * 1024 * 1024, 16)])
def test_resize_qcow2_sequence_matches(tmp_path: Path, cluster_size: int,
                                       refcount_bits: int) -> None:
    """Shrink (data discarded, refcount blocks and the file tail dropped) and grow with and
    without metadata preallocation give QEMU's exact file; stale data never reappears."""
    t = Twins(make_qcow2(tmp_path, "3M", cluster_size=cluster_size,
                         refcount_bits=refcount_bits))
    qemu_io(t.a, "write -P 7 0 3M")
    shutil.copyfile(t.a, t.b)
    for args in (["--shrink", "{}", "1M"], ["--preallocation=metadata", "{}", "5M"],
                 ["--shrink", "{}", "512"], ["{}", "+2M"], ["{}", "+1000"]):
        t.same("resize", *args)
        t.assert_equal_images()


@pytest.mark.parametrize("prealloc", ["falloc", "full"])
def test_resize_qcow2_full_preallocation(tmp_path: Path, prealloc: str) -> None:
    """falloc/full: same output, guest content and info; the layout differs by design
    (QEMU builds a new refcount area at the end of the file, qblock preallocates like
    metadata mode and then reserves the file space)."""
    t = Twins(make_qcow2(tmp_path, "1M"))
    qemu_io(t.a, "write -P 7 0 1M")
    shutil.copyfile(t.a, t.b)
    t.same("resize", f"--preallocation={prealloc}", "{}", "6M")
    t.assert_equal_images(exact=False)
    assert qemu_img("map", "--output=json", t.b).stdout.count('"data": true') >= 1


def test_resize_snapshots(tmp_path: Path) -> None:
    """v3 images with internal snapshots resize (the snapshot keeps its size); v2 ones are
    refused with QEMU's message."""
    t = Twins(make_qcow2(tmp_path, "2M"))
    qemu_io(t.a, "write -P 3 0 2M")
    qemu_img("snapshot", "-c", "s1", t.a)
    shutil.copyfile(t.a, t.b)
    t.same("resize", "--shrink", "{}", "1M")
    t.same("resize", "{}", "3M")
    t.assert_equal_images()
    v2 = Twins(make_qcow2(tmp_path, "1M", name="a2.qcow2", compat="0.10"))
    qemu_img("snapshot", "-c", "s1", v2.a)
    shutil.copyfile(v2.a, v2.b)
    assert v2.same("resize", "{}", "4M")[2] == \
        "qemu-img: Can't resize a v2 image which has snapshots\n"


def test_resize_over_larger_backing_file(tmp_path: Path) -> None:
    """Growing an overlay whose backing file is longer: the new area reads as zeroes."""
    base = make_qcow2(tmp_path, "4M", name="base.qcow2")
    qemu_io(base, "write -P 9 0 4M")
    top = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "1M")
    t = Twins(top)
    t.same("resize", "{}", "4M")
    t.assert_equal_images()
    run(["qemu-io", "-c", "read -P 0 1M 3M", t.b])


# -- amend -----------------------------------------------------------------------------------
AMEND_ERRORS = [
    "", "compat=2", "refcount_bits=3", "refcount_bits=abc", "lazy_refcounts=maybe",
    "backing_file=x", "backing_fmt=raw", "cluster_size=4k", "extended_l2=on",
    "preallocation=full", "compression_type=zstd", "bogus=1", "data_file=x",
    "data_file_raw=on", "encrypt.format=luks", "encrypt.keyslot=1", "size=1000",
    "size=abc", "compat=0.10,lazy_refcounts=on", "compat=0.10,refcount_bits=8",
]


@pytest.mark.parametrize("opts", AMEND_ERRORS)
def test_amend_refusals_match(tmp_path: Path, opts: str) -> None:
    t = Twins(make_qcow2(tmp_path))
    args = ["amend", "-o", opts, "{}"] if opts else ["amend", "{}"]
    assert t.same(*args)[0] == 1
    t.assert_equal_images()


def test_amend_command_line_matches(tmp_path: Path) -> None:
    """-o help (with -f or from the image), raw images, argument errors."""
    t = Twins(make_qcow2(tmp_path))
    raw = tmp_path / "a.raw"
    raw.write_bytes(bytes(65536))
    r = Twins(raw)
    for args in (["amend", "-o", "help", "{}"], ["amend", "-f", "qcow2", "-o", "help"],
                 ["amend", "-f", "raw", "-o", "help"], ["amend", "-o", "compat=1.1"],
                 ["amend", "-o", "compat=1.1", "{}", "{}"], ["amend", "-x", "-o", "a", "{}"],
                 ["amend", "-o"], ["amend", "-t", "bogus", "-o", "compat=1.1", "{}"]):
        t.same(*args)
    for args in (["amend", "-o", "help", "{}"], ["amend", "-o", "compat=1.1", "{}"]):
        r.same(*args)
    t.assert_equal_images()


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
def test_amend_sequence_byte_identical(tmp_path: Path, cluster_size: int) -> None:
    """refcount_bits 16->1->64->16, compat down (zero clusters expanded) and up, lazy
    refcounts on/off, 2-bit refcounts: each step leaves exactly QEMU's file.

    With 64 KiB clusters the narrow widths are 32/64 bits: qemu-img walks every refcount
    slot the old table could describe (2^31 for 2-bit refcounts), which takes it seconds.
    """
    t = Twins(make_qcow2(tmp_path, cluster_size=cluster_size))
    qemu_io(t.a, *DATA)
    shutil.copyfile(t.a, t.b)
    before = qemu_img("convert", "-O", "raw", t.b, tmp_path / "before.raw")
    assert before.returncode == 0
    narrow = 1 if cluster_size < 65536 else 32
    steps = [(f"refcount_bits={narrow}", 0), ("refcount_bits=64", 0), ("refcount_bits=16", 0),
             ("compat=0.10", 0), ("lazy_refcounts=on", 1), ("compat=1.1", 0),
             ("lazy_refcounts=on", 0), (f"refcount_bits={2 * narrow}", 0),
             ("lazy_refcounts=off", 0), ("compat=1.1,refcount_bits=16", 0)]
    for opts, rc in steps:
        assert t.same("amend", "-o", opts, "{}")[0] == rc
        t.assert_equal_images()
    assert qemu_img("compare", "-F", "raw", t.b, tmp_path / "before.raw").returncode == 0


def test_amend_refcount_width_round_trip_keeps_data(tmp_path: Path) -> None:
    """16 -> 1 -> 64 -> 16 with data and an internal snapshot (refcounts of 2): the too-narrow
    width is refused like QEMU, the others keep every byte of guest data, check clean."""
    t = Twins(make_qcow2(tmp_path, cluster_size=4096))
    qemu_io(t.a, *DATA)
    qemu_img("snapshot", "-c", "s1", t.a)
    qemu_io(t.a, "write -P 5 3M 64k")
    shutil.copyfile(t.a, t.b)
    rc, _, err = t.same("amend", "-o", "refcount_bits=1", "{}")
    assert rc == 1 and "Cannot decrease refcount entry width to 1 bits" in err
    for bits in (2, 64, 16):
        assert t.same("amend", "-o", f"refcount_bits={bits}", "{}")[0] == 0
        t.assert_equal_images()


def test_refcount_width_change_failing_switch_keeps_image(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """If the header write that switches to the new refcount structures fails, the image keeps
    its old structures, the new ones are given back (no leaks) and the data is intact."""
    from qblock.drivers.qcow2.driver import Qcow2Driver
    from qblock.errors import QBlockError

    img = make_qcow2(tmp_path)
    qemu_io(img, *DATA)
    shutil.copyfile(img, tmp_path / "before.qcow2")
    real = Qcow2Driver.update_header

    async def failing(self: Qcow2Driver) -> None:
        if self.header.refcount_order != 4:
            raise QBlockError("Input/output error", errno=5)
        await real(self)

    monkeypatch.setattr(Qcow2Driver, "update_header", failing)
    assert ours("amend", "-o", "refcount_bits=1", img) == (
        1, "", "qemu-img: Failed to update the qcow2 header: Input/output error\n")
    monkeypatch.undo()
    assert theirs("check", img)[0] == 0
    assert json.loads(theirs("info", "--output=json", img)[1])[
        "format-specific"]["data"]["refcount-bits"] == 16
    assert theirs("compare", img, tmp_path / "before.qcow2")[0] == 0


def test_amend_downgrade_with_backing_and_snapshots(tmp_path: Path) -> None:
    """Zero clusters over a backing file become allocated zero clusters, in the active and
    the snapshot L2 tables; QEMU's layout, byte for byte."""
    base = make_qcow2(tmp_path, name="base.qcow2")
    qemu_io(base, "write -P 9 0 4M")
    top = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io(top, *DATA)
    qemu_img("snapshot", "-c", "s1", top)
    qemu_io(top, "write -z 0 64k", "write -P 5 3M 64k")
    t = Twins(top)
    assert t.same("amend", "-o", "compat=0.10", "{}")[0] == 0
    assert t.a.read_bytes() == t.b.read_bytes()
    assert theirs("compare", t.a, t.b)[0] == 0


def test_amend_with_bitmaps(tmp_path: Path) -> None:
    """Persistent bitmaps survive a refcount width change and a resize byte for byte; a
    downgrade keeps the (then inconsistent) bitmap extension as QEMU does.

    After the downgrade both tools leave leaked clusters (QEMU stores the bitmaps of the now
    v2 image at close); qblock leaks one cluster more, so that step compares content only.
    """
    t = Twins(make_qcow2(tmp_path))
    qemu_io(t.a, "write -P 1 0 1M")
    qemu_img("bitmap", "--add", t.a, "b0")
    qemu_img("bitmap", "--add", "-g", "4k", t.a, "b1")
    qemu_io(t.a, "write 0 64k")
    shutil.copyfile(t.a, t.b)
    for opts in ("refcount_bits=4", "size=8M", "refcount_bits=16"):
        assert t.same("amend", "-o", opts, "{}")[0] == 0
        assert t.a.read_bytes() == t.b.read_bytes()
    assert t.same("amend", "-o", "compat=0.10", "{}")[0] == 0
    assert theirs("compare", t.a, t.b)[0] == 0
    assert theirs("check", t.b)[0] == theirs("check", t.a)[0] == 3  # leaks only


@pytest.mark.parametrize("create,io_cmds", [
    ({"extended_l2": "on"}, DATA), ({"compression_type": "zstd"}, ("write -c -P 3 0 64k",)),
    ({"compression_type": "zstd"}, ("write -P 3 0 64k",))])
def test_amend_downgrade_refusals_and_zstd(tmp_path: Path, create: dict,
                                           io_cmds: Sequence[str]) -> None:
    """extended_l2 and zstd-compressed clusters block a downgrade; zstd without compressed
    clusters falls back to zlib."""
    t = Twins(make_qcow2(tmp_path, **create))
    qemu_io(t.a, *io_cmds)
    shutil.copyfile(t.a, t.b)
    t.same("amend", "-o", "compat=0.10", "{}")
    t.assert_equal_images()


# -- measure ---------------------------------------------------------------------------------
MEASURE_ARGS = [
    [], ["-f", "qcow2"], ["a", "b"], ["-O", "foo", "--size", "1M"],
    ["-O", "qcow2", "-o", "cluster_size=3k", "--size", "1M"],
    ["-O", "qcow2", "-o", "bogus=1", "--size", "1M"],
    ["-O", "qcow2", "-o", "compat=v2", "--size", "1M"],
    ["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1M"],
    ["-O", "qcow2", "-o", "compat=0.10,refcount_bits=8", "--size", "1M"],
    ["-O", "qcow2", "-o", "preallocation=foo", "--size", "1M"],
    ["-O", "qcow2", "--size", "1P", "-o", "cluster_size=512"],
    ["-O", "qcow2", "--size", "abc"], ["--output=xml", "--size", "1M"],
    ["-O", "raw", "-o", "cluster_size=4k", "--size", "1M"],
    ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "--size", "1M"],
    ["--size", "1G"], ["-O", "raw", "--size", "1000"],
    ["-O", "qcow2", "--size", "1G", "--output=json"],
    ["-O", "qcow2", "-o", "preallocation=full,nocow=on", "--size", "1M"],
]


@pytest.mark.parametrize("args", MEASURE_ARGS, ids=lambda a: " ".join(a) or "none")
def test_measure_command_line_matches(args: list[str]) -> None:
    assert ours("measure", *args) == theirs("measure", *args)


@pytest.fixture
def measure_inputs(tmp_path: Path) -> Path:
    """A raw file with data, a qcow2 chain (base + overlay with zero clusters), a v3 image
    with persistent bitmaps and a v2 image."""
    raw = tmp_path / "r.raw"
    with open(raw, "wb") as f:
        f.truncate(3 * 1024 * 1024 + 4096)
        f.seek(70000)
        f.write(b"x" * 5000)
        f.seek(2 * 1024 * 1024)
        f.write(b"y" * 65536)
    base = make_qcow2(tmp_path, name="base.qcow2")
    qemu_io(base, "write -P 1 0 1M", "write -P 2 3M 4k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             tmp_path / "top.qcow2")
    qemu_io(tmp_path / "top.qcow2", "write -z 0 64k", "write -P 3 1M 200k")
    bm = make_qcow2(tmp_path, "5M", name="bm.qcow2")
    qemu_io(bm, "write -P 1 0 100k")
    qemu_img("bitmap", "--add", bm, "first")
    qemu_img("bitmap", "--add", "-g", "512", bm, "a-longer-bitmap-name")
    v2 = make_qcow2(tmp_path, "2M", name="v2.qcow2", compat="0.10")
    qemu_io(v2, "write -P 1 64k 64k")
    return tmp_path


@pytest.mark.parametrize("name", ["r.raw", "base.qcow2", "top.qcow2", "bm.qcow2", "v2.qcow2"])
@pytest.mark.parametrize("opts", [["-O", "qcow2"], ["-O", "raw"],
                                  ["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"],
                                  ["-O", "qcow2", "-o", "compat=0.10"],
                                  ["-O", "qcow2", "-o", "backing_file=x.qcow2"],
                                  ["-O", "qcow2", "-o", "extended_l2=on,preallocation=full"]])
@pytest.mark.parametrize("output", ["human", "json"])
def test_measure_files_match(measure_inputs: Path, name: str, opts: list[str],
                             output: str) -> None:
    """Required sizes walk the backing chain; "bitmaps" appears for v3 qcow2 sources."""
    path = measure_inputs / name
    args = ["measure", f"--output={output}", *opts, str(path)]
    assert ours(*args) == theirs(*args)


@pytest.fixture
def snapshot_inputs(tmp_path: Path) -> Path:
    """Internal snapshots: one taken before the image grew, one over a backing file (zero
    and unallocated clusters), one of an extended-L2 image with partial subclusters."""
    grown = make_qcow2(tmp_path, name="grown.qcow2")
    qemu_io(grown, "write 64k 64k")
    qemu_img("snapshot", "-c", "s1", grown)
    qemu_io(grown, "write 1M 1M")
    qemu_img("resize", grown, "8M")
    qemu_img("snapshot", "-c", "s2", grown)
    qemu_io(grown, "write -z 0 2M", "write 3M 100k")
    base = make_qcow2(tmp_path, name="base.qcow2")
    qemu_io(base, "write 0 3M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -z 0 64k", "write 2M 64k")
    qemu_img("snapshot", "-c", "s1", top)
    qemu_io(top, "write -z 1M 1M")
    ext = make_qcow2(tmp_path, "2M", name="ext.qcow2", extended_l2="on")
    qemu_io(ext, "write 0 5k", "write -z 8k 4k", "write 1M 9k")
    qemu_img("snapshot", "-c", "s1", ext)
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    return tmp_path


@pytest.mark.parametrize("name,snap", [
    ("grown.qcow2", "s1"), ("grown.qcow2", "2"), ("grown.qcow2", "snapshot.name=s1"),
    ("grown.qcow2", "snapshot.id=2,snapshot.name=s2"), ("top.qcow2", "s1"),
    ("ext.qcow2", "s1"), ("grown.qcow2", "nosuch"), ("grown.qcow2", "snapshot.id=1,"
                                                                   "snapshot.name=s2"),
    ("grown.qcow2", "snapshot.foo=1"), ("r.raw", "s1")])
@pytest.mark.parametrize("opts", [["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k"],
                                  ["-O", "qcow2", "-o", "cluster_size=512"], ["-O", "raw"]])
def test_measure_snapshot_matches(snapshot_inputs: Path, name: str, snap: str,
                                  opts: list[str]) -> None:
    """-l: the snapshot's clusters (through the backing chain where it has none) are
    measured at the image's current length, as qcow2_snapshot_load_tmp() leaves it."""
    args = ["measure", *opts, "-l", snap, str(snapshot_inputs / name)]
    assert ours(*args) == theirs(*args)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 1 << 42), cluster_bits=st.integers(9, 21),
       refcount_order=st.integers(0, 6), extended_l2=st.booleans(),
       compat=st.sampled_from(["0.10", "1.1"]),
       prealloc=st.sampled_from(["off", "metadata", "falloc", "full"]),
       fmt=st.sampled_from(["qcow2", "qcow2", "raw"]))
def test_measure_size_property(size: int, cluster_bits: int, refcount_order: int,
                               extended_l2: bool, compat: str, prealloc: str,
                               fmt: str) -> None:
    """``measure --size`` equals qemu-img's for any size and option mix, errors included."""
    args = ["measure", "--output=json", "-O", fmt, "--size", str(size)]
    if fmt == "qcow2":
        args += ["-o", f"cluster_size={1 << cluster_bits},refcount_bits={1 << refcount_order},"
                       f"extended_l2={'on' if extended_l2 else 'off'},compat={compat},"
                       f"preallocation={prealloc}"]
    assert ours(*args) == theirs(*args)


@pytest.mark.parametrize("args", [
    ["amend", "--object", "secret,id=s0,data=x", "-o", "lazy_refcounts=on", "{img}"],
    ["resize", "--object", "secret,id=s0,data=x", "{img}", "+1M"],
    ["measure", "--object", "secret,id=s0,data=x", "-O", "qcow2", "{img}"],
    ["dd", "--object", "secret,id=s0,data=x", "if={img}", "of={out}"],
], ids=lambda a: a[0])
def test_object_is_refused_and_nothing_is_written(tmp_path: Path, args: list[str]) -> None:
    """--object (README, deliberate differences): status 1, one error line, files unchanged."""
    img, out = tmp_path / "a.qcow2", tmp_path / "out.raw"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -P 7 0 64k")
    before = img.read_bytes()
    argv = [a.format(img=img, out=out) for a in args]
    assert ours(*argv) == (1, "", "qemu-img: --object is not supported by qblock\n")
    assert img.read_bytes() == before and not out.exists()
