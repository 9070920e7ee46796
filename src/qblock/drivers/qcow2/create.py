"""Creating qcow2 images the way QEMU does (block/qcow2.c qcow2_co_create).

The layout is QEMU's (REFERENCE 1.7): a minimal header and a refcount table with one refcount
block are written, the image is opened, clusters 0-2 are counted, the full header is written,
the image is resized (the L1 table lands in cluster 3) and the backing file is recorded.  So a
fresh image is byte for byte what ``qemu-img create`` writes.
"""
from __future__ import annotations

import struct
from typing import Any

from qblock.block import io
from qblock.block.node import BlockNode, close_node
from qblock.block.open import open_node
from qblock.drivers.qcow2 import header as hdr
from qblock.errors import InvalidArgument

_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_COMPRESSION = {"zlib": hdr.COMPRESSION_ZLIB, "zstd": hdr.COMPRESSION_ZSTD}
_PREALLOC = ("off", "metadata", "falloc", "full")


def validate(size: int, *, cluster_size: int = 65536, compat: str = "1.1",
             extended_l2: bool = False, compression_type: str = "zlib",
             lazy_refcounts: bool = False, refcount_bits: int = 16,
             backing_file: str | None = None, backing_fmt: str | None = None,
             preallocation: str = "off") -> int:
    """Check creation options with QEMU's messages; return the qcow2 version."""
    if compat not in _VERSIONS:
        raise InvalidArgument(f"Parameter 'version' does not accept value '{compat}'")
    version = _VERSIONS[compat]
    if compression_type not in _COMPRESSION:
        raise InvalidArgument(
            f"Parameter 'compression-type' does not accept value '{compression_type}'")
    if preallocation not in _PREALLOC:
        raise InvalidArgument(
            f"Parameter 'preallocation' does not accept value '{preallocation}'")
    bits = cluster_size.bit_length() - 1
    if (cluster_size & (cluster_size - 1) or bits < hdr.MIN_CLUSTER_BITS
            or bits > hdr.MAX_CLUSTER_BITS):
        raise InvalidArgument("Cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cluster_size < 512 * hdr.EXTL2_SUBCLUSTERS:
        raise InvalidArgument("Extended L2 entries are only supported with cluster sizes of "
                              f"at least {512 * hdr.EXTL2_SUBCLUSTERS} bytes")
    if version < 3 and lazy_refcounts:
        raise InvalidArgument("Lazy refcounts only supported with compatibility level 1.1 and "
                              "above (use version=v3 or greater)")
    if refcount_bits > 64 or refcount_bits < 1 or refcount_bits & (refcount_bits - 1):
        raise InvalidArgument("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise InvalidArgument("Different refcount widths than 16 bits require compatibility "
                              "level 1.1 or above (use version=v3 or greater)")
    if compression_type != "zlib" and version < 3:
        raise InvalidArgument("Non-zlib compression type is only supported with compatibility "
                              "level 1.1 and above (use version=v3 or greater)")
    if extended_l2 and version < 3:
        raise InvalidArgument("Extended L2 entries are only supported with compatibility level "
                              "1.1 and above (use version=v3 or greater)")
    if backing_fmt and not backing_file:
        raise InvalidArgument("Backing format cannot be used without backing file")
    if backing_file and preallocation != "off" and not extended_l2:
        raise InvalidArgument("Backing file and preallocation can only be used at the same time "
                              "if extended_l2 is on")
    if backing_file and len(backing_file.encode()) > hdr.BACKING_FILE_MAX:
        raise InvalidArgument("Backing file name too long")
    if size % 512:
        raise InvalidArgument("Image size must be a multiple of 512 bytes")
    return version


async def create(file: BlockNode | str, size: int, *, cluster_size: int = 65536,
                 compat: str = "1.1", extended_l2: bool = False,
                 compression_type: str = "zlib", lazy_refcounts: bool = False,
                 refcount_bits: int = 16, backing_file: str | None = None,
                 backing_fmt: str | None = None, preallocation: str = "off") -> None:
    """Format ``file`` (a protocol node, or a path that is created or truncated) as qcow2."""
    version = validate(size, cluster_size=cluster_size, compat=compat, extended_l2=extended_l2,
                       compression_type=compression_type, lazy_refcounts=lazy_refcounts,
                       refcount_bits=refcount_bits, backing_file=backing_file,
                       backing_fmt=backing_fmt, preallocation=preallocation)
    own_file = isinstance(file, str)
    if isinstance(file, str):
        with open(file, "wb"):
            pass
        file = await open_node({"driver": "file", "filename": file}, implicit=True)
    try:
        await _format(file, size, version, cluster_size, extended_l2,
                      _COMPRESSION[compression_type], lazy_refcounts, refcount_bits,
                      backing_file, backing_fmt, preallocation)
    finally:
        if own_file and not file.closed:
            await close_node(file)


async def _format(file: BlockNode, size: int, version: int, cluster_size: int,
                  extended_l2: bool, compression: int, lazy_refcounts: bool, refcount_bits: int,
                  backing_file: str | None, backing_fmt: str | None,
                  preallocation: str) -> None:
    cs = cluster_size
    # The minimal header qcow2_co_create() writes first (QEMU's sizeof(QCowHeader) = 112).
    incompat = ((hdr.INCOMPAT_COMPRESSION if compression != hdr.COMPRESSION_ZLIB else 0)
                | (hdr.INCOMPAT_EXTL2 if extended_l2 else 0))
    compat = hdr.COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0
    raw = bytearray(struct.pack(">IIQIIQIIQQIIQQQQIIB", hdr.QCOW_MAGIC, version, 0, 0,
                                cs.bit_length() - 1, 0, 0, 0, 0, cs, 1, 0, 0, incompat, compat,
                                0, refcount_bits.bit_length() - 1, hdr.V3_HEADER_SIZE,
                                compression))
    raw += bytes(cs - len(raw))
    # A refcount table (cluster 1) whose entry 0 points at an empty block in cluster 2.
    table = bytearray(2 * cs)
    table[:8] = struct.pack(">Q", 2 * cs)
    await io.node_pwritev(file, 0, memoryview(raw))
    await io.node_pwritev(file, cs, memoryview(table))
    child_name = file.node_name
    node = await open_node({"driver": "qcow2", "file": child_name, "backing": None,
                            "cache-clean-interval": 0}, implicit=True)
    try:
        drv = node.drv
        async with drv.lock:
            await drv.refcounts.alloc_clusters(3)
            await drv.update_header()
        await drv.co_truncate(size, True, preallocation)
        if backing_file:
            drv.header.backing_file = backing_file
            drv.header.backing_format = backing_fmt
            await drv.update_header()
    finally:
        await _close_keep_child(node)


async def _close_keep_child(node: BlockNode) -> None:
    """Close a temporary node without closing the file node below it."""
    file = node.file.node if node.file is not None else None
    if file is not None:
        file.monitor_owned, keep = True, file.monitor_owned
    try:
        await close_node(node)
    finally:
        if file is not None:
            file.monitor_owned = keep


def create_image(filename: str, size: int, **opts: Any) -> None:
    """Synchronous create(): format ``filename`` (created or truncated) as qcow2."""
    from qblock.api import run

    run(create(filename, size, **opts))


# Key order of qemu-img create's "Formatting ..." line (QEMU 7.2, qcow2 on a file).
_LINE_KEYS = ("encryption", "encrypt.format", "cluster_size", "extended_l2", "preallocation",
              "compression_type", "size", "compat", "backing_file", "backing_fmt", "data_file",
              "data_file_raw", "lazy_refcounts", "refcount_bits", "nocow", "extent_size_hint")
_LINE_DEFAULTS = {"cluster_size": 65536, "extended_l2": False, "compression_type": "zlib",
                  "lazy_refcounts": False, "refcount_bits": 16}


def formatting_line(filename: str, size: int, opts: dict[str, Any]) -> str:
    """qemu-img create's "Formatting 'f', fmt=qcow2 ..." line for these -o options.

    ``opts`` uses qemu-img's option names (``cluster_size``, ``backing_file``, ...); values
    are printed as given, booleans as on/off.
    """
    values = {**_LINE_DEFAULTS, **opts, "size": size}
    parts = [f"Formatting '{filename}', fmt=qcow2"]
    for key in _LINE_KEYS:
        if key in values and values[key] is not None:
            value = values[key]
            if isinstance(value, bool):
                value = "on" if value else "off"
            parts.append(f"{key}={value}")
    return " ".join(parts)
