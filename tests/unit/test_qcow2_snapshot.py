"""qcow2 internal snapshots in-process: create / apply / delete keep every version's content and
leave refcounts and COPIED flags that qblock's checker (qcow2_check_refcounts) finds exact;
the table encoding; QEMU's refusals; the two QMP commands and the transaction action."""
from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import qblock
from qblock.block.node import close_node, registry
from qblock.block.open import open_node
from qblock.drivers.qcow2.check import check_image
from qblock.drivers.qcow2.create import create_image
from qblock.drivers.qcow2.snapshot import ICOUNT_NONE, SnapshotInfo, pack_table, qapi_info
from qblock.drivers.qcow2.snapshot_ops import (bdrv_snapshot_create, bdrv_snapshot_delete,
                                               bdrv_snapshot_goto, bdrv_snapshot_list)
from qblock.errors import QBlockError

from qmp_inprocess import Monitor

MiB = 1024 * 1024


def _check(path: Path) -> Any:
    """qblock's own qcow2 checker on the closed image file."""
    from qblock.cli.imginfo import read_header

    async def run() -> Any:
        node = await open_node({"driver": "file", "filename": str(path)}, read_only=True,
                               implicit=True)
        try:
            from qblock.block.backend import BlockBackend
            from qblock.block.perm import PERM_ALL, Perm

            blk = BlockBackend(node, Perm.CONSISTENT_READ, PERM_ALL)
            target = SimpleNamespace(file=blk.edge, header=await read_header(blk.edge))
            res = await check_image(target, 0)
            await blk.close()
            return res
        finally:
            if not node.closed:
                await close_node(node)
    return qblock.run(run())


def _assert_clean(path: Path) -> None:
    res = _check(path)
    assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0), res


def _pattern(i: int, length: int) -> bytes:
    return bytes([(i * 37 + 11) & 0xFF]) * length


@pytest.mark.parametrize("opts", [
    {"cluster_size": 512}, {}, {"cluster_size": 2 * MiB},
    {"refcount_bits": 64}, {"extended_l2": True},
])
def test_create_apply_delete_keep_every_version(tmp_path: Path, opts: dict[str, Any]) -> None:
    path = tmp_path / "img.qcow2"
    size = 4 * MiB
    create_image(str(path), size, **opts)
    versions: dict[str, bytes] = {}

    async def run() -> None:
        disk = await qblock.open_async(str(path))
        try:
            for i in range(4):
                await disk.write(i * 300 * 1024, _pattern(i, 200 * 1024))
                await disk.write(0, _pattern(i + 100, 4096))  # overwrite a shared cluster
                versions[f"s{i}"] = bytes(await disk.read(0, size))
                await bdrv_snapshot_create(disk.node, f"s{i}")
            await disk.write(64 * 1024, _pattern(9, 1 * MiB))
            for name in ("s1", "s3", "s0"):
                await bdrv_snapshot_goto(disk.node, name)
                assert bytes(await disk.read(0, size)) == versions[name]
            await disk.write(0, _pattern(50, 8192))  # the applied state is writable, COW'd
            assert [sn.name for sn in bdrv_snapshot_list(disk.node)] == ["s0", "s1", "s2", "s3"]
            assert [sn.id_str for sn in bdrv_snapshot_list(disk.node)] == ["1", "2", "3", "4"]
        finally:
            await disk.close()
    qblock.run(run())
    _assert_clean(path)

    async def again() -> None:
        disk = await qblock.open_async(str(path))
        try:
            await bdrv_snapshot_delete(disk.node, None, "s1")
            await bdrv_snapshot_delete(disk.node, "1", None)
            for name in ("s2", "s3"):
                await bdrv_snapshot_goto(disk.node, name)
                assert bytes(await disk.read(0, size)) == versions[name]
            await bdrv_snapshot_delete(disk.node, "3", "s2")
            await bdrv_snapshot_delete(disk.node, None, "s3")
            assert bdrv_snapshot_list(disk.node) == []
            assert bytes(await disk.read(0, size)) == versions["s3"]
        finally:
            await disk.close()
    qblock.run(again())
    _assert_clean(path)


def test_ids_follow_the_largest_numeric_id(tmp_path: Path) -> None:
    path = tmp_path / "img.qcow2"
    create_image(str(path), MiB)

    async def run() -> list[str]:
        disk = await qblock.open_async(str(path))
        try:
            for name in ("a", "b", "c"):
                await bdrv_snapshot_create(disk.node, name)
            await bdrv_snapshot_delete(disk.node, "3", None)
            await bdrv_snapshot_delete(disk.node, "1", None)
            await bdrv_snapshot_create(disk.node, "d")  # find_new_snapshot_id(): max + 1
            await bdrv_snapshot_create(disk.node, "b")  # names need not be unique here
            return [sn.id_str + sn.name for sn in bdrv_snapshot_list(disk.node)]
        finally:
            await disk.close()
    assert qblock.run(run()) == ["2b", "3d", "4b"]
    _assert_clean(path)


def test_table_encoding_round_trips_through_the_reader(tmp_path: Path) -> None:
    """pack_table() output, read back by read_snapshots(), after a real reopen."""
    path = tmp_path / "img.qcow2"
    create_image(str(path), MiB)

    async def run() -> tuple[SnapshotInfo, ...]:
        disk = await qblock.open_async(str(path))
        try:
            made = await bdrv_snapshot_create(disk.node, "x" * 300, vm_clock_nsec=12_345_678_901,
                                              icount=ICOUNT_NONE)
        finally:
            await disk.close()
        disk = await qblock.open_async(str(path), read_only=True)
        try:
            return made, *bdrv_snapshot_list(disk.node)
        finally:
            await disk.close()
    made, read = qblock.run(run())
    assert read == made
    assert read.name == "x" * 255  # sizeof(QEMUSnapshotInfo.name) - 1
    assert qapi_info(read)["vm-clock-sec"] == 12 and "icount" not in qapi_info(read)
    packed = pack_table([read])
    assert len(packed) == 40 + 24 + 1 + 255  # header, 24 bytes of extra data, id, name


def test_unknown_extra_data_is_kept() -> None:
    sn = SnapshotInfo(65536, 1, "1", "n", disk_size=MiB, extra_data_size=32,
                      unknown_extra=b"ABCDEFGH")
    packed = pack_table([sn, sn])
    assert packed[40 + 24:40 + 32] == b"ABCDEFGH"
    assert len(packed) == 40 + 32 + 2 + 6 + 40 + 32 + 2  # second entry 8-byte aligned


def test_refcount_overflow_with_one_bit_refcounts_changes_nothing(tmp_path: Path) -> None:
    """refcount_bits=1 cannot count a second reference: QEMU's -EINVAL; the image stays
    clean (QEMU leaks the L1 copy here, qblock frees it)."""
    path = tmp_path / "img.qcow2"
    create_image(str(path), MiB, refcount_bits=1)

    async def run() -> None:
        disk = await qblock.open_async(str(path))
        try:
            await disk.write(0, b"\1" * 65536)
            with pytest.raises(QBlockError) as exc:
                await bdrv_snapshot_create(disk.node, "s")
            assert exc.value.errno == errno.EINVAL
            assert bdrv_snapshot_list(disk.node) == []
            await disk.write(0, b"\2" * 512)
        finally:
            await disk.close()
    qblock.run(run())
    _assert_clean(path)


def test_refusals_like_qemu(tmp_path: Path) -> None:
    path = tmp_path / "img.qcow2"
    raw = tmp_path / "img.raw"
    create_image(str(path), MiB)
    raw.write_bytes(bytes(MiB))

    async def run() -> None:
        disk = await qblock.open_async(str(path))
        try:
            await bdrv_snapshot_create(disk.node, "s")
            with pytest.raises(QBlockError, match="Failed to load snapshot: No such file"):
                await bdrv_snapshot_goto(disk.node, "nope")
            with pytest.raises(QBlockError, match="Can't find the snapshot"):
                await bdrv_snapshot_delete(disk.node, None, "nope")
            from qblock.block import dirty_bitmap as dbm

            dbm.add(disk.node, "b", None, persistent=False)
            with pytest.raises(QBlockError, match="Device has active dirty bitmaps"):
                await bdrv_snapshot_goto(disk.node, "s")
        finally:
            await disk.close()
        disk = await qblock.open_async(str(raw), driver="raw")
        try:
            with pytest.raises(QBlockError) as exc:
                await bdrv_snapshot_create(disk.node, "s")
            assert exc.value.errno == errno.ENOTSUP
            with pytest.raises(QBlockError, match="Block driver does not support snapshots"):
                await bdrv_snapshot_goto(disk.node, "s")
        finally:
            await disk.close()
    qblock.run(run())
    _assert_clean(path)


def test_apply_restores_the_snapshot_size(tmp_path: Path) -> None:
    """QEMU 7.2 resizes images with snapshots; applying one resizes back (disk_size)."""
    path = tmp_path / "img.qcow2"
    create_image(str(path), MiB)

    async def run() -> None:
        disk = await qblock.open_async(str(path))
        try:
            await disk.write(MiB - 4096, b"\5" * 4096)
            await bdrv_snapshot_create(disk.node, "small")
            await disk.truncate(3 * MiB)
            await disk.write(2 * MiB, b"\6" * 65536)
            await bdrv_snapshot_create(disk.node, "big")
            await bdrv_snapshot_goto(disk.node, "small")
            assert disk.size == MiB
            assert bytes(await disk.read(MiB - 4096, 4096)) == b"\5" * 4096
            await bdrv_snapshot_goto(disk.node, "big")
            assert disk.size == 3 * MiB
            assert bytes(await disk.read(2 * MiB, 65536)) == b"\6" * 65536
            await disk.truncate(MiB // 2)  # shrinking is allowed too
            await bdrv_snapshot_goto(disk.node, "small")
            assert bytes(await disk.read(MiB - 4096, 4096)) == b"\5" * 4096
        finally:
            await disk.close()
    qblock.run(run())
    _assert_clean(path)


def test_writes_in_flight_finish_before_the_snapshot(tmp_path: Path) -> None:
    """A write in flight when a snapshot operation starts lands before it (the drain of
    bdrv_drained_begin()); one started meanwhile lands whole before or after it, never torn,
    and the image stays consistent."""
    path = tmp_path / "img.qcow2"
    create_image(str(path), MiB)
    chunk = 65536

    async def run() -> None:
        disk = await qblock.open_async(str(path))
        try:
            await disk.write(0, b"\1" * MiB)
            await bdrv_snapshot_create(disk.node, "old")
            await disk.write(0, b"\2" * MiB)  # COW'd: the next writes go in place
            await asyncio.gather(disk.write(0, b"\3" * chunk),
                                 bdrv_snapshot_create(disk.node, "mid"),
                                 disk.write(chunk, b"\4" * chunk))
            await asyncio.gather(disk.write(2 * chunk, b"\5" * chunk),
                                 bdrv_snapshot_goto(disk.node, "old"),
                                 disk.write(3 * chunk, b"\6" * chunk))
            now = bytes(await disk.read(0, 4 * chunk))
            assert now[:3 * chunk] == b"\1" * 3 * chunk  # the write before the goto is undone
            assert now[3 * chunk:] in (b"\1" * chunk, b"\6" * chunk)
            await bdrv_snapshot_goto(disk.node, "mid")
            mid = bytes(await disk.read(0, 4 * chunk))
            assert mid[:chunk] == b"\3" * chunk
            assert mid[chunk:2 * chunk] in (b"\2" * chunk, b"\4" * chunk)
            assert mid[2 * chunk:] == b"\2" * 2 * chunk
        finally:
            await disk.close()
    qblock.run(run())
    _assert_clean(path)


def test_qmp_commands_and_transaction(tmp_path: Path) -> None:
    path = tmp_path / "img.qcow2"
    create_image(str(path), MiB)
    raw = tmp_path / "img.raw"
    raw.write_bytes(bytes(MiB))

    async def run() -> list[Any]:
        m = Monitor()
        await m.ok("blockdev-add", {"driver": "qcow2", "node-name": "d0",
                                    "file": {"driver": "file", "filename": str(path),
                                             "node-name": "f0"}})
        await m.ok("blockdev-add", {"driver": "raw", "node-name": "r0",
                                    "file": {"driver": "file", "filename": str(raw)}})
        out = []
        for cmd, args in [
            ("blockdev-snapshot-internal-sync", {"device": "d0", "name": "s1"}),
            ("blockdev-snapshot-internal-sync", {"device": "d0", "name": "s1"}),
            ("blockdev-snapshot-internal-sync", {"device": "d0", "name": ""}),
            ("blockdev-snapshot-internal-sync", {"device": "f0", "name": "x"}),
            ("blockdev-snapshot-internal-sync", {"device": "r0", "name": "x"}),
            ("blockdev-snapshot-internal-sync", {"device": "nope", "name": "x"}),
            ("blockdev-snapshot-delete-internal-sync", {"device": "d0"}),
            ("blockdev-snapshot-delete-internal-sync", {"device": "d0", "name": "zz"}),
            ("blockdev-snapshot-delete-internal-sync", {"device": "r0", "id": "1"}),
            ("transaction", {"actions": [
                {"type": "blockdev-snapshot-internal-sync",
                 "data": {"device": "d0", "name": "t1"}},
                {"type": "abort", "data": {}}]}),
            ("transaction", {"actions": [
                {"type": "blockdev-snapshot-internal-sync",
                 "data": {"device": "d0", "name": "t2"}}]}),
        ]:
            reply = await m.q(cmd, args)
            out.append(reply.get("error", {}).get("desc", reply.get("return")))
        deleted = await m.ok("blockdev-snapshot-delete-internal-sync",
                             {"device": "d0", "id": "1"})
        out.append((deleted["id"], deleted["name"], sorted(deleted)))
        out.append([sn.name for sn in bdrv_snapshot_list(registry.lookup("d0"))])
        await m.ok("blockdev-del", {"node-name": "d0"})
        await m.ok("blockdev-del", {"node-name": "r0"})
        return out
    assert qblock.run(run()) == [
        {}, "Snapshot with name 's1' already exists on device 'd0'", "Name is empty",
        "Need a root block node",
        "Block format 'raw' used by device 'r0' does not support internal snapshots",
        "Cannot find device='nope' nor node-name='nope'",
        "Name or id must be provided",
        "Snapshot with id 'null' and name 'zz' does not exist on device 'd0'",
        "Failed to get a snapshot list: Operation not supported",
        "Transaction aborted using Abort action", {},
        ("1", "s1", ["date-nsec", "date-sec", "id", "name", "vm-clock-nsec", "vm-clock-sec",
                     "vm-state-size"]),
        ["t2"],
    ]
    _assert_clean(path)
