"""External snapshots: blockdev-snapshot-sync and blockdev-snapshot (blockdev.c
external_snapshot_action, QEMU 7.2; REFERENCE 4.3 and 5 "bdrv_append").

The overlay is appended above the old node: the old node becomes its backing child, every
other parent of the old node moves to the overlay, and the old node is reopened read-only.
"""
from __future__ import annotations

from typing import Any

from qblock.block import io
from qblock.block.graph import append_node
from qblock.block.node import BlockNode, registry, unref_if_unused
from qblock.block.open import open_node
from qblock.block.perm import Perm
from qblock.errors import InvalidArgument, QBlockError
from qblock.monitor.commands.block import lookup_bs
from qblock.monitor.context import CommandContext
from qblock.monitor.registry import command
from qblock.monitor.schema import STR, Enum, opt, req

NEW_IMAGE_MODE = Enum("NewImageMode", ["existing", "absolute-paths"])


async def _append_overlay(old: BlockNode, new: BlockNode) -> None:
    """The checks on the overlay, bdrv_append, then the old node goes read-only."""
    perm, _ = new.cumulative_perms()
    if perm & Perm.CONSISTENT_READ:  # somebody reads it already
        raise QBlockError("The overlay is already in use")
    if new.drv.is_filter:
        raise QBlockError("Filters cannot be used as overlays")
    if new.cow_child() is not None:
        raise QBlockError("The overlay already has a backing image")
    if not new.drv.supports_backing:
        raise QBlockError("The overlay does not support backing images")
    append_node(new, old)
    # external_snapshot_commit(): the old top is only read from now on
    old.set_read_only(True)


@command("blockdev-snapshot-sync", {
    "device": opt(STR), "node-name": opt(STR), "snapshot-file": req(STR),
    "snapshot-node-name": opt(STR), "format": opt(STR), "mode": opt(NEW_IMAGE_MODE)})
async def blockdev_snapshot_sync(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Create (unless mode=existing) and open an overlay, then append it (REFERENCE 4.3)."""
    from qblock.drivers.qcow2.create import create

    old = lookup_bs(args.get("device"), args.get("node-name"))
    fmt = args.get("format", "qcow2")
    new_name = args.get("snapshot-node-name")
    path = args["snapshot-file"]
    if not old.read_only:
        await io.flush(old)
    if args.get("node-name") is not None and new_name is None:
        raise InvalidArgument("New overlay node-name missing")
    if new_name is not None and registry.lookup(new_name) is not None:
        raise InvalidArgument("New overlay node-name already in use")
    if args.get("mode", "absolute-paths") != "existing":
        if fmt != "qcow2":
            raise InvalidArgument(f"Format '{fmt}' is not supported for snapshot overlays")
        await create(path, old.length(), backing_file=old.filename,
                     backing_fmt=old.drv.format_name)
    options: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": path}}
    if fmt == "qcow2":
        options["backing"] = None  # BDRV_O_NO_BACKING
    if new_name is not None:
        options["node-name"] = new_name
    new = await open_node(options, implicit=True)
    try:
        await _append_overlay(old, new)
    except Exception:
        await unref_if_unused(new)
        raise
    # bdrv_append() leaves the overlay to its parents: without any, QEMU drops it again
    await unref_if_unused(new)
    return {}


@command("blockdev-snapshot", {"node": req(STR), "overlay": req(STR)})
async def blockdev_snapshot(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Append an existing node, opened with ``"backing": null``, above ``node``."""
    old = lookup_bs(args["node"], args["node"])
    new = lookup_bs(args["overlay"], args["overlay"])
    if not old.read_only:
        await io.flush(old)
    await _append_overlay(old, new)
    return {}
