"""blockdev-backup (blockdev.c do_backup_common / blockdev_backup_prepare, QEMU 7.2;
REFERENCE 4.6).  ``create_backup`` makes the job without starting it, so a transaction can
start it at commit or cancel it at abort."""
from __future__ import annotations

from typing import Any

from qblock.block.dirty_bitmap import CHECK_ALLOW_RO, check_bitmap, find_bitmap
from qblock.block.node import BlockNode
from qblock.errors import InvalidArgument, QBlockError
from qblock.jobs.backup import BackupJob, supports_compressed_writes
from qblock.jobs.blockjob import BlockJob
from qblock.monitor.commands.block import lookup_bs
from qblock.monitor.commands.commit import ON_ERROR
from qblock.monitor.context import CommandContext
from qblock.monitor.registry import command
from qblock.monitor.schema import BOOL, INT, STR, Enum, Struct, opt, req

SYNC_MODE = Enum("MirrorSyncMode", ["top", "full", "none", "incremental", "bitmap"])
BITMAP_SYNC_MODE = Enum("BitmapSyncMode", ["on-success", "never", "always"])
BLOCKDEV_BACKUP = Struct("BlockdevBackup", {
    "job-id": opt(STR), "device": req(STR), "target": req(STR), "sync": req(SYNC_MODE),
    "speed": opt(INT), "bitmap": opt(STR), "bitmap-mode": opt(BITMAP_SYNC_MODE),
    "compress": opt(BOOL), "on-source-error": opt(ON_ERROR), "on-target-error": opt(ON_ERROR),
    "auto-finalize": opt(BOOL), "auto-dismiss": opt(BOOL), "filter-node-name": opt(STR)})


def _check_not_busy(ctx: CommandContext, node: BlockNode) -> None:
    """bdrv_op_is_blocked(): a block job blocks operations on the nodes it holds."""
    for job in ctx.state.jobs.values():
        if isinstance(job, BlockJob) and any(e.node is node for e in job.nodes):
            raise QBlockError(f"Node '{node.node_name}' is busy: block device is in use by "
                              f"block job: {job.job_type}")


def create_backup(ctx: CommandContext, args: dict[str, Any]) -> BackupJob:
    """Check the arguments in QEMU's order and create the (not yet started) job."""
    source = lookup_bs(args["device"], args["device"])
    target = lookup_bs(args["target"], args["target"])
    sync = args["sync"]
    if sync in ("bitmap", "incremental") and "bitmap" not in args:
        raise InvalidArgument(f"must provide a valid bitmap name for '{sync}' sync mode")
    bitmap = None
    mode = args.get("bitmap-mode")
    if "bitmap" in args:
        bitmap = find_bitmap(source, args["bitmap"])
        if bitmap is None:
            raise InvalidArgument(f"Bitmap '{args['bitmap']}' could not be found")
        if mode is None:
            if sync != "incremental":
                raise InvalidArgument("Bitmap sync mode must be given when providing a bitmap")
            mode = "on-success"
        check_bitmap(bitmap, CHECK_ALLOW_RO)
        if sync == "incremental":
            if mode != "on-success":
                raise InvalidArgument("Bitmap sync mode must be 'on-success' when using sync "
                                      "mode 'incremental'")
            sync = "bitmap"
    elif mode is not None:
        raise InvalidArgument("Cannot specify bitmap sync mode without a bitmap")
    if bitmap is not None and sync == "none":
        raise InvalidArgument("sync mode 'none' does not produce meaningful bitmap outputs")
    compress = args.get("compress", False)
    if compress and not supports_compressed_writes(target):
        # backup_job_create() names the target's BlockBackend, which a node added with
        # blockdev-add does not have: the name is empty
        raise QBlockError("Compression is not supported for this drive ")
    _check_not_busy(ctx, source)
    _check_not_busy(ctx, target)
    return BackupJob(args.get("job-id", ""), ctx.state.jobs, ctx.state.events, source, target,
                     sync=sync, bitmap=bitmap, bitmap_mode=mode or "on-success",
                     filter_node_name=args.get("filter-node-name"),
                     on_source_error=args.get("on-source-error", "report"),
                     on_target_error=args.get("on-target-error", "report"), compress=compress,
                     speed=args.get("speed", 0), auto_finalize=args.get("auto-finalize", True),
                     auto_dismiss=args.get("auto-dismiss", True))


@command("blockdev-backup", BLOCKDEV_BACKUP)
async def blockdev_backup(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Create and start a backup job."""
    create_backup(ctx, args).start()
    return {}
