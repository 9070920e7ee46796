"""blockdev-mirror and drive-mirror (blockdev.c qmp_blockdev_mirror, qmp_drive_mirror,
blockdev_mirror_common, QEMU 7.2; REFERENCE 4.3).  The checks come in QEMU's order, so do
the errors."""
from __future__ import annotations

from typing import Any

from qblock.block.backend import BlockBackend
from qblock.api import probe_format
from qblock.block.node import BlockNode, registry, unref_if_unused
from qblock.block.open import open_node
from qblock.drivers.qcow2.create import create
from qblock.errors import InvalidArgument, NodeInUse, QBlockError
from qblock.jobs.mirror import BackingMode, MirrorJob, check_granularity
from qblock.monitor.commands.block import lookup_bs, op_blocker
from qblock.monitor.commands.commit import ON_ERROR, skip_filters
from qblock.monitor.commands.snapshot import NEW_IMAGE_MODE
from qblock.monitor.context import CommandContext
from qblock.monitor.registry import command
from qblock.monitor.schema import BOOL, INT, STR, Enum, opt, req

SYNC = Enum("MirrorSyncMode", ["top", "full", "none", "incremental", "bitmap"])
COPY_MODE = Enum("MirrorCopyMode", ["background", "write-blocking"])


def root_bs(name: str) -> BlockNode:
    """blockdev.c qmp_get_root_bs()."""
    bs = lookup_bs(name, name)
    if any(not isinstance(edge.parent, BlockBackend) for edge in bs.parents):
        raise QBlockError("Need a root block node")
    return bs


def skip_implicit_filters(node: BlockNode) -> BlockNode:
    """block.c bdrv_skip_implicit_filters()."""
    while node.drv.is_filter and node.implicit_name and node.filtered_child() is not None:
        edge = node.filtered_child()
        assert edge is not None
        node = edge.node
    return node


def check_to_replace_node(bs: BlockNode, name: str) -> BlockNode:
    """block.c check_to_replace_node(): ``name`` must be ``bs`` or a filter path below it."""
    to_replace = registry.lookup(name)
    if to_replace is None:
        raise QBlockError(f"Failed to find node with node-name='{name}'")
    blocker = op_blocker(to_replace)
    if blocker is not None:
        raise NodeInUse(f"Node '{name}' is busy: {blocker}")
    node: BlockNode | None = bs
    while node is not None and node is not to_replace:
        edge = node.filtered_child() if node.drv.is_filter else None
        node = edge.node if edge is not None else None
    if node is None:
        raise QBlockError(f"Cannot replace '{name}' by a node mirrored from '{bs.node_name}', "
                          "because it cannot be guaranteed that doing so would not lead to an "
                          "abrupt change of visible data")
    return to_replace


def backing_chain_next(node: BlockNode) -> BlockNode | None:
    """block.c bdrv_backing_chain_next(): the first non-filter below the COW child."""
    edge = skip_filters(node).cow_child()
    return skip_filters(edge.node) if edge is not None else None


COMMON = {
    "job-id": opt(STR), "device": req(STR), "target": req(STR), "replaces": opt(STR),
    "sync": req(SYNC), "speed": opt(INT), "granularity": opt(INT), "buf-size": opt(INT),
    "on-source-error": opt(ON_ERROR), "on-target-error": opt(ON_ERROR),
    "copy-mode": opt(COPY_MODE), "auto-finalize": opt(BOOL), "auto-dismiss": opt(BOOL)}


def mirror_common(ctx: CommandContext, args: dict[str, Any], bs: BlockNode,
                  target: BlockNode, sync: str, backing_mode: BackingMode,
                  zero_target: bool) -> None:
    """blockdev.c blockdev_mirror_common(), mirror_start() and mirror_start_job()'s checks."""
    granularity = args.get("granularity", 0)
    check_granularity(granularity)
    blocker = op_blocker(target)
    if blocker is not None:
        raise NodeInUse(f"Node '{target.node_name}' is busy: {blocker}")
    base = backing_chain_next(bs)
    if base is None and sync == "top":
        sync = "full"
    replaces = args.get("replaces")
    if replaces is None and skip_implicit_filters(bs) is not bs:
        replaces = skip_implicit_filters(bs).node_name
    to_replace = None
    if replaces is not None:
        to_replace = check_to_replace_node(bs, replaces)
        if target.length() != to_replace.length():
            raise QBlockError("Replacing node and target must have the same length")
    if sync in ("incremental", "bitmap"):
        raise QBlockError(f"Sync mode '{sync}' not supported")
    if args.get("copy-mode", "background") != "background":
        raise InvalidArgument("qblock's mirror jobs only support copy-mode 'background'")
    if skip_filters(bs) is skip_filters(target):
        raise QBlockError("Can't mirror node into itself")
    if skip_filters(target) in bs.backing_chain():
        raise QBlockError("Cannot mirror to a filter on top of a node in the source's "
                          "backing chain")
    job = MirrorJob(args.get("job-id", ""), ctx.state.jobs, ctx.state.events, bs, target,
                    base=base if sync == "top" else None, sync_none=sync == "none",
                    backing_mode=backing_mode, to_replace=to_replace,
                    granularity=granularity, buf_size=args.get("buf-size", 0),
                    on_source_error=args.get("on-source-error", "report"),
                    on_target_error=args.get("on-target-error", "report"),
                    zero_target=zero_target, unmap=args.get("unmap", True),
                    filter_node_name=args.get("filter-node-name"),
                    speed=args.get("speed", 0), auto_finalize=args.get("auto-finalize", True),
                    auto_dismiss=args.get("auto-dismiss", True))
    job.start()


@command("blockdev-mirror", {**COMMON, "filter-node-name": opt(STR)})
async def blockdev_mirror(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Start a mirror job from ``device`` to the existing node ``target``."""
    bs = root_bs(args["device"])
    target = lookup_bs(args["target"], args["target"])
    mirror_common(ctx, args, bs, target, args["sync"], BackingMode.LEAVE_BACKING_CHAIN,
                  zero_target=args["sync"] == "full")
    return {}


async def create_target(path: str, fmt: str, size: int, backing: BlockNode | None) -> None:
    """bdrv_img_create() for the formats qblock creates: qcow2 (maybe with backing), raw."""
    if fmt == "qcow2":
        await create(path, size, backing_file=backing.filename if backing else None,
                     backing_fmt=backing.drv.format_name if backing else None)
    elif fmt == "raw" and backing is None:
        with open(path, "wb") as f:
            f.truncate(size)
    elif fmt == "raw":
        raise QBlockError("Backing file not supported for file format 'raw'")
    else:
        raise InvalidArgument(f"Unknown file format '{fmt}'")


@command("drive-mirror", {**COMMON, "format": opt(STR), "node-name": opt(STR),
                          "mode": opt(NEW_IMAGE_MODE), "unmap": opt(BOOL)})
async def drive_mirror(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """blockdev.c qmp_drive_mirror(): create (unless mode=existing) and open the target."""
    bs = root_bs(args["device"])
    mode = args.get("mode", "absolute-paths")
    fmt = args.get("format") or (None if mode == "existing" else bs.drv.format_name)
    sync = args["sync"]
    edge = skip_filters(bs).cow_child()
    target_backing = edge.node if edge is not None else None
    if target_backing is None and sync == "top":
        sync = "full"
    if sync == "none":
        target_backing = bs
    if "replaces" in args and "node-name" not in args:
        raise QBlockError("a node-name must be provided when replacing a named node of the "
                          "graph")
    backing_mode = (BackingMode.SOURCE_BACKING_CHAIN if mode == "absolute-paths"
                    else BackingMode.OPEN_BACKING_CHAIN)
    path = args["target"]
    if mode != "existing":
        assert fmt is not None
        explicit = None
        if sync != "full" and target_backing is not None:
            explicit = skip_implicit_filters(target_backing)
        await create_target(path, fmt, bs.length(), explicit)
    options: dict[str, Any] = {"driver": fmt or probe_format(path),
                               "file": {"driver": "file", "filename": path}}
    if options["driver"] == "qcow2":
        options["backing"] = None  # BDRV_O_NO_BACKING: mirroring takes care of the chain
    if "node-name" in args:
        options["node-name"] = args["node-name"]
    target = await open_node(options, implicit=True)
    try:
        mirror_common(ctx, args, bs, target, sync, backing_mode,
                      zero_target=sync == "full" and mode == "existing")
    finally:
        await unref_if_unused(target)  # the job holds the target now
    return {}
