"""The qcow2 checker on hand-built images: counts, leaks, corruptions and repairs."""
from __future__ import annotations

import io as _io
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from qblock import api
from qblock.block.backend import BlockBackend
from qblock.block.open import open_node
from qblock.block.perm import Perm
from qblock.drivers.qcow2.check import (FIX_ERRORS, FIX_LEAKS, CheckResult, check_image,
                                        decode_refcounts, encode_refcounts)
from qblock.drivers.qcow2.header import Qcow2Header

CS = 4096


@given(st.sampled_from([0, 1, 2, 3, 4, 5, 6]), st.data())
def test_refcount_encoding_round_trip(order: int, data: st.DataObject) -> None:
    bits = 1 << order
    counts = np.array(data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=64,
                                         max_size=64)), dtype=np.uint64)
    raw = encode_refcounts(counts, bits)
    assert len(raw) == 64 * bits // 8
    assert decode_refcounts(raw, bits).tolist() == counts.tolist()


def test_sub_byte_layout_is_lsb_first() -> None:
    # qcow2.txt "Refcount block entries": entry i at bit (i*bits)%8 of byte (i*bits)/8.
    assert decode_refcounts(bytes([0b00000110]), 2).tolist() == [2, 1, 0, 0]


def _build(path: Path) -> None:
    """4 KiB clusters: header, reftable, refblock, L1, L2, two contiguous data clusters,
    then three unused clusters."""
    h = Qcow2Header(cluster_bits=12, size=1 << 20, l1_size=1, l1_table_offset=3 * CS,
                    refcount_table_offset=CS, refcount_table_clusters=1)
    img = bytearray(10 * CS)
    img[:CS] = h.pack()
    struct.pack_into(">Q", img, CS, 2 * CS)
    for k in range(7):
        struct.pack_into(">H", img, 2 * CS + 2 * k, 1)
    copied = 1 << 63
    struct.pack_into(">Q", img, 3 * CS, copied | 4 * CS)
    struct.pack_into(">QQ", img, 4 * CS, copied | 5 * CS, copied | 6 * CS)
    img[5 * CS:7 * CS] = b"\x01" * (2 * CS)
    path.write_bytes(img)


def _check(path: Path, fix: int) -> tuple[CheckResult, str]:
    async def run() -> tuple[CheckResult, str]:
        node = await open_node({"driver": "file", "filename": str(path), "discard": "unmap"},
                               implicit=True)
        blk = BlockBackend(node, Perm.CONSISTENT_READ | Perm.WRITE)
        try:
            head = bytes(await blk.pread(0, CS))
            log = _io.StringIO()
            target = SimpleNamespace(file=blk.edge, header=Qcow2Header.parse(head, check=True))
            return await check_image(target, fix, log=log), log.getvalue()
        finally:
            await blk.close()
    return api.run(run())


def _set_refcount(path: Path, cluster: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(2 * CS + 2 * cluster)
        f.write(struct.pack(">H", value))


def test_clean_image_counts(tmp_path: Path) -> None:
    _build(tmp_path / "a.qcow2")
    res, log = _check(tmp_path / "a.qcow2", 0)
    assert log == ""
    assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0)
    assert (res.total_clusters, res.allocated_clusters, res.fragmented_clusters) == (256, 2, 0)
    assert res.image_end_offset == 7 * CS


def test_leak_found_and_repaired(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    _build(path)
    _set_refcount(path, 8, 1)
    res, log = _check(path, 0)
    assert (res.leaks, res.corruptions) == (1, 0)
    assert "Leaked cluster 8 refcount=1 reference=0" in log
    assert res.image_end_offset == 9 * CS
    res, _ = _check(path, FIX_LEAKS)
    assert (res.leaks_fixed, res.leaks) == (1, 0)
    assert _check(path, 0)[0].leaks == 0


def test_corruption_and_copied_flag(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    _build(path)
    _set_refcount(path, 6, 2)  # data cluster shared on paper: COPIED is now wrong
    _set_refcount(path, 5, 0)  # used cluster without refcount: needs a rebuild
    res, log = _check(path, 0)
    assert "ERROR cluster 5 refcount=0 reference=1" in log
    assert "ERROR OFLAG_COPIED data cluster" in log
    assert (res.leaks, res.corruptions) == (1, 3)  # refcount 0, and COPIED on 5 and 6
    res, log = _check(path, FIX_LEAKS | FIX_ERRORS)
    assert "Rebuilding refcount structure" in log
    assert res.corruptions == 0 and res.corruptions_fixed >= 1
    again, log = _check(path, 0)
    assert (again.corruptions, again.leaks, again.check_errors) == (0, 0, 0), log
    assert path.read_bytes()[5 * CS:7 * CS] == b"\x01" * (2 * CS)
