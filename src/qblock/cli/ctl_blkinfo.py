"""``qblock ctl domblkinfo``: libvirt's virDomainGetBlockInfo numbers, computed libvirt's way.

REFERENCE §9.  libvirt reports three numbers for a disk: *capacity* (what the guest sees),
*allocation* (host storage in use) and *physical* (size of the container).  A running daemon is
asked with the same queries libvirt sends (``query-blockstats`` in both modes,
``query-named-block-nodes {flat: true}``); an offline image is measured with stat() and its header
(qemuStorageLimitsRefresh).  The arithmetic lives in pure functions so tests can check it against
numbers they compute themselves.
"""
from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable
from typing import Any

from qblock.api import probe_format
from qblock.drivers.qcow2.header import MAX_CLUSTER_BITS, Qcow2Header

# libvirt's virStorageType for the disk source, derived from the protocol node's driver.
SOURCE_FILE = "file"
SOURCE_BLOCK = "block"
SOURCE_NETWORK = "network"
_BLOCK_DRIVERS = ("host_device", "host_cdrom")


@dataclasses.dataclass
class DiskSource:
    """What libvirt knows from the domain XML: the source path, its type and the image format."""

    path: str | None
    type: str
    format: str


@dataclasses.dataclass
class BlockInfo:
    """virDomainBlockInfo plus where each number came from (for the explanation)."""

    capacity: int
    allocation: int
    physical: int
    source: DiskSource
    allocation_from: str
    physical_from: str
    host_allocated: int | None = None
    wr_highest_offset: int | None = None


@dataclasses.dataclass
class SourceStat:
    """The part of stat()/lseek() libvirt uses: size for files, end offset for block devices."""

    size: int
    allocated: int | None


def stat_source(source: DiskSource) -> SourceStat | None:
    """virStorageSourceUpdatePhysicalSize: st_size for a file, lseek(SEEK_END) for a block device.

    ``allocated`` is st_blocks·512 for regular files (what ``du`` shows), None otherwise.
    Returns None when the source cannot be examined locally (network storage, missing file).
    """
    if source.type == SOURCE_NETWORK or not source.path:
        return None
    try:
        st = os.stat(source.path)
        if stat.S_ISBLK(st.st_mode):
            fd = os.open(source.path, os.O_RDONLY)
            try:
                return SourceStat(os.lseek(fd, 0, os.SEEK_END), None)
            finally:
                os.close(fd)
        return SourceStat(st.st_size, st.st_blocks * 512)
    except OSError:
        return None


# -- running daemon (qemuDomainGetBlockInfo with qemuDomainBlocksStatsGather) ------------------

def _entries_by_name(blockstats: list[dict[str, Any]],
                     blockstats_nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """libvirt's hash of BlockStats: device entries by device (or qdev), nodes by node-name."""
    table: dict[str, dict[str, Any]] = {}
    for entry in blockstats:
        name = entry.get("device") or entry.get("qdev")
        if name:
            table[name] = entry
    for entry in blockstats_nodes:
        if entry.get("node-name"):
            table[entry["node-name"]] = entry
    return table


def _protocol_leaf(entry: dict[str, Any]) -> str | None:
    """Node-name at the bottom of the ``parent`` chain (the protocol node holding the data)."""
    while "parent" in entry:
        entry = entry["parent"]
    return entry.get("node-name")


def disk_source(top: str, leaf: str, nodes: dict[str, dict[str, Any]],
                cwd: str | None = None) -> DiskSource:
    """The source libvirt would have in its XML for a disk whose format node is ``top``.

    A relative filename is taken relative to ``cwd``, the daemon's working directory.
    """
    leaf_info = nodes.get(leaf, {})
    drv = leaf_info.get("drv", "")
    if drv == "file":
        kind = SOURCE_FILE
    elif drv in _BLOCK_DRIVERS:
        kind = SOURCE_BLOCK
    else:
        kind = SOURCE_NETWORK
    top_drv = nodes.get(top, {}).get("drv", "raw")
    # libvirt opens a raw disk without a format layer: the top node is then the protocol node.
    fmt = "raw" if top == leaf else top_drv
    path = leaf_info.get("file") or None
    if path and cwd and kind != SOURCE_NETWORK:
        path = os.path.join(cwd, path)
    return DiskSource(path, kind, fmt)


def running_block_info(name: str, blockstats: list[dict[str, Any]],
                       blockstats_nodes: list[dict[str, Any]],
                       named_nodes: list[dict[str, Any]], *, cwd: str | None = None,
                       stat_fn: Callable[[DiskSource], SourceStat | None] = stat_source
                       ) -> BlockInfo:
    """virDomainGetBlockInfo for the disk whose top node (or BlockBackend) is ``name``.

    ``blockstats``/``blockstats_nodes`` are the replies of query-blockstats without and with
    ``query-nodes``; ``named_nodes`` is query-named-block-nodes {flat: true}; ``cwd`` is the
    daemon's working directory (for relative filenames).  ``stat_fn`` measures the source (tests
    pass their own numbers).  Raises KeyError with libvirt's message when ``name`` is unknown.
    """
    table = _entries_by_name(blockstats, blockstats_nodes)
    if name not in table:
        raise KeyError(f"cannot find statistics for device '{name}'")
    top = table[name].get("node-name", name)
    # With -blockdev, capacity, physical and wr_highest_offset come from the top node's entry.
    entry = table.get(top, table[name])
    nodes = {n["node-name"]: n for n in named_nodes if n.get("node-name")}
    image = nodes.get(top, {}).get("image")
    if image is None:
        raise KeyError(f"cannot find capacity of node '{top}'")
    capacity = image["virtual-size"]
    # "if actual-size is missing, image is not thin provisioned"
    qemu_physical = image.get("actual-size", capacity)
    parent_stats = entry.get("parent", {}).get("stats", {})
    wr_valid = "wr_highest_offset" in parent_stats
    wr_highest = parent_stats.get("wr_highest_offset", 0)
    source = disk_source(top, _protocol_leaf(entry) or top, nodes, cwd)

    if not wr_valid:
        allocation, allocation_from = qemu_physical, "actual-size"
    elif source.type == SOURCE_FILE and source.format == "qcow2":
        allocation, allocation_from = qemu_physical, "actual-size"
    else:
        allocation, allocation_from = wr_highest, "wr_highest_offset"

    st = stat_fn(source)
    # A zero or an allocation equal to QEMU's physical means a sparse source: libvirt then
    # refreshes physical from the source itself, keeping QEMU's value if that fails.
    if qemu_physical == 0 or allocation == 0 or allocation == qemu_physical:
        if allocation == 0:
            allocation, allocation_from = qemu_physical, "actual-size"
        if st is not None:
            physical, physical_from = st.size, _size_origin(source)
        else:
            physical, physical_from = qemu_physical, "actual-size"
    else:
        physical, physical_from = qemu_physical, "actual-size"
    return BlockInfo(capacity, allocation, physical, source, allocation_from, physical_from,
                     host_allocated=st.allocated if st else None,
                     wr_highest_offset=wr_highest if wr_valid else None)


def _size_origin(source: DiskSource) -> str:
    return "lseek" if source.type == SOURCE_BLOCK else "st_size"


# -- offline image (qemuStorageLimitsRefresh) --------------------------------------------------

def header_capacity(path: str, fmt: str) -> int:
    """Virtual size from the image header (qcow2.txt "Header": ``size``); 0 if unknown.

    Raises QBlockError with QEMU's message for a header QEMU would refuse.
    """
    if fmt != "qcow2":
        return 0
    with open(path, "rb") as f:
        buf = f.read(1 << MAX_CLUSTER_BITS)
    return Qcow2Header.parse(buf, check=True).size


def offline_block_info(path: str, fmt: str | None = None) -> BlockInfo:
    """virDomainGetBlockInfo of an inactive domain's disk ``path`` (format probed if None).

    Regular file: allocation = st_blocks·512, physical = capacity = st_size, then capacity from
    the header for non-raw formats (physical if the header says 0).  Block device: all three are
    the end offset, capacity from the header, allocation 0 for non-raw formats.
    """
    fmt = fmt or probe_format(path)
    st = os.stat(path)
    is_block = stat.S_ISBLK(st.st_mode)
    source = DiskSource(path, SOURCE_BLOCK if is_block else SOURCE_FILE, fmt)
    measured = stat_source(source)
    if measured is None:
        raise OSError(f"cannot stat '{path}'")
    if is_block:
        physical = allocation = capacity = measured.size
        allocation_from = physical_from = "lseek"
    else:
        physical = capacity = measured.size
        allocation = st.st_blocks * 512
        allocation_from, physical_from = "st_blocks", "st_size"
    if fmt != "raw":
        capacity = header_capacity(path, fmt) or physical
        if is_block:
            allocation, allocation_from = 0, "none"
    return BlockInfo(capacity, allocation, physical, source, allocation_from, physical_from,
                     host_allocated=measured.allocated)


# -- output (virsh cmdDomblkinfo) -------------------------------------------------------------

def pretty_capacity(value: int) -> tuple[float, str]:
    """virsh's vshPrettyCapacity: value scaled to B, KiB, ... EiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    limit = 1024
    for unit in units:
        if value < limit:
            return (value if unit == "B" else value / (limit / 1024)), unit
        limit *= 1024
    return value / (limit / 1024), "EiB"


def _fmt(value: int, human: bool) -> str:
    if not human:
        return str(value)
    scaled, unit = pretty_capacity(value)
    return f"{scaled:.3f} {unit}"


def format_block_info(info: BlockInfo, human: bool = False) -> list[str]:
    """virsh domblkinfo's three lines (``%-15s %s``), then the host bytes really allocated."""
    values = [("Capacity:", info.capacity), ("Allocation:", info.allocation),
              ("Physical:", info.physical)]
    if info.capacity == 0 and info.allocation == 0 and info.physical == 0:
        lines = [f"{label:<15} -" for label, _ in values]
    else:
        lines = [f"{label:<15} {_fmt(value, human)}" for label, value in values]
    host = "-" if info.host_allocated is None else _fmt(info.host_allocated, human)
    lines.append(f"{'Host allocated:':<15} {host}")
    return lines


_ALLOCATION_NOTES = {
    "actual-size": "QEMU's actual-size: bytes the host filesystem has allocated to the image "
                   "file (st_blocks*512, what du shows)",
    "st_blocks": "st_blocks*512 of the image file: bytes the host filesystem has allocated (du)",
    "lseek": "the device size: a block device is allocated in full",
    "none": "0: libvirt does not measure a non-raw image on a block device offline",
}
_PHYSICAL_NOTES = {
    "st_size": "st_size of the image file (ls -l): its length, holes included",
    "lseek": "the end offset of the block device",
    "actual-size": "QEMU's actual-size (the source could not be measured from here)",
}


def explain(info: BlockInfo) -> list[str]:
    """A short note on what each number means for this kind of disk."""
    src = info.source
    origin = "the image header" if src.format != "raw" else "the size of the raw source"
    lines = [f"Capacity   = guest-visible size, from {origin}; not what the guest uses."]
    if info.allocation_from == "wr_highest_offset":
        lines.append("Allocation = wr_highest_offset: the highest host offset written since the "
                     "daemon opened the node; for a raw file or block device it tells how far "
                     "a thin volume has been filled, not what the guest uses.")
    else:
        lines.append(f"Allocation = {_ALLOCATION_NOTES[info.allocation_from]}.")
    lines.append(f"Physical   = {_PHYSICAL_NOTES[info.physical_from]}.")
    lines.append("Host allocated = st_blocks*512 of the source file now ('-' if it cannot be "
                 "measured here).")
    if src.format == "qcow2" and src.type == SOURCE_FILE:
        lines.append("For qcow2 on a file, Allocation counts the clusters the image has "
                     "allocated (data and metadata), never the guest filesystem's usage: it "
                     "grows as the guest writes new areas and shrinks only when discards reach "
                     "the file.")
    if info.allocation in (info.capacity, info.physical):
        lines.append("Equal numbers are legitimate: a fully allocated image (preallocated, "
                     "a non-sparse copy, every cluster written) has Allocation = Physical, and "
                     "for raw also = Capacity; without an actual-size from QEMU libvirt falls "
                     "back to Capacity.")
    return lines
