"""Internal snapshots over QMP: blockdev-snapshot-internal-sync and
blockdev-snapshot-delete-internal-sync (qapi/block-core.json; blockdev.c
internal_snapshot_prepare() and qmp_blockdev_snapshot_delete_internal_sync(), QEMU 7.2).

The work is the qcow2 driver's (drivers/qcow2/snapshot_ops.py).  As in qemu-storage-daemon,
the snapshot's VM clock is the host's real-time clock in microseconds and its icount is -1.
"""
from __future__ import annotations

import errno
import os
import time
from typing import Any

from qblock.block.node import BlockNode
from qblock.drivers.qcow2 import snapshot_ops
from qblock.drivers.qcow2.snapshot import ICOUNT_NONE, SnapshotInfo, qapi_info
from qblock.errors import QBlockError
from qblock.monitor.commands.mirror import root_bs
from qblock.monitor.context import CommandContext
from qblock.monitor.registry import command
from qblock.monitor.schema import STR, opt, req


def _list(node: BlockNode) -> list[SnapshotInfo]:
    """bdrv_snapshot_find_by_id_and_name()'s listing, with its error."""
    try:
        return snapshot_ops.bdrv_snapshot_list(node)
    except QBlockError as e:
        raise QBlockError("Failed to get a snapshot list: "
                          f"{os.strerror(e.errno or errno.ENOTSUP)}") from None


def _find(node: BlockNode, id_str: str | None, name: str | None) -> SnapshotInfo | None:
    for sn in _list(node):
        if (id_str is None or sn.id_str == id_str) and (name is None or sn.name == name):
            return sn
    return None


async def create_internal(device: str, name: str) -> tuple[BlockNode, SnapshotInfo]:
    """internal_snapshot_prepare(): the checks in QEMU's order, then the snapshot."""
    bs = root_bs(device)
    if bs.read_only:
        raise QBlockError(f"Device '{device}' is read only")
    if not snapshot_ops.bdrv_can_snapshot(bs):
        raise QBlockError(f"Block format '{bs.drv.format_name}' used by device '{device}' "
                          "does not support internal snapshots")
    if not name:
        raise QBlockError("Name is empty")
    if _find(bs, None, name) is not None:
        raise QBlockError(f"Snapshot with name '{name}' already exists on device '{device}'")
    # QEMU_CLOCK_VIRTUAL outside a VM: get_clock_realtime(), microsecond precision
    vm_clock = time.time_ns() // 1000 * 1000
    try:
        sn = await snapshot_ops.bdrv_snapshot_create(bs, name, vm_clock_nsec=vm_clock,
                                                     icount=ICOUNT_NONE)
    except QBlockError as e:
        raise QBlockError(f"Failed to create snapshot '{name}' on device '{device}': "
                          f"{os.strerror(e.errno or errno.EIO)}") from None
    return bs, sn


@command("blockdev-snapshot-internal-sync", {"device": req(STR), "name": req(STR)})
async def blockdev_snapshot_internal_sync(ctx: CommandContext,
                                          args: dict[str, Any]) -> dict[str, Any]:
    """Take an internal snapshot of a root node's image."""
    await create_internal(args["device"], args["name"])
    return {}


@command("blockdev-snapshot-delete-internal-sync",
         {"device": req(STR), "id": opt(STR), "name": opt(STR)})
async def blockdev_snapshot_delete_internal_sync(ctx: CommandContext,
                                                 args: dict[str, Any]) -> dict[str, Any]:
    """Delete the snapshot matching id and/or name; returns its SnapshotInfo."""
    device = args["device"]
    id_str, name = args.get("id"), args.get("name")
    bs = root_bs(device)
    if id_str is None and name is None:
        raise QBlockError("Name or id must be provided")
    sn = _find(bs, id_str, name)
    if sn is None:
        # STR_OR_NULL(): a missing member is printed as null
        raise QBlockError(f"Snapshot with id '{id_str if id_str is not None else 'null'}' and "
                          f"name '{name if name is not None else 'null'}' does not exist on "
                          f"device '{device}'")
    await snapshot_ops.bdrv_snapshot_delete(bs, id_str, name)
    return qapi_info(sn)
