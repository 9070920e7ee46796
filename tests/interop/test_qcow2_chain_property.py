"""Property test: random requests on a 3-deep qcow2 backing chain (issue 3, acceptance item 2).

base <- mid <- top, each created by qblock with backing_file/backing_fmt, base and mid filled by
qemu-io.  Hypothesis draws writes, zero writes, discards and partial-cluster writes; each runs
through qblock on top and on a bytearray model, and the touched range plus one other range are
read back and compared after every step.  At the end qemu-img check finds top clean, qemu-img
compare says top equals the model, and the same operations replayed through qemu-io on a copy
of the initial chain give a top with identical guest content.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qblock
from qemu_tools import (
    Op, apply_model, apply_qblock, check, compare, qemu_io, qemu_io_commands, requires_qemu,
    slow_mode, to_raw,
)

BASE_SIZE = 768 * 1024            # shorter than the overlays: reads past it give zeroes
SIZE = 1024 * 1024 + 1536         # not a multiple of any cluster size: partial final cluster
BASE_CS, MID_CS = 65536, 4096

pytestmark = [pytest.mark.interop, pytest.mark.slow, requires_qemu]


def qblock_create(path: Path, size: int, **options: Any) -> None:
    from qblock.drivers.qcow2.create import create_image

    result = create_image(str(path), size, **options)
    if hasattr(result, "__await__"):
        qblock.run(result)


def make_chain(workdir: Path, top_cs: int, top_extended_l2: bool) -> None:
    """base (64k clusters) <- mid (4k) <- top, with data in base and mid written by qemu-io."""
    qblock_create(workdir / "base.qcow2", BASE_SIZE, cluster_size=BASE_CS)
    qemu_io(workdir / "base.qcow2", ["write -q -P 0x11 0 704k", "write -q -z 64k 64k",
                                      "write -q -P 0x12 300000 1000"])
    qblock_create(workdir / "mid.qcow2", SIZE, cluster_size=MID_CS,
                  backing_file="base.qcow2", backing_fmt="qcow2")
    qemu_io(workdir / "mid.qcow2", ["write -q -P 0x21 4k 12k", "write -q -P 0x22 600k 300k",
                                     "write -q -z 128k 8k", "discard -q 256k 64k",
                                     "write -q -P 0x23 1000k 25k"])
    qblock_create(workdir / "top.qcow2", SIZE, cluster_size=top_cs, extended_l2=top_extended_l2,
                  backing_file="mid.qcow2", backing_fmt="qcow2")


def _range(max_len: int) -> st.SearchStrategy[tuple[int, int]]:
    return st.integers(0, SIZE - 1).flatmap(
        lambda off: st.tuples(st.just(off), st.integers(1, min(max_len, SIZE - off))))


def _op(index: int) -> st.SearchStrategy[Op]:
    seed = 1000 + index
    partial = st.tuples(st.integers(0, SIZE // 4096 - 1), st.integers(0, 4095),
                        st.integers(1, 4096)).map(
        lambda t: Op("write", t[0] * 4096 + t[1], min(t[2], SIZE - t[0] * 4096 - t[1]),
                     seed=seed, compressible=False))
    write = _range(200_000).map(lambda r: Op("write", *r, seed=seed, compressible=False))
    zero = st.tuples(_range(200_000), st.booleans()).map(
        lambda t: Op("zero", *t[0], unmap=t[1]))
    discard = st.tuples(st.integers(0, SIZE // 512 - 1), st.integers(1, 400)).map(
        lambda t: Op("discard", t[0] * 512, min(t[1] * 512, SIZE - t[0] * 512)))
    return st.one_of(partial, write, zero, discard)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    top_cs = draw(st.sampled_from([512, 4096, 65536, 65536]))
    extended_l2 = top_cs >= 16384 and draw(st.booleans())
    n = draw(st.integers(1, 12))
    ops = [draw(_op(i)) for i in range(n)]
    probes = [draw(_range(100_000)) for _ in range(n)]
    return {"top_cs": top_cs, "extended_l2": extended_l2, "ops": ops, "probes": probes}


def _diff(a: bytes, b: bytes) -> int:
    return next(i for i in range(min(len(a), len(b))) if a[i] != b[i])


@settings(max_examples=200 if slow_mode() else 25, deadline=None, database=None,
          derandomize=not slow_mode(),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
def test_chain_matches_model_and_qemu_io(scenario: dict[str, Any]) -> None:
    top_cs, ops = scenario["top_cs"], scenario["ops"]
    with tempfile.TemporaryDirectory(prefix="qblock-chain-") as tmp:
        work = Path(tmp)
        qdir, iodir = work / "qblock", work / "qemu-io"
        qdir.mkdir()
        make_chain(qdir, top_cs, scenario["extended_l2"])
        shutil.copytree(qdir, iodir)
        model = bytearray(to_raw(qdir / "top.qcow2", work / "initial.raw"))
        assert len(model) == SIZE

        with qblock.open(qdir / "top.qcow2") as disk:
            for op, (poff, plen) in zip(ops, scenario["probes"]):
                apply_qblock(disk, op)
                apply_model(model, op, top_cs)
                for off, length in ((op.offset, op.length), (poff, plen)):
                    got = disk.read(off, length)
                    want = bytes(model[off:off + length])
                    assert got == want, (f"after {op}: read {off}+{length} differs at "
                                         f"{off + _diff(got, want)}")

        result = check(qdir / "top.qcow2")
        assert result.clean, f"qemu-img check top: {result}"
        for lower in ("mid.qcow2", "base.qcow2"):
            assert (qdir / lower).read_bytes() == (iodir / lower).read_bytes(), \
                f"qblock modified the backing file {lower}"
        (work / "model.raw").write_bytes(model)
        cmp = compare(qdir / "top.qcow2", work / "model.raw", fmt_b="raw")
        assert cmp.returncode == 0, f"qblock top vs model: {cmp.stdout}{cmp.stderr}"

        qemu_io(iodir / "top.qcow2", qemu_io_commands(ops, work))
        cmp = compare(qdir / "top.qcow2", iodir / "top.qcow2")
        assert cmp.returncode == 0, f"qblock top vs qemu-io top: {cmp.stdout}{cmp.stderr}"
