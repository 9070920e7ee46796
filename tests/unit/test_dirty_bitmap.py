"""DirtyBitmap against a model: a Python list of bools, one per granule."""
from __future__ import annotations

import hashlib
import struct
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qblock.block.dirty_bitmap import DirtyBitmap
from qblock.errors import InvalidArgument

GRANS = st.sampled_from([512, 1024, 4096, 65536])


class Model:
    def __init__(self, size: int, gran: int) -> None:
        self.size, self.gran = size, gran
        self.bits = [False] * (-(-size // gran))

    def apply(self, offset: int, length: int, value: bool) -> None:
        """Set: every granule touched.  Reset: only granules wholly inside (or the tail)."""
        end = min(offset + length, self.size)
        for k in range(len(self.bits)):
            lo, hi = k * self.gran, min((k + 1) * self.gran, self.size)
            if value and length > 0 and lo < end and offset < hi:
                self.bits[k] = True
            elif not value and offset <= lo and hi <= end:
                self.bits[k] = False

    def sha256(self) -> str:
        words = max(1, -(-len(self.bits) // 64))
        data = bytearray(words * 8)
        for k, b in enumerate(self.bits):
            if b:
                data[k // 8] |= 1 << (k % 8)
        return hashlib.sha256(bytes(data)).hexdigest()


ops = st.lists(st.tuples(st.sampled_from(["set", "reset", "many"]),
                         st.integers(0, 300_000), st.integers(0, 200_000)), max_size=25)


@settings(max_examples=150, deadline=None)
@given(size=st.integers(0, 262_144), gran=GRANS, seq=ops)
def test_matches_model(size: int, gran: int, seq: list[tuple[str, int, int]]) -> None:
    bm = DirtyBitmap("b", size, gran)
    model = Model(size, gran)
    for op, off, length in seq:
        if op == "set":
            bm.set_range(off, length)
        elif op == "reset":
            bm.reset_range(off, length)
        else:
            bm.set_ranges(np.array([off, off // 3, off // 7]), np.array([length, 700, 1]))
            model.apply(off // 3, 700, True)
            model.apply(off // 7, 1, True)
        model.apply(off, length, op != "reset")
    assert bm.bool_array().tolist() == model.bits
    assert bm.sha256() == model.sha256()
    expect_count = sum(min((k + 1) * gran, size) - k * gran for k, b in enumerate(model.bits) if b)
    assert bm.count() == expect_count
    assert sum(length for _, length in bm.extents()) == expect_count
    probe = seq[0][1] if seq else 0
    dirty = [k * gran for k, b in enumerate(model.bits) if b and (k + 1) * gran > probe]
    assert bm.next_dirty(probe) == (max(probe, dirty[0]) if dirty else -1)
    clean = [k * gran for k, b in enumerate(model.bits) if not b and (k + 1) * gran > probe]
    assert bm.next_clean(probe) == (max(probe, clean[0]) if clean else -1)
    ser = bm.serialize()
    assert len(ser) == -(-len(model.bits) // 8)
    other = DirtyBitmap("c", size, gran)
    other.deserialize(ser)
    assert other.sha256() == bm.sha256()


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 200_000), g1=GRANS, g2=GRANS,
       a=st.lists(st.tuples(st.integers(0, 200_000), st.integers(1, 50_000)), max_size=6),
       b=st.lists(st.tuples(st.integers(0, 200_000), st.integers(1, 50_000)), max_size=6))
def test_merge_across_granularities(size: int, g1: int, g2: int, a: list, b: list) -> None:
    target, src = DirtyBitmap("t", size, g1), DirtyBitmap("s", size, g2)
    model = Model(size, g1)
    for off, length in a:
        target.set_range(off, length)
        model.apply(off, length, True)
    for off, length in b:
        src.set_range(off, length)
    for off, length in src.extents():
        model.apply(off, length, True)
    target.merge(src)
    assert target.bool_array().tolist() == model.bits


def test_sha256_of_empty_bitmap_is_one_zero_word() -> None:
    assert DirtyBitmap("e", 0, 65536).sha256() == hashlib.sha256(bytes(8)).hexdigest()
    bm = DirtyBitmap("x", 65536 * 65, 65536)
    bm.set_range(64 * 65536, 1)
    assert bm.sha256() == hashlib.sha256(struct.pack("<QQ", 0, 1)).hexdigest()


def test_granularity_rules() -> None:
    for bad in (0, 256, 1000, 1 << 32):
        with pytest.raises(InvalidArgument):
            DirtyBitmap("b", 1 << 20, bad)
    with pytest.raises(InvalidArgument, match="different sizes"):
        DirtyBitmap("a", 1024, 512).merge(DirtyBitmap("b", 2048, 512))


def test_four_tib_million_ranges_is_fast() -> None:
    """4 TiB at 64 KiB (64 Mi bits): 1M scattered ranges, merge and sha256 in seconds; a
    slice of them also by single set_range calls must give the same bits."""
    size = 4 << 40
    rng = np.random.default_rng(1)
    offs = rng.integers(0, size, 1_000_000)
    lens = rng.integers(1, 1 << 20, 1_000_000)
    start = time.perf_counter()
    bm = DirtyBitmap("big", size, 65536)
    bm.set_ranges(offs, lens)
    other = DirtyBitmap("o", size, 65536)
    other.merge(bm)
    digest = other.sha256()
    assert time.perf_counter() - start < 10
    assert digest == bm.sha256() and bm.count() > 0
    batched, single = DirtyBitmap("a", size, 65536), DirtyBitmap("b", size, 65536)
    batched.set_ranges(offs[:50_000], lens[:50_000])
    for off, length in zip(offs[:50_000].tolist(), lens[:50_000].tolist()):
        single.set_range(off, length)
    assert single.sha256() == batched.sha256()


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 100_000), new=st.integers(0, 100_000), gran=GRANS,
       ranges=st.lists(st.tuples(st.integers(0, 100_000), st.integers(1, 30_000)), max_size=5))
def test_resize_keeps_bits_inside(size: int, new: int, gran: int, ranges: list) -> None:
    bm = DirtyBitmap("r", size, gran)
    model = Model(size, gran)
    for off, length in ranges:
        bm.set_range(off, length)
        model.apply(off, length, True)
    bm.resize(new)
    bits = model.bits[:-(-new // gran)]
    bits += [False] * (-(-new // gran) - len(bits))
    assert bm.bool_array().tolist() == bits
    resized = Model(new, gran)
    resized.bits = bits
    assert bm.sha256() == resized.sha256()
    bm.set_range(0, new)
    assert bm.count() == new
