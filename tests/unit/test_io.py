"""The request path BlockBackend -> raw -> file: refused requests and a model-checked data path.

Every refused request must raise a typed error and leave the file's bytes as they were; every
accepted one must land in the file exactly as a plain bytearray model predicts, and the
BlockBackend's BlockDeviceStats must count each request once (qapi BlockDeviceStats).
"""
from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qblock
from qblock.block import io
from qblock.block.backend import BlockBackend
from qblock.block.node import registry
from qblock.block.open import open_node
from qblock.block.perm import PERM_ALL, Perm
from qblock.errors import InvalidArgument, OutOfBounds, ReadOnlyError

SIZE = 128 * 1024
ALIGN = 512


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pattern(length: int, seed: int) -> bytes:
    """Bytes that differ from their neighbours, so a misplaced copy is detected."""
    return ((np.arange(length, dtype=np.uint32) * 7 + seed) % 251 + 1).astype(np.uint8).tobytes()


@pytest.fixture
def image(make_image: Any) -> Path:
    return make_image(SIZE, data=pattern(SIZE, 3))


# -- refused requests ------------------------------------------------------------------------
@pytest.mark.parametrize(("op", "offset", "length", "counter"), [
    ("write", SIZE - 100, 200, "invalid_wr_operations"),
    ("write", SIZE, 1, "invalid_wr_operations"),
    ("write", SIZE + 4096, 512, "invalid_wr_operations"),
    ("write", -1, 10, "invalid_wr_operations"),
    ("write_zeroes", SIZE - 512, 1024, "invalid_wr_operations"),
    ("write_zeroes", 0, -512, "invalid_wr_operations"),
    ("write_zeroes", -512, 512, "invalid_wr_operations"),
    ("discard", SIZE - 1, 2, "invalid_unmap_operations"),
    ("discard", 4096, -1, "invalid_unmap_operations"),
    ("read", SIZE - 1, 2, "invalid_rd_operations"),
    ("read", -1, 1, "invalid_rd_operations"),
    ("read", 0, -1, "invalid_rd_operations"),
])
def test_out_of_bounds_requests_are_refused(image: Path, op: str, offset: int, length: int,
                                            counter: str) -> None:
    before = digest(image)
    with qblock.open(image, driver="raw") as disk:
        with pytest.raises(OutOfBounds):
            if op == "write":
                disk.write(offset, pattern(length, 9))
            elif op == "write_zeroes":
                disk.write_zeroes(offset, length)
            elif op == "discard":
                disk.discard(offset, length)
            else:
                disk.read(offset, length)
        stats = disk.backend.stats.to_qmp(disk.node.wr_highest_offset)
        assert stats[counter] == 1
        assert sum(v for k, v in stats.items() if k.startswith("invalid_")) == 1
        assert stats["wr_operations"] == stats["rd_operations"] == stats["unmap_operations"] == 0
        assert stats["wr_highest_offset"] == 0
    assert digest(image) == before


@pytest.mark.parametrize("call", [
    lambda n: io.node_pwritev(n, -1, memoryview(b"x")),
    lambda n: io.node_pwrite_zeroes(n, 0, -1),
    lambda n: io.node_pwrite_zeroes(n, -4096, 4096),
    lambda n: io.node_pdiscard(n, -1, 4096),
    lambda n: io.node_pdiscard(n, 0, -1),
    lambda n: io.node_preadv(n, -1, memoryview(bytearray(1))),
    lambda n: io.node_pwritev(n, (1 << 63) - 2, memoryview(b"xyz")),
])
def test_negative_and_overflowing_node_requests(image: Path, call: Any) -> None:
    """block/io.c bdrv_check_request: the generic layer refuses them before any driver."""
    before = digest(image)
    node = qblock.run(open_node({"driver": "raw", "node-name": "r",
                                 "file": {"driver": "file", "filename": str(image)}}))
    blk = BlockBackend(node, Perm.CONSISTENT_READ | Perm.WRITE, PERM_ALL)
    with pytest.raises(InvalidArgument):
        qblock.run(call(node))
    qblock.run(blk.close())
    assert digest(image) == before


def test_write_requests_on_a_read_only_image(image: Path) -> None:
    before = digest(image)
    with qblock.open(image, driver="raw", read_only=True) as disk:
        assert disk.node.read_only and disk.node.file.node.read_only
        with pytest.raises(ReadOnlyError):
            disk.write(0, b"\0" * 512)
        with pytest.raises(ReadOnlyError):
            disk.write_zeroes(0, 4096)
        with pytest.raises(ReadOnlyError):
            disk.discard(0, 4096)
        with pytest.raises(ReadOnlyError):
            disk.truncate(SIZE * 2)
        assert disk.read(0, 512) == pattern(SIZE, 3)[:512]
        stats = disk.backend.stats.to_qmp(disk.node.wr_highest_offset)
        assert (stats["failed_wr_operations"], stats["failed_unmap_operations"]) == (2, 1)
        assert stats["wr_bytes"] == 0 and stats["wr_highest_offset"] == 0
    assert digest(image) == before
    assert image.stat().st_size == SIZE


def test_backend_cannot_take_write_on_read_only_node(image: Path) -> None:
    node = qblock.run(open_node({"driver": "raw", "node-name": "r", "read-only": True,
                                 "file": {"driver": "file", "filename": str(image)}}))
    with pytest.raises(ReadOnlyError, match="Block node is read-only"):
        BlockBackend(node, Perm.CONSISTENT_READ | Perm.WRITE, PERM_ALL)
    assert node.parents == []


def _file_opts(path: Path, **extra: Any) -> dict[str, Any]:
    return {"driver": "file", "filename": str(path), **extra}


@pytest.mark.parametrize(("build", "message"), [
    (lambda p: {"driver": "nosuch", "node-name": "x"}, "nosuch"),
    (lambda p: {"node-name": "x"}, "Parameter 'driver' is missing"),
    (lambda p: {**_file_opts(p), "node-name": "x", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    (lambda p: {"driver": "raw", "node-name": "x", "file": _file_opts(p, bogus=1)},
     "Parameter 'bogus' is unexpected"),
    (lambda p: {"driver": "file", "node-name": "x"}, "Parameter 'filename' is missing"),
    (lambda p: {"driver": "raw", "node-name": "x"}, "Parameter 'file' is missing"),
    (lambda p: {**_file_opts(p), "node-name": "0x"}, "Invalid node-name: '0x'"),
    (lambda p: {**_file_opts(p), "node-name": "x", "cache": {"bogus": True}},
     "Parameter 'cache.bogus' is unexpected"),
    (lambda p: {**_file_opts(p), "node-name": "x", "aio": "fast"},
     "Parameter 'aio' does not accept value 'fast'"),
    (lambda p: {"driver": "raw", "node-name": "x", "file": _file_opts(p), "offset": SIZE + 1},
     "has to be smaller or equal to the actual size of the containing file"),
], ids=["unknown-driver", "no-driver", "unknown-key", "unknown-child-key", "no-filename",
        "no-file", "bad-node-name", "unknown-cache-key", "bad-aio", "raw-offset-past-end"])
def test_bad_options_are_refused_and_leave_nothing_open(image: Path, build: Any,
                                                        message: str) -> None:
    before, nodes = digest(image), dict(registry.nodes)
    with pytest.raises(InvalidArgument, match=message):
        qblock.run(open_node(build(image)))
    assert registry.nodes == nodes
    assert digest(image) == before
    with qblock.open(image, driver="raw") as disk:  # no lock was left behind
        assert disk.size == SIZE


def test_duplicate_node_name_keeps_the_first(image: Path) -> None:
    first = qblock.run(open_node({**_file_opts(image), "node-name": "f"}))
    with pytest.raises(InvalidArgument, match="Duplicate nodes with node-name='f'"):
        qblock.run(open_node({"driver": "null-co", "node-name": "f"}))
    assert registry.find("f") is first and not first.closed


# -- model-checked data path -----------------------------------------------------------------
def _range(max_len: int = 20000) -> st.SearchStrategy[tuple[int, int]]:
    """(offset, length) pairs, mostly inside the device, sometimes reaching past its end."""
    return st.tuples(st.integers(0, SIZE + 1024), st.integers(1, max_len))


OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), _range(), st.integers(0, 250)),
    st.tuples(st.just("zero"), _range(), st.booleans()),
    st.tuples(st.just("discard"), _range(), st.just(None)),
    st.tuples(st.just("read"), _range(), st.just(None)),
    st.tuples(st.just("flush"), st.just((0, 0)), st.just(None)),
), min_size=1, max_size=12)


def _odirect_reason(directory: Path) -> str | None:
    """None if ``directory``'s filesystem accepts an aligned O_DIRECT write, else why not."""
    path = directory / "odirect-probe"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as e:
        return f"O_DIRECT open refused by the filesystem of {directory}: {e.strerror}"
    try:
        with mmap.mmap(-1, 4096) as buf:
            os.pwritev(fd, [buf], 0)
    except OSError as e:
        return f"O_DIRECT write refused by the filesystem of {directory}: {e.strerror}"
    finally:
        os.close(fd)
        path.unlink()
    return None


def run_model(path: Path, ops: list[tuple[str, tuple[int, int], Any]], direct: bool) -> None:
    path.write_bytes(b"")
    os.truncate(path, SIZE)
    model = bytearray(SIZE)
    expect = dict.fromkeys(["rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations",
                            "wr_operations", "unmap_operations", "flush_operations",
                            "invalid_rd_operations", "invalid_wr_operations",
                            "invalid_unmap_operations", "invalid_flush_operations"], 0)
    highest = 0
    align = ALIGN if direct else 1
    with qblock.open(path, driver="raw", cache_direct=direct) as disk:
        assert disk.node.file.node.request_alignment == align
        for kind, (offset, length), arg in ops:
            inside = offset + length <= SIZE
            family = {"write": "wr", "zero": "wr", "discard": "unmap", "read": "rd"}.get(kind)
            if kind == "flush":
                disk.flush()
                expect["flush_operations"] += 1
                continue
            if not inside:
                with pytest.raises(OutOfBounds):
                    if kind == "write":
                        disk.write(offset, pattern(length, arg))
                    elif kind == "zero":
                        disk.write_zeroes(offset, length, may_unmap=arg)
                    elif kind == "discard":
                        disk.discard(offset, length)
                    else:
                        disk.read(offset, length)
                expect[f"invalid_{family}_operations"] += 1
                continue
            expect[f"{family}_operations"] += 1
            expect[f"{family}_bytes"] += length
            if kind == "write":
                data = pattern(length, arg)
                disk.write(offset, data)
                model[offset:offset + length] = data
                highest = max(highest, offset + length)
            elif kind == "zero":
                disk.write_zeroes(offset, length, may_unmap=arg)
                model[offset:offset + length] = bytes(length)
                highest = max(highest, offset + length)
            elif kind == "discard":
                # file-posix punches a hole (reads as zeroes); the generic layer leaves the
                # unaligned head and tail alone (block/io.c bdrv_co_pdiscard)
                disk.discard(offset, length)
                start = -(-offset // align) * align
                end = (offset + length) // align * align
                if end > start:
                    model[start:end] = bytes(end - start)
            else:
                assert disk.read(offset, length) == model[offset:offset + length]
        assert disk.read(0, SIZE) == model
        expect["rd_operations"] += 1
        expect["rd_bytes"] += SIZE
        stats = disk.backend.stats.to_qmp(disk.node.wr_highest_offset)
        assert {k: stats[k] for k in expect} == expect
        assert stats["failed_rd_operations"] == stats["failed_wr_operations"] == 0
        assert stats["wr_highest_offset"] == highest
        # the file node sees the requests padded to its alignment (block/io.c bdrv_pad_request)
        assert disk.node.file.node.wr_highest_offset == -(-highest // align) * align
    assert path.read_bytes() == model
    assert path.stat().st_size == SIZE


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_data_path_matches_model(tmp_path_factory: pytest.TempPathFactory,
                                 ops: list[tuple[str, tuple[int, int], Any]]) -> None:
    run_model(tmp_path_factory.getbasetemp() / "model.raw", ops, direct=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_data_path_matches_model_o_direct(tmp_path_factory: pytest.TempPathFactory,
                                          ops: list[tuple[str, tuple[int, int], Any]]) -> None:
    base = tmp_path_factory.getbasetemp()
    reason = _odirect_reason(base)
    if reason:
        pytest.skip(reason)
    run_model(base / "model-direct.raw", ops, direct=True)
