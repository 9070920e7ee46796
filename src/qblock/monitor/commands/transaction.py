"""transaction: several block actions, all or nothing (blockdev.c qmp_transaction, QEMU 7.2;
REFERENCE 4.6).

Every action is prepared in order; when one fails, those prepared before it are aborted in
reverse order and the failing action's error is the reply.  Otherwise every action commits in
order: only then do backup jobs start and removed bitmaps go.
"""
from __future__ import annotations

import sys
from typing import Any

from qblock.block import dirty_bitmap as dbm
from qblock.block.graph import replace_node
from qblock.block.node import BlockNode, close_node
from qblock.drivers.qcow2.snapshot_ops import bdrv_snapshot_delete
from qblock.errors import InvalidArgument, QBlockError
from qblock.jobs.backup import BackupJob
from qblock.jobs.job import JobStatus, JobTxn
from qblock.monitor.commands.backup import BLOCKDEV_BACKUP, create_backup
from qblock.monitor.commands.bitmap import (
    NODE_AND_NAME,
    block_dirty_bitmap_add,
    block_dirty_bitmap_merge,
    lookup,
)
from qblock.monitor.commands.block import lookup_bs
from qblock.monitor.commands.snapshot import blockdev_snapshot, blockdev_snapshot_sync
from qblock.monitor.commands.snapshot_internal import create_internal
from qblock.monitor.context import CommandContext
from qblock.monitor.registry import COMMANDS, command
from qblock.monitor.schema import Enum, ListOf, QapiType, Struct, opt, req

ACTION_TYPES = ["abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove",
                "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
                "block-dirty-bitmap-disable", "block-dirty-bitmap-merge", "blockdev-backup",
                "blockdev-snapshot", "blockdev-snapshot-internal-sync", "blockdev-snapshot-sync"]
ACTION_KIND = Enum("TransactionActionKind", ACTION_TYPES)
COMPLETION_MODE = Enum("ActionCompletionMode", ["individual", "grouped"])
PROPERTIES = Struct("TransactionProperties", {"completion-mode": opt(COMPLETION_MODE)})


def _data_type(kind: str) -> Struct:
    if kind == "abort":
        return Struct("Abort", {})
    if kind == "blockdev-backup":
        return BLOCKDEV_BACKUP
    if kind in ("block-dirty-bitmap-add", "block-dirty-bitmap-merge", "blockdev-snapshot",
                "blockdev-snapshot-internal-sync", "blockdev-snapshot-sync"):
        return COMMANDS[kind].args
    return Struct("BlockDirtyBitmap", NODE_AND_NAME)


class TransactionAction(QapiType):
    """qapi/transaction.json TransactionAction: {type, data}, data typed by type."""

    name = "TransactionAction"
    json_type = "object"

    def __init__(self) -> None:
        self.branches: list[QapiType] = [ACTION_KIND] + [
            Struct(f"q_obj_{kind}-wrapper", {"data": req(_data_type(kind))})
            for kind in ACTION_TYPES]

    def visit(self, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise self.type_error(path)
        if "type" not in value:
            raise InvalidArgument("Parameter 'type' is missing")
        kind = ACTION_KIND.visit(value["type"], "type")
        extra = set(value) - {"type", "data"}
        if extra:
            raise InvalidArgument(f"Parameter '{sorted(extra)[0]}' is unexpected")
        if "data" not in value:
            raise InvalidArgument("Parameter 'data' is missing")
        return {"type": kind, "data": _data_type(kind).visit(value["data"], "data")}

    def schema_info(self) -> dict[str, Any]:
        return {"name": self.name, "meta-type": "object", "tag": "type",
                "members": [{"name": "type", "type": ACTION_KIND.name}],
                "variants": [{"case": kind, "type": f"q_obj_{kind}-wrapper"}
                             for kind in ACTION_TYPES]}


class Action:
    """One prepared action: ``commit`` or ``abort`` follows (BlkActionOps)."""

    async def prepare(self, ctx: CommandContext, data: dict[str, Any]) -> None:
        raise NotImplementedError

    async def commit(self) -> None:
        """Make the prepared change final."""

    async def abort(self) -> None:
        """Undo the prepared change."""


class AbortAction(Action):
    async def prepare(self, ctx: CommandContext, data: dict[str, Any]) -> None:
        raise QBlockError("Transaction aborted using Abort action")


class BitmapAddAction(Action):
    async def prepare(self, ctx: CommandContext, data: dict[str, Any]) -> None:
        await block_dirty_bitmap_add(ctx, data)
        self.node, self.bitmap = lookup(data["node"], data["name"])

    async def abort(self) -> None:
        self.node.dirty_bitmaps.remove(self.bitmap)


class BitmapRemoveAction(Action):
    """Prepare marks the bitmap busy; commit removes it; abort gives it back."""

    async def prepare(self, ctx: CommandContext, data: dict[str, Any]) -> None:
        self.node, self.bitmap = lookup(data["node"], data["name"])
        dbm.check_bitmap(self.bitmap, dbm.CHECK_BUSY | dbm.CHECK_RO)
        self.bitmap.busy = True

    async def commit(self) -> None:
        self.bitmap.busy = False
        await dbm.remove(self.node, self.bitmap)

    async def abort(self) -> None:
        self.bitmap.busy = False


class BitmapChangeAction(Action):
    """clear, enable, disable, merge: the bits and the enabled flag are saved for abort."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def prepare(self, ctx: CommandContext, data: dict[str, Any]) -> None:
        name = data["target"] if self.kind == "merge" else data["name"]
        self.bitmap = lookup(data["node"], name)[1]
        self.saved = (self.bitmap.words.copy(), self.bitmap.enabled)
        if self.kind == "clear":
            dbm.clear(self.bitmap)
        elif self.kind == "merge":
            await block_dirty_bitmap_merge(ctx, data)
        else:
            dbm.set_enabled(self.bitmap, self.kind == "enable")

    async def abort(self) -> None:
        self.bitmap.words[:] = self.saved[0]
        self.bitmap.enabled = self.saved[1]


class BackupAction(Action):
    """The job is created at prepare, started at commit, cancelled at abort.  In a grouped
    transaction it joins the transaction's JobTxn (blockdev.c do_backup_common)."""

    def __init__(self, txn: JobTxn | None) -> None:
        self.txn = txn

    async def prepare(self, ctx: CommandContext, data: dict[str, Any]) -> None:
        self.job: BackupJob = create_backup(ctx, data)
        if self.txn is not None:
            self.txn.add(self.job)

    async def commit(self) -> None:
        self.job.start()

    async def abort(self) -> None:
        # in a grouped transaction the first job cancelled took the others down with it
        if self.job.status is not JobStatus.NULL:
            await self.job.cancel(True)


class SnapshotAction(Action):
    """external_snapshot_action: abort moves the overlay's parents back to the old node."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self.overlay: BlockNode | None = None

    async def prepare(self, ctx: CommandContext, data: dict[str, Any]) -> None:
        if self.sync:
            self.old = lookup_bs(data.get("device"), data.get("node-name"))
        else:
            self.old = lookup_bs(data["node"], data["node"])
        self.was_read_only = self.old.read_only
        await (blockdev_snapshot_sync if self.sync else blockdev_snapshot)(ctx, data)
        for edge in self.old.parents:
            if edge.name == "backing" and isinstance(edge.parent, BlockNode):
                self.overlay = edge.parent

    async def abort(self) -> None:
        # writable first: the parents that come back may write
        if not self.was_read_only:
            self.old.set_read_only(False)
        overlay = self.overlay
        if overlay is not None and not overlay.closed:
            replace_node(overlay, self.old)
            overlay.set_backing(None)
            if not overlay.parents and not overlay.monitor_owned:
                await close_node(overlay)


class InternalSnapshotAction(Action):
    """internal_snapshot_action: the snapshot is taken at prepare, deleted again at abort."""

    async def prepare(self, ctx: CommandContext, data: dict[str, Any]) -> None:
        self.device = data["device"]
        self.node, self.sn = await create_internal(self.device, data["name"])

    async def abort(self) -> None:
        try:
            await bdrv_snapshot_delete(self.node, self.sn.id_str, self.sn.name)
        except QBlockError as e:
            print(f"Failed to delete snapshot with id '{self.sn.id_str}' and name "
                  f"'{self.sn.name}' on device '{self.device}' in abort: {e}", file=sys.stderr)


def _make_action(kind: str, txn: JobTxn | None) -> Action:
    if kind == "abort":
        return AbortAction()
    if kind == "block-dirty-bitmap-add":
        return BitmapAddAction()
    if kind == "block-dirty-bitmap-remove":
        return BitmapRemoveAction()
    if kind.startswith("block-dirty-bitmap-"):
        return BitmapChangeAction(kind.removeprefix("block-dirty-bitmap-"))
    if kind == "blockdev-backup":
        return BackupAction(txn)
    if kind == "blockdev-snapshot-internal-sync":
        return InternalSnapshotAction()
    return SnapshotAction(kind == "blockdev-snapshot-sync")


@command("transaction", {"actions": req(ListOf(TransactionAction())),
                         "properties": opt(PROPERTIES)})
async def transaction(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Prepare every action; abort the prepared ones on the first failure, else commit all.

    With completion-mode=grouped the backup jobs share one JobTxn; the other actions but
    ``abort`` refuse the mode (blockdev.c action_check_completion_mode()).
    """
    mode = args.get("properties", {}).get("completion-mode", "individual")
    txn = JobTxn() if mode == "grouped" else None
    prepared: list[Action] = []
    try:
        for entry in args["actions"]:
            kind = entry["type"]
            if mode == "grouped" and kind not in ("blockdev-backup", "abort"):
                raise QBlockError(f"Action '{kind}' does not support Transaction property "
                                  f"completion-mode = grouped")
            action = _make_action(kind, txn)
            await action.prepare(ctx, entry["data"])
            prepared.append(action)
    except QBlockError:
        for action in reversed(prepared):
            await action.abort()
        raise
    for action in prepared:
        await action.commit()
    return {}
