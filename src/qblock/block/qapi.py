"""QAPI views of the block graph (block/qapi.c as in QEMU 7.2).

One place builds what the monitor and ``qemu-img info`` report about nodes: ImageInfo
(bdrv_query_image_info), BlockDeviceInfo (bdrv_block_device_info), BlockStats
(bdrv_query_bds_stats) and the x-debug-query-block-graph structure.  Only members QEMU 7.2
sends are produced (no ``children``/``active`` of later versions, no zone_append counters).
Key order does not matter here: ``qobject.to_json`` writes QDict order.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from qblock.block import io
from qblock.block.accounting import node_stats_qmp
from qblock.block.dirty_bitmap import dirty_info
from qblock.block.graph import BdrvChild
from qblock.block.node import BlockNode
from qblock.block.perm import Role, perm_names
from qblock.drivers.qcow2.header import AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, Qcow2Header
from qblock.drivers.qcow2.snapshot import qapi_info, read_snapshots

if TYPE_CHECKING:
    from qblock.block.backend import BlockBackend

_BITMAP_DIR = struct.Struct(">QIIBBHI")  # qcow2.txt "Bitmap directory entry"
BME_FLAG_IN_USE = 1
BME_FLAG_AUTO = 2
_THROTTLE_KEYS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")


def path_combine(base: str, name: str) -> str:
    """block.c path_combine(): ``name`` relative to the directory of ``base``."""
    if os.path.isabs(name):
        return name
    slash = base.rfind("/")
    return base[:slash + 1] + name if slash >= 0 else name


# -- qcow2 metadata read for ImageInfo ------------------------------------------------------
async def read_bitmaps(file: BdrvChild, h: Qcow2Header) -> list[dict[str, Any]]:
    """Qcow2BitmapInfo list from the bitmap directory (qcow2.txt "Bitmap directory")."""
    ext = h.bitmaps
    if ext is None or not h.autoclear_features & AUTOCLEAR_BITMAPS:
        return []
    raw = bytes(await io.pread(file, ext.bitmap_directory_offset, ext.bitmap_directory_size))
    out = []
    pos = 0
    for _ in range(ext.nb_bitmaps):
        _t, _ts, flags, _type, gran_bits, name_size, extra = _BITMAP_DIR.unpack_from(raw, pos)
        start = pos + _BITMAP_DIR.size + extra
        name = raw[start:start + name_size].decode("utf-8", "replace")
        names = []
        if flags & BME_FLAG_IN_USE:
            names.append("in-use")
        if flags & BME_FLAG_AUTO:
            names.append("auto")
        out.append({"name": name, "granularity": 1 << gran_bits, "flags": names})
        pos = (start + name_size + 7) & ~7
    return out


async def qcow2_specific(file: BdrvChild, h: Qcow2Header) -> dict[str, Any]:
    """qcow2.c qcow2_get_specific_info(): ImageInfoSpecific of type qcow2."""
    if h.version == 2:
        data: dict[str, Any] = {"compat": "0.10", "refcount-bits": h.refcount_bits}
    else:
        data = {"compat": "1.1"}
        if h.data_file is not None:
            data["data-file"] = h.data_file
            data["data-file-raw"] = bool(h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)
        data["extended-l2"] = h.extended_l2
        data["lazy-refcounts"] = h.lazy_refcounts
        data["corrupt"] = h.corrupt
        data["refcount-bits"] = h.refcount_bits
        if h.crypt_method == 1:
            data["encrypt"] = {"format": "aes"}
        bitmaps = await read_bitmaps(file, h)
        if bitmaps:
            data["bitmaps"] = bitmaps
    # compression-type is not optional in ImageInfoSpecificQCow2: v2 images report zlib
    data["compression-type"] = h.compression_name
    return {"type": "qcow2", "data": data}


async def qcow2_image_info(filename: str, h: Qcow2Header, file: BdrvChild,
                           actual_size: int | None) -> dict[str, Any]:
    """ImageInfo of a qcow2 image given its header and the edge to its file node.

    Serves an open qcow2 node (in-memory header) and ``qemu-img info`` (header read from the
    file), as both reach bdrv_query_image_info in QEMU.
    """
    info: dict[str, Any] = {"filename": filename, "format": "qcow2", "virtual-size": h.size}
    if actual_size is not None:
        info["actual-size"] = actual_size
    if h.crypt_method:
        info["encrypted"] = True
    # bdrv_get_info(): qcow2_get_info() gives the cluster size and the dirty bit
    info["cluster-size"] = h.cluster_size
    info["dirty-flag"] = h.dirty
    info["format-specific"] = await qcow2_specific(file, h)
    if h.backing_file:
        info["backing-filename"] = h.backing_file
        # 7.2 reports the full name even when it equals the raw one
        info["full-backing-filename"] = path_combine(filename, h.backing_file)
        if h.backing_format:
            info["backing-filename-format"] = h.backing_format
    snapshots, _size = await read_snapshots(file, h)
    if snapshots:
        info["snapshots"] = [qapi_info(sn) for sn in snapshots]
    return info


def getlength(node: BlockNode) -> int:
    """block.c bdrv_getlength(): the length in whole sectors (total_sectors * 512)."""
    return -(-node.length() // 512) * 512


def has_get_info(node: BlockNode) -> bool:
    """Whether bdrv_get_info() succeeds: file-posix and qcow2 implement it, raw forwards it."""
    name = node.drv.format_name
    if name in ("file", "host_device", "qcow2"):
        return True
    if name == "raw" and node.file is not None:
        return has_get_info(node.file.node)
    return False


async def image_info(node: BlockNode) -> dict[str, Any]:
    """block/qapi.c bdrv_query_image_info(): the flat ImageInfo of one node."""
    drv = node.drv
    actual = drv.allocated_file_size()
    if drv.format_name == "qcow2":
        return await qcow2_image_info(node.filename, drv.header, drv.file, actual)
    info: dict[str, Any] = {"filename": node.filename, "format": drv.format_name,
                            "virtual-size": getlength(node)}
    if actual is not None:
        info["actual-size"] = actual
    if has_get_info(node):
        info["dirty-flag"] = False
    return info


def filter_or_cow_child(node: BlockNode) -> BdrvChild | None:
    """block.c bdrv_filter_or_cow_child(): the backing child, or the filtered child of a
    filter driver (raw's FILTERED file child does not count: raw is no filter driver)."""
    cow = node.cow_child()
    if cow is not None or not node.drv.is_filter:
        return cow
    return node.filtered_child()


async def image_info_chain(node: BlockNode, flat: bool) -> tuple[dict[str, Any], int]:
    """ImageInfo with ``backing-image`` nested unless ``flat``; also the backing depth."""
    info = await image_info(node)
    depth = 0
    cur = info
    while not flat:
        edge = filter_or_cow_child(node)
        if edge is None:
            break
        depth += 1
        node = edge.node
        cur["backing-image"] = await image_info(node)
        cur = cur["backing-image"]
    return info, depth


async def block_device_info(node: BlockNode, flat: bool = False) -> dict[str, Any]:
    """block/qapi.c bdrv_block_device_info() for a node without a BlockBackend."""
    image, depth = await image_info_chain(node, flat)
    info: dict[str, Any] = {"file": node.filename, "node-name": node.node_name,
                            "ro": node.read_only, "drv": node.drv.format_name,
                            "encrypted": False}
    backing = backing_file(node)
    if backing:
        info["backing_file"] = backing
    info["backing_file_depth"] = depth
    info["detect_zeroes"] = node.detect_zeroes
    info.update(dict.fromkeys(_THROTTLE_KEYS, 0))
    info["image"] = image
    # writeback is a BlockBackend property; nodes report true (blk == NULL)
    info["cache"] = {"writeback": True, "direct": node.cache_direct,
                     "no-flush": node.cache_no_flush}
    info["write_threshold"] = node.write_threshold
    if node.dirty_bitmaps:
        info["dirty-bitmaps"] = dirty_info(node)
    return info


def backing_file(node: BlockNode) -> str:
    """bs->backing_file: the backing file name recorded in the image header, if any."""
    if node.drv.format_name != "qcow2":
        return ""
    return node.drv.header.backing_file or ""


# -- statistics ------------------------------------------------------------------------------
def stats_parent_child(node: BlockNode) -> BdrvChild | None:
    """The child whose stats nest as ``parent``: the primary child if it holds data or is
    filtered, else the only data child (block/qapi.c bdrv_query_bds_stats)."""
    primary = node.primary_child()
    if primary is not None and primary.role & (Role.DATA | Role.FILTERED):
        return primary
    data = [e for e in node.children.values() if e.role & Role.DATA]
    return data[0] if len(data) == 1 else None


def driver_specific_stats(node: BlockNode) -> dict[str, Any] | None:
    """BlockStatsSpecific: file-posix's discard counters (raw_get_specific_stats)."""
    name = node.drv.format_name
    if name not in ("file", "host_device"):
        return None
    drv = node.drv
    return {"driver": name, "discard-nb-ok": getattr(drv, "discard_nb_ok", 0),
            "discard-nb-failed": getattr(drv, "discard_nb_failed", 0),
            "discard-bytes-ok": getattr(drv, "discard_bytes_ok", 0)}


def node_block_stats(node: BlockNode, blk_level: bool = False) -> dict[str, Any]:
    """BlockStats of a node: counters are zero but ``wr_highest_offset``; ``parent`` nests the
    data child; at BlockBackend level ``backing`` nests the COW or filtered child."""
    s: dict[str, Any] = {"node-name": node.node_name,
                         "stats": node_stats_qmp(node.wr_highest_offset)}
    specific = driver_specific_stats(node)
    if specific is not None:
        s["driver-specific"] = specific
    parent = stats_parent_child(node)
    if parent is not None:
        s["parent"] = node_block_stats(parent.node, blk_level)
    if blk_level:
        cow = filter_or_cow_child(node)
        if cow is not None:
            s["backing"] = node_block_stats(cow.node, blk_level)
    return s


def backend_block_stats(blk: BlockBackend) -> dict[str, Any]:
    """BlockStats of a named BlockBackend: its accounting over its node's stats tree."""
    node = blk.node
    s = node_block_stats(node, blk_level=True)
    s["device"] = blk.name
    s["stats"] = blk.stats.to_qmp(node.wr_highest_offset)
    return s


# -- x-debug-query-block-graph --------------------------------------------------------------
class _GraphBuilder:
    """block.c bdrv_get_xdbg_block_graph(): ids in discovery order, lists built by prepending."""

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}
        self.nodes: list[dict[str, Any]] = []
        self.edges: list[dict[str, Any]] = []

    def node_id(self, obj: object) -> int:
        return self.ids.setdefault(id(obj), len(self.ids) + 1)

    def add_node(self, obj: object, kind: str, name: str) -> None:
        self.nodes.append({"id": self.node_id(obj), "type": kind, "name": name})

    def add_edge(self, parent: object, edge: BdrvChild) -> None:
        # QEMU prepends each permission in enum order, so the list comes out reversed
        self.edges.append({"parent": self.node_id(parent), "child": self.node_id(edge.node),
                           "name": edge.name, "perm": perm_names(edge.perm)[::-1],
                           "shared-perm": perm_names(edge.shared)[::-1]})

    def result(self) -> dict[str, Any]:
        return {"nodes": self.nodes[::-1], "edges": self.edges[::-1]}


def block_graph(backends: Iterable[BlockBackend], jobs: Iterable[Any],
                nodes: Iterable[BlockNode]) -> dict[str, Any]:
    """XDbgBlockGraph: BlockBackends, then block jobs (``id`` and ``nodes``, their BdrvChild
    edges, like QEMU's BlockJob), then nodes in creation order with their children.

    The BlockBackends a job holds (its ``backends``, e.g. a commit's target) are listed too."""
    g = _GraphBuilder()
    jobs = list(jobs)
    for blk in [*backends, *(b for job in jobs for b in getattr(job, "backends", ()))]:
        g.add_node(blk, "block-backend", blk.name)
        if blk.root is not None:
            g.add_edge(blk, blk.root)
    for job in jobs:
        g.add_node(job, "block-job", job.id)
        for edge in job.nodes:
            g.add_edge(job, edge)
    for node in nodes:
        g.add_node(node, "block-driver", node.node_name)
        # bs->children has the newest child first
        for edge in reversed(list(node.children.values())):
            g.add_edge(node, edge)
    return g.result()
