"""Block queries: query-named-block-nodes, query-block, query-blockstats,
x-debug-query-block-graph (blockdev.c / block/qapi.c, QEMU 7.2 reply shapes)."""
from __future__ import annotations

from typing import Any

from qblock.block import qapi
from qblock.block.node import registry
from qblock.monitor.context import CommandContext
from qblock.monitor.registry import command
from qblock.monitor.schema import BOOL, opt


@command("query-named-block-nodes", {"flat": opt(BOOL)})
async def query_named_block_nodes(ctx: CommandContext, args: dict[str, Any]) -> list[Any]:
    """BlockDeviceInfo of every named node, newest first (bdrv_named_nodes_list prepends)."""
    flat = args.get("flat", False)
    return [await qapi.block_device_info(node, flat)
            for node in reversed(list(registry.nodes.values()))]


@command("query-block")
async def query_block(ctx: CommandContext, args: dict[str, Any]) -> list[Any]:
    """BlockInfo of named or attached BlockBackends: the daemon has none, like qsd."""
    return []


@command("query-blockstats", {"query-nodes": opt(BOOL)})
async def query_blockstats(ctx: CommandContext, args: dict[str, Any]) -> list[Any]:
    """Per named node with ``query-nodes``, else per named BlockBackend (none in qsd)."""
    if args.get("query-nodes", False):
        return [qapi.node_block_stats(node) for node in registry.nodes.values()]
    return [qapi.backend_block_stats(blk) for blk in ctx.state.backends if blk.name]


@command("x-debug-query-block-graph")
async def x_debug_query_block_graph(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """The whole graph: BlockBackends, block jobs and nodes with their edges' permissions."""
    return qapi.block_graph(ctx.state.backends, ctx.state.jobs.values(),
                            registry.nodes.values())
