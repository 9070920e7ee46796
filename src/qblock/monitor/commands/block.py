"""Block node commands: blockdev-add, blockdev-del, blockdev-create, block_resize,
block-set-write-threshold (qapi/block-core.json, blockdev.c, QEMU 7.2 behaviour).

BlockdevOptions and BlockdevCreateOptions are declared as flat unions on ``driver`` so
argument errors carry QEMU's messages ("Parameter 'file' is missing" before any other check)
and query-qmp-schema describes them; what the schema cannot say, ``open_node`` checks.
"""
from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

from qblock.block.backend import BlockBackend
from qblock.block.node import BlockNode, close_node, registry, unref_if_unused
from qblock.block.open import driver_names, open_node
from qblock.block.perm import PERM_ALL, Perm
from qblock.errors import InvalidArgument, NodeInUse, QBlockError
from qblock.monitor.context import CommandContext
from qblock.monitor.registry import command
from qblock.monitor.schema import (BOOL, INT, NULL, STR, UINT32, UINT64, Alternate, Enum, Member,
                                   ListOf, QapiType, Struct, opt, req)

PREALLOC = Enum("PreallocMode", ["off", "metadata", "falloc", "full"])


class DriverEnum(Enum):
    """BlockdevDriver: the drivers this build can open (open.py's registry, read when used)."""

    def __init__(self) -> None:
        super().__init__("BlockdevDriver", [])

    def visit(self, value: Any, path: str) -> Any:
        self.values = driver_names()
        return super().visit(value, path)

    def schema_info(self) -> dict[str, Any]:
        self.values = driver_names()
        return super().schema_info()


class FlatUnion(Struct):
    """A QAPI flat union on ``driver``: base members, then the members of the chosen branch.

    Drivers without a declared branch are checked against the base only (open-ended), the
    driver's own option parsing rejects what it does not know.
    """

    def __init__(self, name: str, base: dict[str, Member | QapiType],
                 branches: dict[str, dict[str, Member | QapiType]]) -> None:
        self.tag = DriverEnum()
        super().__init__(name, {"driver": self.tag, **base}, open_ended=True)
        self.base = Struct(f"{name}-base", self.members, open_ended=True)
        self.branches: dict[str, Struct] = {}
        for driver, members in branches.items():
            self.add_branch(driver, members)

    def add_branch(self, driver: str, members: dict[str, Member | QapiType]) -> None:
        """Declare the members of one driver (after the union exists, for recursive refs)."""
        self.branches[driver] = Struct(f"{self.name}{_camel(driver)}",
                                       {**self.base.members, **members})

    def visit(self, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise self.type_error(path or "null")
        prefix = f"{path}." if path else ""
        if "driver" not in value:
            raise InvalidArgument(f"Parameter '{prefix}driver' is missing")
        driver = self.tag.visit(value["driver"], prefix + "driver")
        return self.branches.get(driver, self.base).visit(value, path)

    def schema_info(self) -> dict[str, Any]:
        info = self.base.schema_info()
        info["tag"] = "driver"
        info["variants"] = [{"case": drv, "type": s.name} for drv, s in self.branches.items()]
        return info


def _camel(driver: str) -> str:
    return "".join(part.capitalize() for part in driver.replace("_", "-").split("-"))


# -- BlockdevOptions (qapi/block-core.json, members QEMU 7.2 has) ----------------------------
_FILE_OPTS: dict[str, Member | QapiType] = {
    "filename": req(STR), "pr-manager": opt(STR),
    "locking": opt(Enum("OnOffAuto", ["auto", "on", "off"])),
    "aio": opt(Enum("BlockdevAioOptions", ["threads", "native", "io_uring"])),
    "aio-max-batch": opt(INT), "drop-cache": opt(BOOL), "x-check-cache-dropped": opt(BOOL)}
_NULL_OPTS: dict[str, Member | QapiType] = {
    "size": opt(INT), "latency-ns": opt(UINT64), "read-zeroes": opt(BOOL)}

BLOCKDEV_OPTIONS = FlatUnion("BlockdevOptions", {
    "node-name": opt(STR),
    "discard": opt(Enum("BlockdevDiscardOptions", ["ignore", "unmap"])),
    "cache": opt(Struct("BlockdevCacheOptions", {"direct": opt(BOOL), "no-flush": opt(BOOL)})),
    "read-only": opt(BOOL), "auto-read-only": opt(BOOL), "force-share": opt(BOOL),
    "detect-zeroes": opt(Enum("BlockdevDetectZeroesOptions", ["off", "on", "unmap"])),
}, {})
BLOCKDEV_REF = Alternate("BlockdevRef", [BLOCKDEV_OPTIONS, STR])
BLOCKDEV_REF_OR_NULL = Alternate("BlockdevRefOrNull", [BLOCKDEV_OPTIONS, STR, NULL])
_OVERLAP = Alternate("Qcow2OverlapChecks", [
    Struct("Qcow2OverlapCheckFlags", {"template": opt(Enum(
        "Qcow2OverlapCheckMode", ["none", "constant", "cached", "all"]))}, open_ended=True),
    Enum("Qcow2OverlapCheckMode", ["none", "constant", "cached", "all"])])
for _driver, _members in {
    "file": _FILE_OPTS, "host_device": _FILE_OPTS, "null-co": _NULL_OPTS, "null-aio": _NULL_OPTS,
    "raw": {"file": req(BLOCKDEV_REF), "offset": opt(INT), "size": opt(INT)},
    "qcow2": {"file": req(BLOCKDEV_REF), "backing": opt(BLOCKDEV_REF_OR_NULL),
              "lazy-refcounts": opt(BOOL), "pass-discard-request": opt(BOOL),
              "pass-discard-snapshot": opt(BOOL), "pass-discard-other": opt(BOOL),
              "overlap-check": opt(_OVERLAP), "cache-size": opt(INT), "l2-cache-size": opt(INT),
              "l2-cache-entry-size": opt(INT), "refcount-cache-size": opt(INT),
              "cache-clean-interval": opt(INT),
              "encrypt": opt(Struct("BlockdevQcow2Encryption", {}, open_ended=True)),
              "data-file": opt(BLOCKDEV_REF)},
    # x-dirty-bitmap is not supported by qblock's client and so not declared
    "nbd": {"server": req(Struct("SocketAddress", {
                "type": req(Enum("SocketAddressType", ["inet", "unix", "vsock", "fd"]))},
                open_ended=True)),
            "export": opt(STR), "tls-creds": opt(STR), "tls-hostname": opt(STR),
            "reconnect-delay": opt(UINT32), "open-timeout": opt(UINT32)},
    "blkdebug": {"image": req(BLOCKDEV_REF), "inject-error": opt(ListOf(Struct(
        "BlkdebugInjectErrorOptions", {
            "event": req(STR), "state": opt(INT), "errno": opt(INT), "sector": opt(INT),
            "once": opt(BOOL), "immediately": opt(BOOL), "iotype": opt(Enum(
                "BlkdebugIOType", ["read", "write", "write-zeroes", "discard", "flush",
                                   "block-status"]))})))},
}.items():
    BLOCKDEV_OPTIONS.add_branch(_driver, _members)


@command("blockdev-add", BLOCKDEV_OPTIONS, boxed=True)
async def blockdev_add(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Open a node owned by the monitor (blockdev.c qmp_blockdev_add)."""
    node = await open_node(args)
    node.monitor_owned = True
    return {}


def has_backend(node: BlockNode) -> bool:
    """block-backend.c bdrv_has_blk(): a BlockBackend is among the node's parents."""
    return any(isinstance(edge.parent, BlockBackend) for edge in node.parents)


def op_blocker(node: BlockNode) -> str | None:
    """Why the node's operations (resize, deletion) are blocked, or None.

    block.c bdrv_backing_attach(): a parent blocks most operations on its backing node with
    "node is used as backing hd of 'P'".
    """
    for edge in node.parents:
        if edge.name == "backing" and isinstance(edge.parent, BlockNode):
            return f"node is used as backing hd of '{edge.parent.node_name}'"
    return None


@command("blockdev-del", {"node-name": req(STR)})
async def blockdev_del(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Drop the monitor's reference to a node (blockdev.c qmp_blockdev_del, REFERENCE 4.1)."""
    name = args["node-name"]
    node = registry.lookup(name)
    if node is None:
        raise InvalidArgument(f"Failed to find node with node-name='{name}'")
    if has_backend(node):
        raise NodeInUse(f"Node {name} is in use")
    blocker = op_blocker(node)
    if blocker is not None:
        raise NodeInUse(f"Node '{name}' is busy: {blocker}")
    if not node.monitor_owned:
        raise InvalidArgument(f"Node {name} is not owned by the monitor")
    if node.parents:  # another node holds a reference (bs->refcnt > 1)
        raise NodeInUse(f"Block device {name} is in use")
    node.monitor_owned = False
    await close_node(node)
    return {}


# -- blockdev-create ---------------------------------------------------------------------------
BLOCKDEV_CREATE_OPTIONS = FlatUnion("BlockdevCreateOptions", {}, {
    "file": {"filename": req(STR), "size": req(INT), "preallocation": opt(PREALLOC),
             "nocow": opt(BOOL), "extent-size-hint": opt(INT)},
    "qcow2": {"file": req(BLOCKDEV_REF), "data-file": opt(BLOCKDEV_REF),
              "data-file-raw": opt(BOOL), "extended-l2": opt(BOOL), "size": req(INT),
              "version": opt(Enum("BlockdevQcow2Version", ["v2", "v3"])),
              "backing-file": opt(STR), "backing-fmt": opt(DriverEnum()),
              "encrypt": opt(Struct("QCryptoBlockCreateOptions", {}, open_ended=True)),
              "cluster-size": opt(INT), "preallocation": opt(PREALLOC),
              "lazy-refcounts": opt(BOOL), "refcount-bits": opt(INT),
              "compression-type": opt(Enum("Qcow2CompressionType", ["zlib", "zstd"]))},
})


@command("blockdev-create", {"job-id": req(STR), "options": req(BLOCKDEV_CREATE_OPTIONS)})
async def blockdev_create(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Create an image (blockdev.c qmp_blockdev_create), synchronously for now.

    QEMU starts a ``create`` job that the user dismisses with job-dismiss after it concludes,
    and a failure shows up as the job's error.  qblock creates the image before replying: an
    error is the command's error and no job is left behind.
    """
    job_id = args["job-id"]
    if job_id in ctx.state.jobs:
        raise InvalidArgument(f"Job ID '{job_id}' already in use")
    opts = args["options"]
    driver = opts["driver"]
    if driver == "file":
        await create_file(opts["filename"], opts["size"], opts.get("preallocation", "off"))
    elif driver == "qcow2":
        await create_qcow2(opts)
    else:
        raise InvalidArgument("Driver does not support blockdev-create")
    return {}


async def create_file(filename: str, size: int, prealloc: str) -> None:
    """file-posix.c raw_co_create(): create or truncate, then preallocate."""
    if size < 0:
        raise InvalidArgument("Image size cannot be negative")
    if prealloc == "metadata":
        raise InvalidArgument("Unsupported preallocation mode: metadata")
    await asyncio.to_thread(_create_file, filename, size, prealloc)


def _create_file(filename: str, size: int, prealloc: str) -> None:
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise QBlockError(f"Could not create '{filename}': {os.strerror(e.errno or 0)}",
                          errno=e.errno or errno.EIO) from None
    try:
        os.ftruncate(fd, 0)
        if prealloc == "falloc" and size:
            os.posix_fallocate(fd, 0, size)
        elif prealloc == "full":
            chunk = bytes(1 << 20)
            for off in range(0, size, len(chunk)):
                os.pwrite(fd, chunk[:min(len(chunk), size - off)], off)
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as e:
        raise QBlockError(f"Could not resize file: {os.strerror(e.errno or 0)}",
                          errno=e.errno or errno.EIO) from None
    finally:
        os.close(fd)


async def create_qcow2(opts: dict[str, Any]) -> None:
    """qcow2.c qcow2_co_create() on the protocol node ``file`` refers to."""
    from qblock.drivers.qcow2.create import create

    for key in ("data-file", "data-file-raw", "encrypt"):
        if key in opts:
            raise InvalidArgument(f"Parameter '{key}' is not supported by qblock")
    ref = opts["file"]
    if isinstance(ref, str):
        file = registry.lookup(ref)
        if file is None:
            raise InvalidArgument(f"Cannot find device='{ref}' nor node-name='{ref}'")
    else:
        file = await open_node(ref, implicit=True)
    try:
        await create(file, opts["size"], cluster_size=opts.get("cluster-size", 65536),
                     compat=opts.get("version", "v3"),
                     extended_l2=opts.get("extended-l2", False),
                     compression_type=opts.get("compression-type", "zlib"),
                     lazy_refcounts=opts.get("lazy-refcounts", False),
                     refcount_bits=opts.get("refcount-bits", 16),
                     backing_file=opts.get("backing-file"), backing_fmt=opts.get("backing-fmt"),
                     preallocation=opts.get("preallocation", "off"))
    finally:
        await unref_if_unused(file)


# -- block_resize, block-set-write-threshold ---------------------------------------------------
def lookup_bs(device: str | None, node_name: str | None) -> BlockNode:
    """block.c bdrv_lookup_bs(): by BlockBackend name (none in the daemon), then node-name."""
    if node_name is not None:
        node = registry.lookup(node_name)
        if node is not None:
            return node
    raise InvalidArgument(f"Cannot find device='{device or ''}' nor "
                          f"node-name='{node_name or ''}'")


@command("block_resize", {"device": opt(STR), "node-name": opt(STR), "size": req(INT)})
async def block_resize(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Resize through a temporary BlockBackend taking RESIZE (blockdev.c qmp_block_resize)."""
    node = lookup_bs(args.get("device"), args.get("node-name"))
    size = args["size"]
    if size < 0:
        raise InvalidArgument("Parameter 'size' expects a >0 size")
    if op_blocker(node) is not None:
        # QERR_DEVICE_IN_USE with the device argument, printed by glibc as (null) if absent
        raise NodeInUse(f"Device '{args.get('device', '(null)')}' is in use")
    blk = BlockBackend(node, Perm.RESIZE, PERM_ALL)
    try:
        await blk.truncate(size, exact=False)
    finally:
        await blk.close()
    return {}


@command("block-set-write-threshold", {"node-name": req(STR), "write-threshold": req(UINT64)})
async def block_set_write_threshold(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Arm BLOCK_WRITE_THRESHOLD; 0 disarms (block/write-threshold.c)."""
    name = args["node-name"]
    node = registry.lookup(name)
    if node is None:
        raise InvalidArgument(f"Device '{name}' not found")
    node.write_threshold = args["write-threshold"]
    return {}
