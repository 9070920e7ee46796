"""qcow2 header: parse images made by qemu-img, pack them back byte for byte, QEMU's errors."""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from qblock.drivers.qcow2 import header as hdr
from qblock.drivers.qcow2.header import HeaderExtension, Qcow2Header
from qblock.errors import QBlockError

QEMU_IMG = shutil.which("qemu-img")
requires_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")


def _qemu_img(*args: str) -> None:
    subprocess.run([QEMU_IMG or "qemu-img", *args], check=True, capture_output=True)


def _cluster0(path: Path) -> tuple[bytes, Qcow2Header]:
    data = path.read_bytes()
    h = Qcow2Header.parse(data)
    return data[:h.cluster_size], h


@requires_qemu
@pytest.mark.parametrize("opts", [
    "",
    "compat=0.10",
    "cluster_size=4096,compression_type=zstd",
    "cluster_size=512,refcount_bits=1",
    "extended_l2=on,lazy_refcounts=on,refcount_bits=64",
    "cluster_size=2M",
])
def test_pack_reproduces_qemu_header(tmp_path: Path, opts: str) -> None:
    path = tmp_path / "a.qcow2"
    _qemu_img("create", "-f", "qcow2", *(["-o", opts] if opts else []), str(path), "64M")
    raw, h = _cluster0(path)
    assert h.pack() == raw
    if "compat=0.10" in opts:
        assert h.version == 2 and h.header_length == 72 and h.refcount_order == 4
    if "zstd" in opts:
        assert h.compression_name == "zstd" and h.incompatible_features & hdr.INCOMPAT_COMPRESSION
    if "extended_l2" in opts:
        assert h.extended_l2 and h.l2_entries == 65536 // 16 and h.subcluster_size == 2048
        assert h.lazy_refcounts and h.refcount_bits == 64


@requires_qemu
def test_backing_and_bitmaps_round_trip(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    _qemu_img("create", "-f", "qcow2", str(base), "1M")
    _qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    _qemu_img("bitmap", "--add", str(top), "b0")
    raw, h = _cluster0(top)
    assert h.backing_file == "base.qcow2" and h.backing_format == "qcow2"
    bm = h.bitmaps
    assert bm is not None and bm.nb_bitmaps == 1
    assert h.autoclear_features & hdr.AUTOCLEAR_BITMAPS
    assert h.feature_table == list(hdr.QEMU_FEATURES)
    assert h.pack() == raw


@requires_qemu
def test_unknown_extension_and_header_fields_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    _qemu_img("create", "-f", "qcow2", str(path), "1M")
    raw, h = _cluster0(path)
    h.extensions.append(HeaderExtension(0x12345678, b"hello"))
    h.unknown_header_fields = b"\x01" * 8
    h.backing_file = "b.raw"
    packed = h.pack()
    again = Qcow2Header.parse(packed)
    assert again.header_length == 120
    assert again.unknown_header_fields == b"\x01" * 8
    assert again.extensions == [HeaderExtension(0x12345678, b"hello")]
    assert again.backing_file == "b.raw"
    # QEMU (qemu-img check/info) accepts what we wrote and sees the backing name.
    path.write_bytes(packed + raw[len(packed):] + path.read_bytes()[len(raw):])
    info = subprocess.run([QEMU_IMG or "qemu-img", "info", "--output=json", "-U", str(path)],
                          capture_output=True, text=True)
    assert '"backing-filename": "b.raw"' in info.stdout


def test_bitmaps_ext_without_autoclear_bit_is_dropped() -> None:
    h = Qcow2Header(size=1 << 20, l1_size=1, l1_table_offset=3 << 16,
                    refcount_table_offset=1 << 16, refcount_table_clusters=1,
                    autoclear_features=hdr.AUTOCLEAR_BITMAPS)
    h.bitmaps = hdr.BitmapsExt(1, 32, 5 << 16)
    raw = bytearray(h.pack())
    struct.pack_into(">Q", raw, 88, 0)
    parsed = Qcow2Header.parse(bytes(raw))
    assert parsed.bitmaps is None
    assert "a program lacking bitmap support" in parsed.warnings[0]


def _valid() -> bytearray:
    h = Qcow2Header(size=1 << 20, l1_size=1, l1_table_offset=3 << 16,
                    refcount_table_offset=1 << 16, refcount_table_clusters=1)
    return bytearray(h.pack())


@pytest.mark.parametrize("offset,fmt,value,message", [
    (0, ">I", 0x12345678, "Image is not in qcow2 format"),
    (4, ">I", 4, "Unsupported qcow2 version 4"),
    (20, ">I", 22, "Unsupported cluster size: 2^22"),
    (20, ">I", 8, "Unsupported cluster size: 2^8"),
    (100, ">I", 96, "qcow2 header too short"),
    (96, ">I", 7, "Reference count entry width too large; may not exceed 64 bits"),
    (36, ">I", 0x4000000, "Active L1 table too large"),
    (40, ">Q", 12345, "Active L1 table offset invalid"),
    (56, ">I", 0x100000, "Reference count table too large"),
    (56, ">I", 0, "Image does not contain a reference count table"),
    (36, ">I", 0, "L1 table is too small"),
    (72, ">Q", 1 << 40, "Unsupported qcow2 feature(s): Unknown incompatible feature: "
                        "10000000000"),
    (104, ">B", 1, "qcow2: Compression type incompatible feature bit must be set"),
    (104, ">B", 7, "qcow2: unknown compression type: 7"),
    (8, ">Q", 1 << 20, "Invalid backing file offset"),
])
def test_open_errors_match_qemu(offset: int, fmt: str, value: int, message: str) -> None:
    raw = _valid()
    struct.pack_into(fmt, raw, offset, value)
    with pytest.raises(QBlockError) as e:
        Qcow2Header.parse(bytes(raw))
    assert str(e.value) == message


def test_unknown_feature_named_from_feature_table() -> None:
    raw = _valid()
    # Rename QEMU's "dirty bit" entry to an unknown bit 9 named "future".
    pos = raw.index(b"dirty bit") - 2
    raw[pos:pos + 48] = struct.pack(">BB46s", 0, 9, b"future")
    struct.pack_into(">Q", raw, 72, (1 << 9) | (1 << 33))
    with pytest.raises(QBlockError) as e:
        Qcow2Header.parse(bytes(raw))
    assert str(e.value) == ("Unsupported qcow2 feature(s): future, "
                            "Unknown incompatible feature: 200000000")


def test_extension_too_large() -> None:
    raw = _valid()
    struct.pack_into(">II", raw, 112, 0x12345678, 1 << 20)
    with pytest.raises(QBlockError, match="Header extension too large"):
        Qcow2Header.parse(bytes(raw))


def test_header_that_does_not_fit_is_refused() -> None:
    h = Qcow2Header(cluster_bits=9, size=512, l1_size=1, l1_table_offset=1536,
                    refcount_table_offset=512, refcount_table_clusters=1)
    h.backing_file = "x" * 500
    with pytest.raises(QBlockError, match="No space left"):
        h.pack()


def test_geometry() -> None:
    h = Qcow2Header(cluster_bits=16, refcount_order=4)
    assert (h.cluster_size, h.refcount_bits, h.l2_entries, h.refcount_block_entries) == \
        (65536, 16, 8192, 32768)
    assert h.size_to_l1(1 << 30) == 2
    h.incompatible_features |= hdr.INCOMPAT_EXTL2
    assert (h.l2_entries, h.subcluster_size, h.size_to_l1(1 << 30)) == (4096, 2048, 4)
