"""Damaged qcow2 images (issue 3, acceptance item 4).

Each case takes a healthy image made by qemu-img and qemu-io and breaks one thing.  qblock opens
it read-only and read-write in a subprocess (address space capped at 2 GiB, wall clock capped)
and reads every cluster; images whose damage makes writes dangerous also get a write probe.
Accepted outcomes: success, a typed QBlockError, or the image marked corrupt — never another
exception type, a hang, a huge allocation, or a change to the file beyond the corrupt bit.
Where qemu-io refuses to open the image, qblock must refuse too, with QEMU's message; where
qemu-io reports corruption on a read, qblock's read error carries the same message.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qemu_tools import (
    create, qemu_io, qemu_io_corruption_message, qemu_io_open_error, requires_qemu,
)

CLUSTER = 4096
SIZE = 8 * 1024 * 1024
CORRUPT_BIT = 1 << 1                # qcow2.txt "incompatible_features" bit 1
MEMORY_LIMIT = 2 * 1024 ** 3
TIMEOUT = 60

pytestmark = [pytest.mark.interop, requires_qemu]

# qcow2.txt "Header": (name, offset, struct format) of the fields the cases touch.
FIELDS = {
    "magic": (0, ">I"), "version": (4, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
    "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"), "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"), "incompatible_features": (72, ">Q"),
    "refcount_order": (96, ">I"), "header_length": (100, ">I"),
}


class Image:
    """A qcow2 file's bytes with typed access to header fields and tables."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)

    def __getitem__(self, field: str) -> int:
        offset, fmt = FIELDS[field]
        return struct.unpack_from(fmt, self.data, offset)[0]

    def __setitem__(self, field: str, value: int) -> None:
        offset, fmt = FIELDS[field]
        struct.pack_into(fmt, self.data, offset, value)

    def u64(self, offset: int) -> int:
        return struct.unpack_from(">Q", self.data, offset)[0]

    def set_u64(self, offset: int, value: int) -> None:
        struct.pack_into(">Q", self.data, offset, value)

    def l2_entry_offset(self, guest_offset: int) -> int:
        """File offset of the L2 entry mapping ``guest_offset`` (qcow2.txt "Cluster mapping")."""
        l2_entries = CLUSTER // 8
        index = guest_offset // CLUSTER
        l2_table = self.u64(self["l1_table_offset"] + 8 * (index // l2_entries)) \
            & 0x00FFFFFFFFFFFE00
        assert l2_table, "test image lacks an L2 table there"
        return l2_table + 8 * (index % l2_entries)


# Guest offsets the healthy image maps: data at DATA, compressed data at COMPRESSED, nothing at
# UNALLOCATED (the same L2 table as DATA, so an allocating write there touches only refcounts).
DATA, COMPRESSED, UNALLOCATED = 0, 6 * 1024 * 1024, 128 * 1024
COPIED = 1 << 63
COMPRESSED_FLAG = 1 << 62


def _set(field: str, value: int) -> Callable[[Image], None]:
    def damage(img: Image) -> None:
        img[field] = value
    return damage


def _l2_entry(guest: int, value: int) -> Callable[[Image], None]:
    def damage(img: Image) -> None:
        img.set_u64(img.l2_entry_offset(guest), value)
    return damage


def _l1_entry(value: int) -> Callable[[Image], None]:
    def damage(img: Image) -> None:
        img.set_u64(img["l1_table_offset"], value)
    return damage


def _fields(**values: int) -> Callable[[Image], None]:
    def damage(img: Image) -> None:
        for field, value in values.items():
            img[field] = value
    return damage


def _backing_offset_past_cluster(img: Image) -> None:
    struct.pack_into(">QI", img.data, 8, 8000, 100)    # backing_file_offset, backing_file_size


def _reftable_entry(value: int) -> Callable[[Image], None]:
    def damage(img: Image) -> None:
        img.set_u64(img["refcount_table_offset"], value)
    return damage


def _overlap_l1_reftable(img: Image) -> None:
    img["l1_table_offset"] = img["refcount_table_offset"]


def _unknown_incompat(img: Image) -> None:
    img["incompatible_features"] = img["incompatible_features"] | (1 << 10)


def _truncate(length: Callable[[Image], int]) -> Callable[[Image], None]:
    def damage(img: Image) -> None:
        del img.data[length(img):]
    return damage


def _compressed_into_header() -> int:
    # qcow2.txt "Compressed Clusters Descriptor": x = 70 - cluster_bits; host byte offset 104
    # (inside the header), one additional sector.
    x = 70 - 12
    return COMPRESSED_FLAG | (1 << x) | 104


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Image], None]
    probe: int | None = None            # guest offset of a read-write write probe
    probe_must_fail: bool = True        # QEMU refuses this write (overlap or corruption check)
    driver: str | None = None           # force the format (a bad magic probes as raw)


CASES = [
    Case("bad-magic", _set("magic", 0x514649FC), driver="qcow2"),
    Case("bad-version", _set("version", 4)),
    Case("version-1", _set("version", 1)),
    Case("cluster-bits-8", _set("cluster_bits", 8)),
    Case("cluster-bits-63", _set("cluster_bits", 63)),
    Case("huge-l1-size", _set("l1_size", 0x7FFFFFFF)),
    Case("l1-size-too-small", _set("l1_size", 1)),
    Case("huge-refcount-table", _set("refcount_table_clusters", 0x7FFFFFFF)),
    Case("huge-virtual-size", _set("size", 1 << 62)),
    Case("l1-offset-unaligned", _set("l1_table_offset", 0x3004)),
    Case("l2-entry-past-eof", _l2_entry(DATA, COPIED | (1 << 40))),
    Case("l2-entry-into-reftable", _l2_entry(DATA, COPIED | CLUSTER), probe=DATA),
    Case("l2-entry-into-l1", _l2_entry(DATA, COPIED | 3 * CLUSTER), probe=DATA),
    Case("l2-entry-unaligned", _l2_entry(DATA, COPIED | 0x5200), probe=DATA),
    # QEMU overwrites this one (allocating a fresh cluster), so the probe may succeed.
    Case("l2-compressed-into-header", _l2_entry(COMPRESSED, _compressed_into_header()),
         probe=COMPRESSED, probe_must_fail=False),
    Case("reftable-entry-into-header", _reftable_entry(0x200), probe=UNALLOCATED),
    Case("reftable-entry-zero", _reftable_entry(0), probe=UNALLOCATED),
    Case("overlapping-l1-and-reftable", _overlap_l1_reftable, probe=UNALLOCATED),
    Case("l1-entry-unaligned", _l1_entry(COPIED | 0x4200), probe=DATA),
    Case("l1-entry-into-header", _l1_entry(COPIED | 0x200), probe=DATA),
    Case("l1-entry-past-eof", _l1_entry(COPIED | (1 << 40))),
    Case("compressed-past-eof", _l2_entry(COMPRESSED, COMPRESSED_FLAG | (1 << 58) | (1 << 40))),
    Case("refcount-order-7", _set("refcount_order", 7)),
    Case("refcount-table-offset-unaligned", _set("refcount_table_offset", 0x1100)),
    Case("header-length-past-cluster", _set("header_length", 0x10000)),
    Case("huge-snapshot-table", _set("nb_snapshots", 0x7FFFFFFF)),
    Case("snapshot-table-unaligned", _fields(nb_snapshots=1, snapshots_offset=0x1234)),
    Case("backing-offset-past-cluster", _backing_offset_past_cluster),
    Case("unknown-incompatible-feature", _unknown_incompat),
    Case("truncated-header", _truncate(lambda img: 50)),
    Case("truncated-l1", _truncate(lambda img: img["l1_table_offset"] + 8)),
]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("healthy") / "healthy.qcow2"
    create(path, SIZE, cluster_size=CLUSTER)
    qemu_io(path, ["write -q -P 0x11 0 64k", "write -q -P 0x22 3M 8k",
                   f"write -q -c -P 0x33 {COMPRESSED} 8k"])
    return path.read_bytes()


# The probe runs in a child process so a hang, a crash or a runaway allocation is contained.
PROBE = r"""
import json, resource, sys, traceback
limit = int(sys.argv[5])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import qblock
from qblock.errors import QBlockError

path, mode, driver, probe, cluster = sys.argv[1:5] + [int(sys.argv[6])]
report = {"open": None, "read_errors": 0, "first_read_error": None, "crashes": [], "probe": None}

def outcome(fn):
    try:
        return None, fn()
    except QBlockError as e:
        return [type(e).__name__, str(e)], None
    except BaseException as e:
        err = ["CRASH " + type(e).__name__, traceback.format_exc()]
        report["crashes"].append(err)
        return err, None

report["open"], disk = outcome(lambda: qblock.open(path, driver=driver or None,
                                                   read_only=mode == "ro"))
if disk is not None:
    size = disk.size
    for off in range(0, size, cluster):
        err, _ = outcome(lambda: disk.read(off, min(cluster, size - off)))
        if err:
            report["read_errors"] += 1
            report["first_read_error"] = report["first_read_error"] or err
    if probe:
        err, _ = outcome(lambda: disk.write(int(probe), b"\x5a" * cluster))
        report["probe"] = err or "written"
    outcome(disk.close)
print(json.dumps(report))
"""


def run_probe(path: Path, case: Case, mode: str) -> dict[str, Any]:
    """Open ``path`` in ``mode`` ("ro" or "rw") in a child process; read every cluster."""
    probe = "" if case.probe is None or mode == "ro" else str(case.probe)
    args = [sys.executable, "-c", PROBE, str(path), mode, case.driver or "", probe,
            str(MEMORY_LIMIT), str(CLUSTER)]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case.name} {mode}: qblock hung for more than {TIMEOUT} s")
    assert proc.returncode == 0 and proc.stdout, \
        f"{case.name} {mode}: probe process died ({proc.returncode}): {proc.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    assert not report["crashes"], \
        f"{case.name} {mode}: untyped exception: {report['crashes'][0][1]}"
    return report


def assert_only_corrupt_bit_changed(before: bytes, after: bytes, *, may_grow: bool) -> None:
    """Bytes of ``before`` survive in ``after`` except the corrupt bit; growth only if allowed."""
    assert len(after) == len(before) or (may_grow and len(after) > len(before)), \
        f"file length {len(before)} -> {len(after)}"
    after = after[:len(before)]
    if after == before:
        return
    assert after[:72] == before[:72] and after[80:] == before[80:], \
        f"bytes changed from offset {next(i for i in range(len(before)) if after[i] != before[i])}"
    old, new = (struct.unpack_from(">Q", b, 72)[0] for b in (before, after))
    assert new & ~CORRUPT_BIT == old & ~CORRUPT_BIT, f"features {old:#x} -> {new:#x}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_image(tmp_path: Path, healthy: bytes, case: Case) -> None:
    img = Image(healthy)
    case.damage(img)
    path = tmp_path / "bad.qcow2"
    path.write_bytes(img.data)
    damaged = bytes(img.data)
    qemu_error = qemu_io_open_error(path, fmt="qcow2")
    qemu_corruption = None if qemu_error else qemu_io_corruption_message(path, SIZE)

    reports = {"ro": run_probe(path, case, "ro")}
    assert path.read_bytes() == damaged, "a read-only open changed the file"

    reports["rw"] = rw = run_probe(path, case, "rw")
    after = path.read_bytes()
    if rw["probe"] == "written":
        assert not case.probe_must_fail, "qblock wrote where QEMU refuses to (metadata at risk)"
        assert_only_corrupt_bit_changed(damaged[:CLUSTER], after[:CLUSTER], may_grow=False)
    else:
        assert_only_corrupt_bit_changed(damaged, after, may_grow=case.probe is not None)

    if qemu_error is not None:
        for mode, report in reports.items():
            assert report["open"], f"{mode}: qblock opened an image QEMU refuses: {qemu_error}"
            assert qemu_error in report["open"][1], \
                f"{mode}: qblock says {report['open'][1]!r}, QEMU says {qemu_error!r}"
    if qemu_corruption is not None:
        first = reports["ro"]["first_read_error"]
        assert first, f"QEMU finds corruption on read ({qemu_corruption!r}), qblock reads fine"
        assert qemu_corruption in first[1], \
            f"read error: qblock says {first[1]!r}, QEMU says {qemu_corruption!r}"
