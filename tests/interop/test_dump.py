"""``qblock dump`` against images written by QEMU 7.2 and against the spec's byte layout.

The image of QEMU's iotest 303 (two bitmaps made with ``qemu-img bitmap --add``, data
written with qemu-io) must dump exactly as 303.out shows it; every printed number is checked
against the image bytes unpacked at the offsets of docs/interop/qcow2.txt; editing commands
must change exactly the bytes they are meant to (whole files compared) and leave an image
that ``qemu-img check`` accepts or rejects as expected.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qblock.cli.main import main as qblock_main
from tests.interop.daemon_tools import env

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io")
                                is None, reason="qemu-img and qemu-io are needed")
MiB = 1 << 20

# qcow2.txt "Header": (name as qcow2.py prints it, byte offset, struct code)
HEADER = [("magic", 0, "I"), ("version", 4, "I"), ("backing_file_offset", 8, "Q"),
          ("backing_file_size", 16, "I"), ("cluster_bits", 20, "I"), ("size", 24, "Q"),
          ("crypt_method", 32, "I"), ("l1_size", 36, "I"), ("l1_table_offset", 40, "Q"),
          ("refcount_table_offset", 48, "Q"), ("refcount_table_clusters", 56, "I"),
          ("nb_snapshots", 60, "I"), ("snapshot_offset", 64, "Q"),
          ("incompatible_features", 72, "Q"), ("compatible_features", 80, "Q"),
          ("autoclear_features", 88, "Q"), ("refcount_order", 96, "I"),
          ("header_length", 100, "I")]
HEX = {"magic", "backing_file_offset", "backing_file_size", "l1_table_offset",
       "refcount_table_offset", "snapshot_offset"}

# tests/qemu-iotests/303.out (QEMU 7.2), the zlib image dumped by qcow2.py dump-header.
IOTEST_303_OUT = """\
magic                     0x514649fb
version                   3
backing_file_offset       0x0
backing_file_size         0x0
cluster_bits              16
size                      10485760
crypt_method              0
l1_size                   1
l1_table_offset           0x30000
refcount_table_offset     0x10000
refcount_table_clusters   1
nb_snapshots              0
snapshot_offset           0x0
incompatible_features     []
compatible_features       []
autoclear_features        [0]
refcount_order            4
header_length             112

Header extension:
magic                     0x6803f857 (Feature table)
length                    384
data                      <binary>

Header extension:
magic                     0x23852875 (Bitmaps)
length                    24
nb_bitmaps                2
reserved32                0
bitmap_directory_size     0x40
bitmap_directory_offset   0x9d0000

Bitmap name               bitmap-1
bitmap_table_offset       0x9b0000
bitmap_table_size         1
flags                     0x2 (['auto'])
type                      1
granularity_bits          15
name_size                 8
extra_data_size           0
Bitmap table   type            size         offset
0              serialized      65536        10092544

Bitmap name               bitmap-2
bitmap_table_offset       0x9c0000
bitmap_table_size         1
flags                     0x0 ([])
type                      1
granularity_bits          16
name_size                 8
extra_data_size           0
Bitmap table   type            size         offset
0              all-zeroes      0            0

"""


def tool(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True,
                          timeout=60)


def dump(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    capsys.readouterr()
    rc = qblock_main(["dump", *(str(a) for a in args)])
    return rc, capsys.readouterr().out


def make_303(path: Path, compression: str = "zlib") -> Path:
    """iotest 303: bitmap-1 (32k, enabled) sees 6 MiB of writes, bitmap-2 (64k, disabled)."""
    tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compression_type={compression}",
         path, "10M")
    tool("qemu-img", "bitmap", "--add", "-g", "32768", "-f", "qcow2", path, "bitmap-1")
    for i in range(6):  # one qemu-io run per MiB, as 303 does: the layout depends on it
        tool("qemu-io", "-c", f"write {i * MiB} {MiB}", path)
    tool("qemu-img", "bitmap", "--add", "-g", "65536", "-f", "qcow2", path, "bitmap-2",
         "--disable")
    for i in range(6, 8):
        tool("qemu-io", "-c", f"write {i * MiB} {MiB}", path)
    return path


@pytest.fixture(scope="module")
def image_303(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_303(tmp_path_factory.mktemp("dump") / "303.qcow2")


@pytest.fixture
def image(image_303: Path, tmp_path: Path) -> Path:
    """A private copy of the 303 image, for the editing commands."""
    copy = tmp_path / "img.qcow2"
    shutil.copyfile(image_303, copy)
    return copy


def raw_extensions(buf: bytes, start: int) -> list[tuple[int, bytes, int]]:
    """(magic, data, offset of the data) of each extension, walked per qcow2.txt."""
    out = []
    pos = start
    while True:
        magic, length = struct.unpack_from(">II", buf, pos)
        if magic == 0:
            return out
        out.append((magic, buf[pos + 8:pos + 8 + length], pos + 8))
        pos += 8 + (length + 7) // 8 * 8


def rows(text: str) -> list[tuple[str, str]]:
    """``name value`` rows of a dump (25-column name field)."""
    return [(ln[:25].strip(), ln[26:]) for ln in text.splitlines() if len(ln) > 26
            and ln[25] == " " and not ln.startswith(("Bitmap table", "0 ", "1 "))]


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return tool("qemu-img", "check", "-f", "qcow2", path, check=False)


# -- dumps -----------------------------------------------------------------------------------

def test_dump_header_equals_iotest_303(image_303: Path, capsys: pytest.CaptureFixture[str]):
    rc, out = dump(capsys, image_303, "dump-header")
    assert rc == 0
    assert out == IOTEST_303_OUT


def test_dump_header_exts_is_the_extension_part(image_303: Path,
                                                capsys: pytest.CaptureFixture[str]):
    rc, out = dump(capsys, image_303, "dump-header-exts")
    assert rc == 0
    assert out == IOTEST_303_OUT[IOTEST_303_OUT.index("Header extension:"):]


def test_every_printed_field_matches_the_image_bytes(image: Path,
                                                     capsys: pytest.CaptureFixture[str]):
    # Give the image a backing file and an unknown extension too, so every kind is shown.
    tool("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "base.raw", "-F", "raw", image)
    assert dump(capsys, image, "add-header-ext", "0x12345678", "hello")[0] == 0
    raw = image.read_bytes()
    rc, out = dump(capsys, image, "dump-header")
    assert rc == 0
    printed = rows(out)
    header = dict(printed[:len(HEADER)])
    for name, offset, code in HEADER:
        value = struct.unpack_from(">" + code, raw, offset)[0]
        if name.endswith("_features"):
            expected = str([b for b in range(64) if value >> b & 1])
        else:
            expected = f"{value:#x}" if name in HEX else str(value)
        assert header[name] == expected, name
    hlen = struct.unpack_from(">I", raw, 100)[0]
    exts = raw_extensions(raw, hlen)
    assert [m for m, _, _ in exts] == [0xE2792ACA, 0x6803F857, 0x23852875, 0x12345678]
    shown = [(v.split()[0], next(v2 for n2, v2 in printed[i + 1:] if n2 == "length"))
             for i, (n, v) in enumerate(printed) if n == "magic" and i >= len(HEADER)]
    assert shown == [(f"{m:#x}", str(len(d))) for m, d, _ in exts]
    assert "data                      'raw'" in out
    assert "magic                     0x12345678 (<unknown>)" in out
    assert "data                      'hello'" in out
    assert "magic                     0xe2792aca (Backing format)" in out

    nb, reserved, dir_size, dir_off = struct.unpack(">IIQQ", exts[2][1])
    values = dict(printed)
    assert (values["nb_bitmaps"], values["reserved32"]) == (str(nb), str(reserved))
    assert values["bitmap_directory_size"] == f"{dir_size:#x}"
    assert values["bitmap_directory_offset"] == f"{dir_off:#x}"
    # qcow2.txt "Bitmap directory": entries in order, each padded to 8 bytes.
    entries = [g[:8] for g in _split(printed, "Bitmap name")]
    pos = dir_off
    tables = [ln for ln in out.splitlines() if ln[:1].isdigit()]
    for n, entry in enumerate(entries):
        toff, tsize, flags, typ, gbits, nsize, extra = struct.unpack_from(">QIIBBHI", raw, pos)
        name = raw[pos + 24 + extra:pos + 24 + extra + nsize].decode()
        names = [f for f, bit in (("in-use", 1), ("auto", 2)) if flags & bit]
        assert entry == [("Bitmap name", name), ("bitmap_table_offset", f"{toff:#x}"),
                         ("bitmap_table_size", str(tsize)), ("flags", f"{flags:#x} ({names})"),
                         ("type", str(typ)), ("granularity_bits", str(gbits)),
                         ("name_size", str(nsize)), ("extra_data_size", str(extra))]
        (entry_word,) = struct.unpack_from(">Q", raw, toff)
        kind = "serialized" if entry_word & 0x00FFFFFFFFFFFE00 else (
            "all-ones" if entry_word & 1 else "all-zeroes")
        assert tables[n].split() == [
            "0", kind, str(65536 if kind == "serialized" else 0),
            str(entry_word & 0x00FFFFFFFFFFFE00)]
        pos += (24 + extra + nsize + 7) // 8 * 8


def _split(printed: list[tuple[str, str]], first: str):
    group: list[tuple[str, str]] = []
    for row in printed:
        if row[0] == first and group:
            yield group
            group = []
        if row[0] == first or group:
            group.append(row)
    if group:
        yield group


def test_json_output(image_303: Path, capsys: pytest.CaptureFixture[str]):
    raw = image_303.read_bytes()
    rc, out = dump(capsys, image_303, "dump-header", "--output=json")
    assert rc == 0
    head, exts = out.split("\n\n", 1)
    header = json.loads(head)
    assert header == {name: struct.unpack_from(">" + code, raw, off)[0]
                      for name, off, code in HEADER}
    assert head == json.dumps(header, indent=4)
    # The 303.out JSON shape: bitmap directory with each bitmap table.
    assert json.loads(exts) == [
        {"name": "Feature table", "magic": 0x6803F857, "length": 384, "data_str": "<binary>"},
        {"name": "Bitmaps", "magic": 0x23852875, "length": 24, "data": {
            "nb_bitmaps": 2, "reserved32": 0, "bitmap_directory_size": 64,
            "bitmap_directory_offset": 0x9D0000, "bitmap_directory": [
                {"name": "bitmap-1", "bitmap_table_offset": 0x9B0000, "bitmap_table_size": 1,
                 "flags": 2, "type": 1, "granularity_bits": 15, "name_size": 8,
                 "extra_data_size": 0, "bitmap_table": [
                     {"type": "serialized", "offset": 10092544, "reserved": 0}]},
                {"name": "bitmap-2", "bitmap_table_offset": 0x9C0000, "bitmap_table_size": 1,
                 "flags": 0, "type": 1, "granularity_bits": 16, "name_size": 8,
                 "extra_data_size": 0, "bitmap_table": [
                     {"type": "all-zeroes", "offset": 0, "reserved": 0}]}]}}]
    assert dump(capsys, image_303, "-j", "dump-header")[1] == out


def test_l1_l2_and_refcounts_agree_with_qemu(image_303: Path,
                                             capsys: pytest.CaptureFixture[str]):
    rc, out = dump(capsys, image_303, "dump-l2", "0", "--output=json")
    assert rc == 0
    l2 = json.loads(out)
    extents = json.loads(tool("qemu-img", "map", "--output=json", "-f", "qcow2",
                              image_303).stdout)
    expect = {}
    for e in extents:
        if e["data"]:
            for k in range(e["length"] // 65536):
                expect[e["start"] + k * 65536] = e["offset"] + k * 65536
    assert {r["guest_offset"]: r["host_offset"] for r in l2["entries"]} == expect
    assert {r["type"] for r in l2["entries"]} == {"data"}
    assert all(r["copied"] for r in l2["entries"])

    l1 = json.loads(dump(capsys, image_303, "dump-l1", "--output=json")[1])
    assert [e["l2_offset"] for e in l1["entries"]] == [l2["l2_offset"]]

    refs = json.loads(dump(capsys, image_303, "dump-refcounts", "--output=json")[1])
    (block,) = refs["refcount_blocks"]
    raw = image_303.read_bytes()
    l1_off, rt_off = struct.unpack_from(">QQ", raw, 40)
    (bitmaps,) = [e["data"] for e in json.loads(
        dump(capsys, image_303, "dump-header-exts", "-j")[1]) if e["name"] == "Bitmaps"]
    # Every cluster the metadata points to, each referenced once (no snapshots).
    referenced = {0, rt_off, block["offset"], l1_off, l2["l2_offset"], *expect.values(),
                  bitmaps["bitmap_directory_offset"]}
    for b in bitmaps["bitmap_directory"]:
        referenced |= {b["bitmap_table_offset"]} | {t["offset"] for t in b["bitmap_table"]}
    # (offset 0, the header cluster, also stands for all-zeroes bitmap table entries)
    assert (block["used"], block["max_refcount"]) == (len(referenced), 1)
    text = dump(capsys, image_303, "dump-l2", "0")[1].splitlines()
    assert len(text) == 2 + len(expect)


# -- editing ---------------------------------------------------------------------------------

def diff_ranges(a: bytes, b: bytes) -> list[int]:
    assert len(a) == len(b)
    return [i for i in range(min(len(a), 65536)) if a[i] != b[i]] + (
        [-1] if a[65536:] != b[65536:] else [])


@pytest.mark.parametrize("group,bit,offset", [("compatible", 5, 80), ("autoclear", 7, 88),
                                              ("incompatible", 63, 72)])
def test_set_feature_bit(image: Path, capsys: pytest.CaptureFixture[str], group: str, bit: int,
                         offset: int):
    before = image.read_bytes()
    assert dump(capsys, image, "set-feature-bit", group, str(bit))[0] == 0
    after = image.read_bytes()
    byte = offset + 7 - bit // 8
    assert diff_ranges(before, after) == [byte]
    assert after[byte] == before[byte] | 1 << (bit % 8)
    result = check(image)
    if group == "incompatible":
        assert result.returncode == 1
        assert "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000000" \
            in result.stderr
    else:
        # QEMU keeps unknown compatible bits and clears unknown autoclear bits on write.
        assert result.returncode == 0, result.stderr


def test_set_header(image: Path, capsys: pytest.CaptureFixture[str]):
    before = image.read_bytes()
    assert dump(capsys, image, "set-header", "compatible_features", "0x1")[0] == 0
    after = image.read_bytes()
    assert diff_ranges(before, after) == [87]
    assert check(image).returncode == 0
    info = json.loads(tool("qemu-img", "info", "--output=json", image).stdout)
    assert info["format-specific"]["data"]["lazy-refcounts"] is True

    assert dump(capsys, image, "set-header", "magic", "0")[0] == 0
    assert diff_ranges(after, image.read_bytes()) == [0, 1, 2, 3]
    result = check(image)
    assert result.returncode == 1 and "Image is not in qcow2 format" in result.stderr


def test_add_and_del_header_ext(image: Path, capsys: pytest.CaptureFixture[str]):
    before = image.read_bytes()
    hlen = struct.unpack_from(">I", before, 100)[0]
    end = raw_extensions(before, hlen)[-1]
    end_marker = end[2] + (len(end[1]) + 7) // 8 * 8
    assert dump(capsys, image, "add-header-ext", "0x12345678", "hello")[0] == 0
    after = image.read_bytes()
    ext = struct.pack(">II", 0x12345678, 5) + b"hello\0\0\0"
    expected = before[:end_marker] + ext + before[end_marker:end_marker + 8]
    assert after[:len(expected)] == expected
    assert after[len(expected):] == before[len(expected):]
    assert check(image).returncode == 0

    proc = subprocess.run([sys.executable, "-m", "qblock.cli.main", "dump", str(image),
                           "add-header-ext-stdio", "0x9abcdef0"], input=b"\x00\x01\xff",
                          capture_output=True, env=env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    exts = raw_extensions(image.read_bytes(), hlen)
    assert exts[-1][:2] == (0x9ABCDEF0, b"\x00\x01\xff")
    rc, out = dump(capsys, image, "dump-header-exts")
    assert "magic                     0x9abcdef0 (<unknown>)\nlength                    3\n" \
           "data                      <binary>\n" in out

    for magic in ("0x9abcdef0", "0x12345678"):
        assert dump(capsys, image, "del-header-ext", magic)[0] == 0
    assert image.read_bytes() == before  # the freed area is zeroed again

    assert dump(capsys, image, "del-header-ext", "0x12345678") == (0, "No such header extension\n")
    assert image.read_bytes() == before


def test_del_bitmaps_ext_leaks_their_clusters(image: Path, capsys: pytest.CaptureFixture[str]):
    before = image.read_bytes()
    assert dump(capsys, image, "del-header-ext", "0x23852875")[0] == 0
    after = image.read_bytes()
    hlen = struct.unpack_from(">I", before, 100)[0]
    changed = diff_ranges(before, after)
    assert changed and min(changed) >= hlen and max(changed) < hlen + 8 + 384 + 8 + 24 + 8
    result = check(image)
    # Directory and the one serialized table/data cluster pair are no longer referenced.
    assert result.returncode == 3
    assert "4 leaked clusters were found on the image." in result.stdout


def test_errors_leave_the_image_alone(image: Path, capsys: pytest.CaptureFixture[str]):
    before = image.read_bytes()
    cases = [
        (["set-header", "nosuch", "1"], "'nosuch' is not a known header field"),
        (["set-header", "version", "x"], "'x' is not a valid number"),
        (["set-feature-bit", "weird", "1"],
         "'weird' is not a valid group, try 'incompatible', 'compatible', or 'autoclear'"),
        (["set-feature-bit", "compatible", "64"],
         "'64' is not a valid bit number in range [0, 64)"),
        (["add-header-ext", "zz", "x"], "'zz' is not a valid magic number"),
        (["add-header-ext", "0x1", "x" * 70000],
         "Header extensions do not fit in the header cluster"),
        (["frobnicate"], "Unknown command 'frobnicate'"),
    ]
    for args, message in cases:
        rc, out = dump(capsys, image, *args)
        assert (rc, out) == (1, message + "\n"), args
    assert image.read_bytes() == before


@pytest.mark.parametrize("opts", ["extended_l2=off", "extended_l2=on"])
def test_l2_cluster_kinds_agree_with_qemu_img_map(tmp_path: Path, opts: str,
                                                  capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "kinds.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, "4M")
    tool("qemu-io", "-c", "write -c -P 3 0 64k", "-c", "write -z 128k 64k",
         "-c", "write -P 1 256k 64k", "-c", "write -z 1M 64k", path)
    rc, out = dump(capsys, path, "dump-l2", "0", "--output=json")
    assert rc == 0
    got = {r["guest_offset"]: (r["type"], r["host_offset"] if r["type"] == "data" else None)
           for r in json.loads(out)["entries"]}
    want = {}
    for e in json.loads(tool("qemu-img", "map", "--output=json", path).stdout):
        if not e["present"]:
            continue
        kind = "zero" if e["zero"] else "data" if "offset" in e else "compressed"
        want[e["start"]] = (kind, e.get("offset"))
    assert got == want


def test_version_2_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "v2.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", path, "1M")
    before = path.read_bytes()
    rc, out = dump(capsys, path, "dump-header")
    # qcow2.txt: a v2 header is 72 bytes; the v3 fields show their implied values.
    assert rc == 0 and out.endswith("refcount_order            4\n"
                                    "header_length             72\n\n")
    assert dump(capsys, path, "set-feature-bit", "compatible", "0") == (
        1, "'compatible_features' is not a field of a version 2 header\n")
    assert path.read_bytes() == before
    assert dump(capsys, path, "set-header", "nb_snapshots", "0")[0] == 0
    assert path.read_bytes() == before  # rewriting unchanged values changes nothing
    assert check(path).returncode == 0
