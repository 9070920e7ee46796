"""qcow2 option matrix against the real QEMU tools (issue 3, acceptance item 1).

For each combination of cluster_size, extended_l2, refcount_bits, compression_type and
lazy_refcounts:

* an image created and written by qblock (writes, partial-cluster writes, zero writes,
  discards, compressed writes) passes ``qemu-img check`` with no errors and no leaks, and
  ``qemu-img compare`` against a raw file holding the expected content says identical;
* an image created by qemu-img and written by qemu-io with the same operations reads back
  through qblock exactly as the model says (and as QEMU itself reads it).

CI runs a fixed slice of 12 combinations chosen to cover every pair of axis values the
slice can; ``QBLOCK_SLOW=1`` runs the whole matrix.
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest

import qblock
from qemu_tools import (
    Op, apply_model, apply_qblock, check, compare, create, info, qemu_io, qemu_io_commands,
    requires_qemu, slow_mode,
)

AXES: dict[str, list[Any]] = {
    "cluster_size": [512, 4096, 65536, 2 * 1024 * 1024],
    "extended_l2": [False, True],
    "refcount_bits": [1, 16, 64],
    "compression_type": ["zlib", "zstd"],
    "lazy_refcounts": [False, True],
}
CI_SLICE = 12
READ_CHUNK = 4 * 1024 * 1024


def _valid(combo: dict[str, Any]) -> bool:
    # qcow2.txt "Extended L2 Entries": subclusters (cluster_size / 32) must be >= 512 bytes;
    # QEMU requires cluster_size >= 16 KiB for extended_l2.
    return not (combo["extended_l2"] and combo["cluster_size"] < 16384)


ALL_COMBOS = [c for c in (dict(zip(AXES, values)) for values in itertools.product(*AXES.values()))
              if _valid(c)]


def _pairs(combo: dict[str, Any]) -> set[tuple[tuple[str, Any], tuple[str, Any]]]:
    items = sorted(combo.items())
    return {(a, b) for a, b in itertools.combinations(items, 2)}


def ci_slice(combos: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """A deterministic greedy pairwise cover: each pick covers the most unseen value pairs."""
    rng = random.Random(3)
    chosen: list[dict[str, Any]] = []
    covered: set[Any] = set()
    pool = list(combos)
    for _ in range(n):
        rng.shuffle(pool)
        best = max(pool, key=lambda c: len(_pairs(c) - covered))
        chosen.append(best)
        covered |= _pairs(best)
        pool.remove(best)
    return chosen


COMBOS = ALL_COMBOS if slow_mode() else ci_slice(ALL_COMBOS, CI_SLICE)


def combo_id(combo: dict[str, Any]) -> str:
    return (f"cs{combo['cluster_size']}-l2{'on' if combo['extended_l2'] else 'off'}"
            f"-rb{combo['refcount_bits']}-{combo['compression_type']}"
            f"-lazy{'on' if combo['lazy_refcounts'] else 'off'}")


def image_size(cs: int, extended_l2: bool) -> int:
    """At least 24 clusters and two L2 tables' worth, plus a partial final cluster."""
    l2_coverage = cs * (cs // (16 if extended_l2 else 8))
    base = max(24 * cs, 2 * l2_coverage) if l2_coverage <= 8 * 1024 * 1024 else 24 * cs
    return base + (cs // 2 // 512 * 512 if cs >= 1024 else 0)


def matrix_ops(cs: int, size: int, extended_l2: bool) -> list[Op]:
    """The fixed operation mix, in units of the cluster size ``cs``."""
    sc = max(cs // 32, 512) if extended_l2 else 512
    tail = size % cs
    last = size - (tail or cs)          # start of the final (possibly partial) cluster
    ops = [
        Op("write", 0, 3 * cs, seed=1, compressible=False),
        Op("write", cs + cs // 2 + 7, cs // 3 + 100, seed=2),             # partial, unaligned
        Op("write", 5 * cs + 100, 300, seed=3, compressible=False),       # COW in a new cluster
        Op("write", 7 * cs - 700, 1600, seed=4, compressible=False),      # straddles clusters
        Op("zero", cs, cs, unmap=True),                                   # over data, unmap
        Op("zero", 2 * cs + cs // 4, cs // 4),                            # partial zero
        Op("zero", 10 * cs, 2 * cs),                                      # over nothing
        Op("discard", 2 * cs, cs),
        Op("discard", 11 * cs, 2 * cs),
        Op("compress", 14 * cs, 2 * cs, seed=5),
        Op("compress", 16 * cs, cs, seed=6, compressible=False),          # falls back to plain
        Op("write", 14 * cs + cs // 4 + 3, cs // 4, seed=7),              # COW of compressed
        Op("zero", 15 * cs, cs, unmap=True),                              # zero a compressed one
        Op("compress", 18 * cs, 2 * cs, seed=8),
        Op("discard", 19 * cs, cs),                                       # discard compressed
        Op("write", 20 * cs + 333, 3 * cs, seed=9, compressible=False),
        Op("zero", 21 * cs, 2 * cs, unmap=True),
        Op("compress", last, size - last, seed=10),                       # final cluster
        Op("write", last - 100, 100 + min(size - last, 700), seed=11, compressible=False),
        Op("write", 0, cs, seed=12),                                      # overwrite data
        Op("zero", 5 * cs + 3 * sc, 2 * sc),                              # subcluster zero
        Op("write", 8 * cs + sc, sc, seed=13, compressible=False),        # one subcluster
    ]
    l2_coverage = cs * (cs // (16 if extended_l2 else 8))
    if l2_coverage + 2 * cs < last:
        ops.append(Op("write", l2_coverage - cs - 5, 2 * cs + 10, seed=14, compressible=False))
    return ops


def expected_content(size: int, ops: list[Op], cs: int) -> bytearray:
    model = bytearray(size)
    for op in ops:
        apply_model(model, op, cs)
    return model


def read_all(disk: Any, size: int) -> bytes:
    return b"".join(disk.read(off, min(READ_CHUNK, size - off))
                    for off in range(0, size, READ_CHUNK))


def first_difference(a: bytes, b: bytes) -> int | None:
    if a == b:
        return None
    if len(a) != len(b):
        return min(len(a), len(b))
    return next(i for i in range(len(a)) if a[i] != b[i])


def qblock_create(path: Path, size: int, combo: dict[str, Any]) -> None:
    from qblock.drivers.qcow2.create import create_image

    result = create_image(str(path), size, cluster_size=combo["cluster_size"], compat="1.1",
                          extended_l2=combo["extended_l2"],
                          compression_type=combo["compression_type"],
                          lazy_refcounts=combo["lazy_refcounts"],
                          refcount_bits=combo["refcount_bits"])
    if hasattr(result, "__await__"):
        qblock.run(result)


def assert_format_specific(path: Path, combo: dict[str, Any]) -> None:
    data = info(path)
    spec = data["format-specific"]["data"]
    assert data["cluster-size"] == combo["cluster_size"]
    assert spec["extended-l2"] == combo["extended_l2"]
    assert spec["refcount-bits"] == combo["refcount_bits"]
    assert spec["compression-type"] == combo["compression_type"]
    assert spec["lazy-refcounts"] == combo["lazy_refcounts"]
    assert spec["corrupt"] is False
    assert data.get("dirty-flag", False) is False, "image left dirty after a clean close"


pytestmark = [pytest.mark.interop, pytest.mark.slow, requires_qemu]


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_qblock_written_image_passes_qemu_check(tmp_path: Path, combo: dict[str, Any]) -> None:
    """qblock creates and writes; qemu-img check finds nothing and compare says identical."""
    cs = combo["cluster_size"]
    size = image_size(cs, combo["extended_l2"])
    ops = matrix_ops(cs, size, combo["extended_l2"])
    model = expected_content(size, ops, cs)
    img, raw = tmp_path / "img.qcow2", tmp_path / "expected.raw"
    raw.write_bytes(model)

    qblock_create(img, size, combo)
    with qblock.open(img) as disk:
        assert disk.size == size
        for op in ops:
            apply_qblock(disk, op)
        got = read_all(disk, size)
        assert got == model, f"qblock reads its own image wrong at {first_difference(got, model)}"

    result = check(img)
    assert result.clean, f"qemu-img check: {result}"
    assert result.report.get("compressed-clusters", 0) > 0, "no cluster was stored compressed"
    assert_format_specific(img, combo)
    cmp = compare(img, raw, fmt_b="raw", strict=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_qemu_written_image_reads_back_through_qblock(tmp_path: Path,
                                                      combo: dict[str, Any]) -> None:
    """qemu-img creates, qemu-io writes the same mix; qblock reads exactly the model."""
    cs = combo["cluster_size"]
    size = image_size(cs, combo["extended_l2"])
    ops = matrix_ops(cs, size, combo["extended_l2"])
    model = expected_content(size, ops, cs)
    img, raw = tmp_path / "img.qcow2", tmp_path / "expected.raw"
    raw.write_bytes(model)

    create(img, size, **combo)
    qemu_io(img, qemu_io_commands(ops, tmp_path))
    cmp = compare(img, raw, fmt_b="raw")
    assert cmp.returncode == 0, f"the model disagrees with QEMU: {cmp.stdout}"

    with qblock.open(img, read_only=True) as disk:
        assert disk.size == size
        got = read_all(disk, size)
    assert got == model, f"first difference at {first_difference(got, model)}"


def test_ci_slice_covers_every_value() -> None:
    """The CI slice exercises every value of every axis."""
    chosen = ci_slice(ALL_COMBOS, CI_SLICE)
    for axis, values in AXES.items():
        assert {c[axis] for c in chosen} == set(values), axis
