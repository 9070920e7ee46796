"""block-stream (blockdev.c qmp_block_stream, QEMU 7.2; REFERENCE 4.3).  The checks come in
QEMU's order, so do the errors."""
from __future__ import annotations

import os
from typing import Any

from qblock.block.node import BlockNode
from qblock.errors import QBlockError
from qblock.jobs.stream import StreamJob, filter_or_cow
from qblock.monitor.commands.block import lookup_bs
from qblock.monitor.commands.commit import ON_ERROR
from qblock.monitor.context import CommandContext
from qblock.monitor.registry import command
from qblock.monitor.schema import BOOL, INT, STR, opt, req


def chain_of(node: BlockNode) -> list[BlockNode]:
    """``node`` and everything below it through filter and COW links."""
    chain = []
    cur: BlockNode | None = node
    while cur is not None:
        chain.append(cur)
        cur = filter_or_cow(cur)
    return chain


def find_backing_image(bs: BlockNode, name: str) -> BlockNode | None:
    """block.c bdrv_find_backing_image(): a node below ``bs`` opened from ``name``."""
    for node in chain_of(bs)[1:]:
        if node.drv.is_filter:
            continue
        if node.filename and (node.filename == name or
                              os.path.realpath(node.filename) == os.path.realpath(name)):
            return node
    return None


def find_overlay(bs: BlockNode, base: BlockNode | None) -> BlockNode:
    """block.c bdrv_find_overlay(): the node whose backing (or filtered child) is ``base``."""
    node = bs
    while filter_or_cow(node) is not base and filter_or_cow(node) is not None:
        below = filter_or_cow(node)
        assert below is not None
        node = below
    return node


@command("block-stream", {
    "job-id": opt(STR), "device": req(STR), "base": opt(STR), "base-node": opt(STR),
    "backing-file": opt(STR), "bottom": opt(STR), "speed": opt(INT), "on-error": opt(ON_ERROR),
    "filter-node-name": opt(STR), "auto-finalize": opt(BOOL), "auto-dismiss": opt(BOOL)})
async def block_stream(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Start a stream job into ``device``."""
    for a, b in (("base", "base-node"), ("base", "bottom"), ("bottom", "base-node")):
        if a in args and b in args:
            raise QBlockError(f"'{a}' and '{b}' cannot be specified at the same time")
    device = args["device"]
    bs = lookup_bs(device, device)
    base: BlockNode | None = None
    bottom: BlockNode | None = None
    if "base" in args:
        base = find_backing_image(bs, args["base"])
        if base is None:
            raise QBlockError(f"Can't find '{args['base']}' in the backing chain")
    if "base-node" in args:
        base = lookup_bs(None, args["base-node"])
        if base is bs or base not in chain_of(bs):
            raise QBlockError(f"Node '{args['base-node']}' is not a backing image of "
                              f"'{device}'")
    if "bottom" in args:
        bottom = lookup_bs(None, args["bottom"])
        if bottom.drv.is_filter:
            raise QBlockError(f"Node '{args['bottom']}' is a filter, use a non-filter node "
                              "as 'bottom'")
        if bottom not in chain_of(bs):
            raise QBlockError(f"Node '{args['bottom']}' is not in a chain starting from "
                              f"'{device}'")
        base = filter_or_cow(bottom)
    if base is None and "backing-file" in args:
        raise QBlockError("backing file specified, but streaming the entire chain")
    if bottom is None:
        bottom = find_overlay(bs, base)
    job = StreamJob(args.get("job-id", ""), ctx.state.jobs, ctx.state.events, bs, base,
                    bottom, backing_file=args.get("backing-file"),
                    filter_node_name=args.get("filter-node-name"),
                    on_error=args.get("on-error", "report"), speed=args.get("speed", 0),
                    auto_finalize=args.get("auto-finalize", True),
                    auto_dismiss=args.get("auto-dismiss", True))
    job.start()
    return {}
