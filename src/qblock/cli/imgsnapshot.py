"""``qblock img snapshot``: qemu-img 7.2's snapshot sub-command (qemu-img.c img_snapshot).

``snapshot [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename``.
Like qemu-img 7.2 there is no ``-f``: the format is probed (or given with --image-opts).
Output, messages and exit codes are qemu-img's; -l prints block/qapi.c bdrv_snapshot_dump().
"""
from __future__ import annotations

import errno
import os
import sys

from qblock.block.backend import BlockBackend
from qblock.block.node import BlockNode, close_node
from qblock.block.open import open_node
from qblock.block.perm import PERM_ALL, Perm
from qblock.cli import imgfmt
from qblock.cli.img import _probe
from qblock.cli.imgerr import RAW_PROBE_WARNING, CommandFailed, error, error_exit, getopt_args
from qblock.drivers.qcow2 import snapshot_ops
from qblock.drivers.qcow2.snapshot import qapi_info
from qblock.errors import QBlockError
from qblock.keyval import KeyvalError, parse_keyval

USAGE = ("snapshot [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] "
         "filename")
_ACTIONS = {"-l": "list", "-a": "apply", "-c": "create", "-d": "delete"}


def dump_snapshots(node: BlockNode) -> str:
    """qemu-img.c dump_snapshots(): nothing when the list fails or is empty."""
    try:
        snapshots = snapshot_ops.bdrv_snapshot_list(node)
    except QBlockError:
        return ""
    if not snapshots:
        return ""
    lines = ["Snapshot list:", imgfmt.snapshot_header()]
    lines += [imgfmt.snapshot_line(qapi_info(sn)) for sn in snapshots]
    return "\n".join(lines) + "\n"


def _options(filename: str, image_opts: bool, writable: bool) -> dict:
    """BlockdevOptions of the image: --image-opts parsed (a file child named by filename
    only is a file node, as bdrv_fill_options() makes it), else the probed format."""
    if image_opts:
        try:
            options = parse_keyval(filename)
        except KeyvalError as e:
            error(str(e))
            raise CommandFailed() from None
        child = options.get("file")
        if isinstance(child, dict) and "driver" not in child:
            child["driver"] = "file"
        return options
    fmt = _probe(filename, None)
    if fmt == "raw" and writable:
        print(RAW_PROBE_WARNING.format(filename), file=sys.stderr)
    # Clusters the snapshot operations free are discarded in the file, as qemu-img's are.
    return {"driver": fmt, "file": {"driver": "file", "filename": filename, "discard": "unmap"}}


async def _open(filename: str, image_opts: bool, writable: bool, share: bool) -> BlockBackend:
    """img_open(): read-only for -l (where -U shares every permission), else writable."""
    options = _options(filename, image_opts, writable)
    if share:
        options["force-share"] = True
    try:
        node = await open_node(options, read_only=not writable, implicit=True)
    except (QBlockError, OSError) as e:
        msg = os.strerror(e.errno or 0) if isinstance(e, OSError) else str(e)
        error(f"Could not open '{filename}': {msg}")
        raise CommandFailed() from None
    # blk_new_open(): a writable image shares everything (qcow2 itself refuses a second
    # writer), so that applying a snapshot can resize it through a second BlockBackend.
    perm = Perm.CONSISTENT_READ | (Perm.WRITE if writable else Perm(0))
    shared = PERM_ALL if share or writable else Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
    try:
        return BlockBackend(node, perm, shared)
    except QBlockError as e:
        await close_node(node)
        error(f"Could not open '{filename}': {e}")
        raise CommandFailed() from None


async def main(argv: list[str]) -> int:
    """Run one action on the image; exit status 1 on failure."""
    opts, args = getopt_args(argv, "la:c:d:hqU", ["help", "image-opts", "force-share"])
    action: str | None = None
    name = ""
    image_opts = share = False
    for o, v in opts:
        if o in ("-h", "--help"):
            print(f"usage: qblock img {USAGE}")
            return 0
        if o in _ACTIONS:
            if action is not None:
                raise error_exit("Cannot mix '-l', '-a', '-c', '-d'")
            action, name = _ACTIONS[o], v
        elif o == "--image-opts":
            image_opts = True
        elif o in ("-U", "--force-share"):
            share = True
    if len(args) != 1:
        raise error_exit("Expecting one image file name")
    filename = args[0]
    writable = action != "list"
    if writable and share:
        error(f"Could not open '{filename}': force-share=on can only be used with read-only "
              "images")
        return 1
    blk = await _open(filename, image_opts, writable, share)
    ret = 0
    try:
        probed_raw = blk.node.drv.format_name == "raw" and not image_opts
        ret = await _run(blk.node, action, name,
                         RAW_PROBE_WARNING.format(filename) if probed_raw else None)
    finally:
        await blk.close()
    return ret


async def _run(node: BlockNode, action: str | None, name: str, reopen_warning: str | None
               ) -> int:
    if action == "list":
        print(dump_snapshots(node), end="")
    elif action == "create":
        try:
            await snapshot_ops.bdrv_snapshot_create(node, name)
        except QBlockError as e:
            err = e.errno or errno.EIO
            error(f"Could not create snapshot '{name}': {-err} ({os.strerror(err)})")
            return 1
    elif action == "apply":
        try:
            await snapshot_ops.bdrv_snapshot_goto(node, name)
        except QBlockError as e:
            if reopen_warning is not None and not node.dirty_bitmaps:
                # bdrv_snapshot_goto() falls back to raw's file child: it closes raw and
                # opens it again, and that open warns about the probed format once more.
                print(reopen_warning, file=sys.stderr)
            error(f"Could not apply snapshot '{name}': {e}")
            return 1
    elif action == "delete":
        # bdrv_snapshot_find(): qemu-img looks the snapshot up by name only
        try:
            found = [sn for sn in snapshot_ops.bdrv_snapshot_list(node) if sn.name == name]
        except QBlockError:
            found = []
        if not found:
            error(f"Could not delete snapshot '{name}': snapshot not found")
            return 1
        try:
            await snapshot_ops.bdrv_snapshot_delete(node, found[0].id_str, found[0].name)
        except QBlockError as e:
            error(f"Could not delete snapshot '{name}': {e}")
            return 1
    return 0
