"""qcow2 refcounts and write ordering: block encoding of every width, cache sizes, and that
every prefix of the image file's writes is an image qemu-img finds no corruption in."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import qblock
from qblock import trace
from qblock.drivers.qcow2.cache import cache_sizes
from qblock.drivers.qcow2.create import create_image
from qblock.drivers.qcow2.refcount import refblock_codec
from qblock.errors import InvalidArgument

QEMU_IMG = shutil.which("qemu-img")


def _reference_encode(values: list[int], bits: int) -> bytes:
    """qcow2.txt "Refcount block entries", bit by bit: big-endian >= 8 bits, else LSB-first."""
    if bits >= 8:
        return b"".join(v.to_bytes(bits // 8, "big") for v in values)
    out = bytearray(len(values) * bits // 8)
    for i, v in enumerate(values):
        out[i * bits // 8] |= v << (i * bits % 8)
    return bytes(out)


@given(st.integers(0, 6), st.data())
def test_refblock_codec_matches_the_spec(order: int, data: st.DataObject) -> None:
    bits = 1 << order
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=64, max_size=64))
    decode, encode = refblock_codec(bits)
    raw = _reference_encode(values, bits)
    table = decode(raw)
    assert [int(v) for v in table] == values
    assert encode(table) == raw


def test_cache_sizes_like_qemu() -> None:
    # 64 KiB clusters: the default L2 cache covers the whole disk up to 32 MiB of L2 tables.
    assert cache_sizes(65536, 8, 1 << 30, {}) == (2, 65536, 4)
    l2, entry, rc = cache_sizes(65536, 8, 1 << 40, {})
    assert (l2, entry, rc) == (32 * 1024 * 1024 // 4096, 4096, 4)
    assert cache_sizes(65536, 8, 1 << 40, {"l2-cache-entry-size": 65536})[:2] == (512, 65536)
    assert cache_sizes(65536, 8, 1 << 30, {"cache-size": 1 << 20}) == (2, 65536, 14)
    with pytest.raises(InvalidArgument, match="L2 cache entry size must be a power of two"):
        cache_sizes(65536, 8, 1 << 30, {"l2-cache-entry-size": 1000})
    with pytest.raises(InvalidArgument, match="may not be set at the same time"):
        cache_sizes(65536, 8, 1 << 30, {"cache-size": 1, "l2-cache-size": 1,
                                        "refcount-cache-size": 1})


def _workload(d: qblock.Disk) -> None:
    d.write(0, b"a" * 70000)
    d.write(300000, b"b" * 9000)
    d.flush()
    d.write(1000, b"c" * 3000)
    d.write_zeroes(0, 8192, may_unmap=True)
    d.discard(290816, 16384)
    d.write(600000, b"d" * 200000)
    d.write((1 << 20) - 4096, b"e" * 4096)


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")
@pytest.mark.parametrize("opts", [{"cluster_size": 4096},
                                  {"cluster_size": 512, "refcount_bits": 64},
                                  {"cluster_size": 16384, "extended_l2": True}])
def test_every_prefix_of_the_writes_is_consistent(tmp_path: Path, opts: dict[str, Any]) -> None:
    """A crash after any write to the image file leaves at most leaks, never a corruption.

    Before each write reaches the file, the file is copied: the copies are every state a
    crash could leave if writes reach the disk in the order they are issued.
    """
    path = tmp_path / "t.qcow2"
    create_image(str(path), 1 << 20, **opts)
    with qblock.open(str(path)) as d:
        d.write(200000, b"s" * 100000)
    subprocess.run([QEMU_IMG or "", "snapshot", "-c", "s1", str(path)], check=True)
    prefixes: list[Path] = []
    file_node: list[str] = []

    def copy_before_write(name: str, fields: dict[str, Any]) -> None:
        if file_node and fields.get("bs") == file_node[0]:
            copy = tmp_path / f"p{len(prefixes)}.qcow2"
            shutil.copyfile(path, copy)
            prefixes.append(copy)

    with trace.capture("bdrv_co_pwritev_part"):
        trace.add_sink(copy_before_write)
        try:
            with qblock.open(str(path)) as d:
                assert d.node.file is not None
                file_node.append(d.node.file.node.node_name)
                _workload(d)
        finally:
            trace.remove_sink(copy_before_write)
    assert len(prefixes) > 5
    for copy in [*prefixes, path]:
        res = subprocess.run([QEMU_IMG or "", "check", str(copy)], capture_output=True,
                             text=True)
        assert res.returncode in (0, 3), f"{copy.name}: {res.stdout}{res.stderr}"  # 3: leaks
        assert "ERROR" not in res.stdout and "corruption" not in res.stdout, res.stdout
