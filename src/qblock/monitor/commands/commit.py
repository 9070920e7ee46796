"""block-commit (blockdev.c qmp_block_commit, QEMU 7.2; REFERENCE 4.3).

Active commit when ``top`` is the device node (filters skipped): a mirror-style job that becomes
READY and needs job-complete.  Otherwise an intermediate commit that finishes by itself.
"""
from __future__ import annotations

from typing import Any

from qblock.block.backend import BlockBackend
from qblock.block.node import BlockNode, registry
from qblock.errors import DeviceNotFound, InvalidArgument, QBlockError
from qblock.jobs.commit import CommitJob
from qblock.jobs.mirror import ActiveCommitJob
from qblock.monitor.commands.block import lookup_bs
from qblock.monitor.context import CommandContext
from qblock.monitor.registry import command
from qblock.monitor.schema import BOOL, INT, STR, Enum, opt, req

ON_ERROR = Enum("BlockdevOnError", ["report", "ignore", "enospc", "stop", "auto"])


def skip_filters(node: BlockNode) -> BlockNode:
    """bdrv_skip_filters()."""
    while node.drv.is_filter and node.filtered_child() is not None:
        edge = node.filtered_child()
        assert edge is not None
        node = edge.node
    return node


@command("block-commit", {
    "job-id": opt(STR), "device": req(STR), "base-node": opt(STR), "base": opt(STR),
    "top-node": opt(STR), "top": opt(STR), "backing-file": opt(STR),
    "backing-mask-protocol": opt(BOOL), "speed": opt(INT), "on-error": opt(ON_ERROR),
    "filter-node-name": opt(STR), "auto-finalize": opt(BOOL), "auto-dismiss": opt(BOOL)})
async def block_commit(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Start a commit job; the checks come in QEMU's order, so are the errors."""
    device = args["device"]
    bs = registry.lookup(device)
    if bs is None:
        raise DeviceNotFound(f"Device '{device}' not found")
    # blockdev.c qmp_get_root_bs(): only BlockBackends may use the device node
    if any(not isinstance(edge.parent, BlockBackend) for edge in bs.parents):
        raise QBlockError("Need a root block node")
    if "top" in args or "base" in args:
        raise InvalidArgument("Parameters 'top' and 'base' (filenames) are not supported by "
                              "qblock; use 'top-node' and 'base-node'")
    chain = bs.backing_chain()
    top = bs
    if "top-node" in args:
        top = lookup_bs(None, args["top-node"])
        if top not in chain:
            raise QBlockError(f"'{args['top-node']}' is not in this backing file chain")
    if "base-node" in args:
        base = lookup_bs(None, args["base-node"])
        if base not in top.backing_chain():
            raise QBlockError(f"'{args['base-node']}' is not in this backing file chain")
    else:
        base = top.backing_chain()[-1]
    if top is base:
        raise QBlockError("cannot commit an image into itself")
    job_id = args.get("job-id", "")
    kw = {"speed": args.get("speed", 0), "auto_finalize": args.get("auto-finalize", True),
          "auto_dismiss": args.get("auto-dismiss", True)}
    if top is skip_filters(bs):
        if "backing-file" in args:
            raise QBlockError("'backing-file' specified, but 'top' is the active layer")
        on_error = args.get("on-error", "report")  # mirror.c commit_active_start()
        job: CommitJob | ActiveCommitJob = ActiveCommitJob(
            job_id, ctx.state.jobs, ctx.state.events, top, base,
            filter_node_name=args.get("filter-node-name"), on_source_error=on_error,
            on_target_error=on_error, **kw)
    else:
        job = CommitJob(job_id, ctx.state.jobs, ctx.state.events, bs, top, base,
                        backing_file=args.get("backing-file"),
                        backing_mask_protocol=args.get("backing-mask-protocol", False),
                        filter_node_name=args.get("filter-node-name"),
                        on_error=args.get("on-error", "report"), **kw)
    job.start()
    return {}
