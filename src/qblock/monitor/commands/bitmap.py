"""Dirty bitmap commands (qapi/block-core.json, blockdev.c and block/monitor/bitmap-qmp-cmds.c,
QEMU 7.2 messages).

``x-block-dirty-bitmap-repair`` is a qblock extension: it makes an inconsistent bitmap (found
``in_use`` in a qcow2 image after a crash) usable again by marking every bit dirty, so the
next incremental backup copies everything instead of trusting stale data.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from qblock.block import dirty_bitmap as dbm
from qblock.block.dirty_bitmap import DirtyBitmap, find_bitmap
from qblock.block.node import BlockNode, registry
from qblock.errors import InvalidArgument
from qblock.monitor.commands.block import lookup_bs
from qblock.monitor.context import CommandContext
from qblock.monitor.registry import command
from qblock.monitor.schema import BOOL, STR, UINT32, Alternate, ListOf, Struct, opt, req

NODE_AND_NAME = {"node": req(STR), "name": req(STR)}
BLOCK_DIRTY_BITMAP = Struct("BlockDirtyBitmap", NODE_AND_NAME)
MERGE_SOURCE = Alternate("BlockDirtyBitmapOrStr", [STR, BLOCK_DIRTY_BITMAP])


def lookup(node_name: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    """blockdev.c block_dirty_bitmap_lookup()."""
    node = registry.lookup(node_name)
    if node is None:
        raise InvalidArgument(f"Node '{node_name}' not found")
    bitmap = find_bitmap(node, name)
    if bitmap is None:
        raise InvalidArgument(f"Dirty bitmap '{name}' not found")
    return node, bitmap


@command("block-dirty-bitmap-add", {**NODE_AND_NAME, "granularity": opt(UINT32),
                                    "persistent": opt(BOOL), "disabled": opt(BOOL)})
async def block_dirty_bitmap_add(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    if not args["name"]:
        raise InvalidArgument("Bitmap name cannot be empty")
    node = lookup_bs(args["node"], args["node"])
    dbm.add(node, args["name"], args.get("granularity"),
            persistent=args.get("persistent", False), disabled=args.get("disabled", False))
    return {}


@command("block-dirty-bitmap-remove", NODE_AND_NAME)
async def block_dirty_bitmap_remove(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    node, bitmap = lookup(args["node"], args["name"])
    await dbm.remove(node, bitmap)
    return {}


@command("block-dirty-bitmap-clear", NODE_AND_NAME)
async def block_dirty_bitmap_clear(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    dbm.clear(lookup(args["node"], args["name"])[1])
    return {}


@command("block-dirty-bitmap-enable", NODE_AND_NAME)
async def block_dirty_bitmap_enable(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    dbm.set_enabled(lookup(args["node"], args["name"])[1], True)
    return {}


@command("block-dirty-bitmap-disable", NODE_AND_NAME)
async def block_dirty_bitmap_disable(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    dbm.set_enabled(lookup(args["node"], args["name"])[1], False)
    return {}


@command("block-dirty-bitmap-merge", {"node": req(STR), "target": req(STR),
                                      "bitmaps": req(ListOf(MERGE_SOURCE))})
async def block_dirty_bitmap_merge(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    node, target = lookup(args["node"], args["target"])

    def sources() -> Iterator[DirtyBitmap]:
        for src in args["bitmaps"]:
            if isinstance(src, str):
                bitmap = find_bitmap(node, src)
                if bitmap is None:
                    raise InvalidArgument(f"Dirty bitmap '{src}' not found")
                yield bitmap
            else:
                yield lookup(src["node"], src["name"])[1]

    dbm.merge(target, sources())
    return {}


@command("x-debug-block-dirty-bitmap-sha256", NODE_AND_NAME)
async def block_dirty_bitmap_sha256(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    return {"sha256": lookup(args["node"], args["name"])[1].sha256()}


@command("x-block-dirty-bitmap-repair", NODE_AND_NAME)
async def block_dirty_bitmap_repair(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """qblock extension: see the module docstring."""
    dbm.repair(lookup(args["node"], args["name"])[1])
    return {}
