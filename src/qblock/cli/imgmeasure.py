"""``qblock img measure``: qemu-img 7.2's measure sub-command.

qemu-img.c img_measure() with the size calculations of block/raw-format.c raw_measure() and
block/qcow2.c qcow2_measure() / qcow2_calc_prealloc_size(), qcow2-refcount.c
qcow2_refcount_metadata_size() and qcow2-bitmap.c qcow2_get_persistent_dirty_bitmap_size().
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from qblock import api
from qblock.block import io
from qblock.block.node import BlockNode
from qblock.cli import imgcreate, imgfmt
from qblock.cli.imgerr import CommandFailed, error, getopt_args, object_unsupported
from qblock.drivers.base import Status
from qblock.drivers.qcow2.cluster import COMPRESSED, DATA, L1E_OFFSET_MASK, UNALLOC
from qblock.drivers.qcow2.snapshot import SnapshotInfo
from qblock.errors import QBlockError
from qblock.keyval import KeyvalError, parse_keyval
from qblock.qobject import to_json

# The file protocol's creation options besides size, which qemu-img adds to every format's.
_FILE_KINDS = ("preallocation", "nocow", "extent_size_hint")
_QCOW2_VERSIONS = {"0.10": 2, "1.1": 3}  # qcow2_opt_get_version_del(): no v2/v3 aliases
_PREALLOC = ("off", "metadata", "falloc", "full")
QCOW_MAX_L1_SIZE = 32 * 1024 * 1024
BME_TABLE_ENTRY_SIZE = 8
BITMAP_DIR_ENTRY_SIZE = 24  # sizeof(Qcow2BitmapDirEntry)


class MeasureError(ValueError):
    """A measurement that cannot be made; the message is QEMU's."""


# -- size calculations -----------------------------------------------------------------------
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous_increase: bool = False) -> int:
    """qcow2_refcount_metadata_size(): refcount table and blocks for ``clusters`` clusters,
    found as the fixed point where the refcount structures also count themselves."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += -(-table // 2)
            n = 0
            generous_increase = False
        elif n == last:
            return (blocks + table) * cluster_size


def calc_prealloc_size(total_size: int, cluster_size: int, refcount_order: int,
                       extended_l2: bool) -> int:
    """qcow2_calc_prealloc_size(): the file size of a fully allocated image."""
    aligned = _round_up(total_size, cluster_size)
    l2e_size = 16 if extended_l2 else 8
    meta = cluster_size  # the header
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e_size)
    meta += nl2e * l2e_size
    nl1e = _round_up(nl2e * l2e_size // cluster_size, cluster_size // 8)
    meta += nl1e * 8
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                   refcount_order)
    return meta + aligned


def persistent_bitmaps_size(node: BlockNode, cluster_size: int) -> int:
    """qcow2_get_persistent_dirty_bitmap_size(): clusters for the data, the bitmap tables
    and the directory of every persistent bitmap of ``node``, assumed fully allocated."""
    total = dir_size = 0
    for bitmap in node.dirty_bitmaps:
        if not bitmap.persistent:
            continue
        nbytes = -(-(-(-bitmap.size // bitmap.granularity)) // 8)
        nclusters = -(-nbytes // cluster_size)
        total += nclusters * cluster_size
        total += _round_up(nclusters * BME_TABLE_ENTRY_SIZE, cluster_size)
        dir_size += _round_up(BITMAP_DIR_ENTRY_SIZE + len(bitmap.name.encode()), 8)
    return total + _round_up(dir_size, cluster_size)


async def _allocated_bytes(node: BlockNode, size: int, cluster_size: int) -> int:
    """qcow2_measure()'s walk over the source: whole clusters touched by data, through the
    backing chain; zero ranges are skipped (safe without a backing file in the target)."""
    required = 0
    offset = 0
    while offset < size:
        st, _ = await io.block_status_above(node, None, offset, size - offset)
        pnum = st.pnum
        if st.status & Status.ZERO:
            pass
        elif st.status & Status.DATA and st.status & Status.ALLOCATED:
            pnum = _round_up(offset + pnum, cluster_size) - offset
            required += offset % cluster_size + pnum
        offset += pnum
    return required


def _touched_clusters(extents: list[tuple[int, int]], cluster_size: int) -> int:
    """Bytes of the target clusters that the sorted data ``extents`` (start, end) touch:
    what qcow2_measure()'s walk adds up, as it rounds every data extent out to clusters."""
    total = last_end = 0
    for start, end in extents:
        first = max(start // cluster_size, last_end)
        stop = -(-end // cluster_size)
        if stop > first:
            total += stop - first
            last_end = stop
    return total * cluster_size


async def snapshot_required(node: BlockNode, sn: SnapshotInfo, cluster_size: int) -> int:
    """qcow2_measure()'s walk over an internal snapshot (qemu-img measure -l): the
    snapshot's own L1/L2 tables, and the backing chain where it has no cluster."""
    drv = node.drv
    h = drv.header
    size = node.length()
    unit = h.subcluster_size
    per_l2 = h.l2_entries * h.subclusters_per_cluster
    n_units = -(-size // unit)
    kinds = np.full(n_units, UNALLOC, dtype=np.int8)
    raw = await io.pread(drv.file, sn.l1_table_offset, sn.l1_size * 8)
    l1 = np.frombuffer(bytes(raw), dtype=">u8").astype(np.uint64)
    for i in np.flatnonzero(l1 & np.uint64(L1E_OFFSET_MASK)).tolist():
        first = i * per_l2
        if first >= n_units:
            break
        l2_offset = int(l1[i]) & L1E_OFFSET_MASK
        table = drv.map.decode_l2(bytes(await io.pread(drv.file, l2_offset, h.cluster_size)))
        kind, _ = drv.map.classify(table, l2_offset, 0)
        kinds[first:first + per_l2] = kind[:n_units - first]
    data = (kinds == DATA) | (kinds == COMPRESSED)
    extents = _runs(data, unit, size)
    backing = node.backing
    if backing is not None:
        for start, end in _runs(kinds == UNALLOC, unit, min(size, backing.node.length())):
            offset = start
            while offset < end:
                st, _ = await io.block_status_above(backing.node, None, offset, end - offset)
                if not st.status & Status.ZERO and st.status & Status.DATA and \
                        st.status & Status.ALLOCATED:
                    extents.append((offset, offset + st.pnum))
                offset += st.pnum
    return _touched_clusters(sorted(extents), cluster_size)


def _runs(mask: np.ndarray, unit: int, limit: int) -> list[tuple[int, int]]:
    """Byte ranges (start, end) of the runs of True units in ``mask``, cut at ``limit``."""
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    starts = np.flatnonzero(edges == 1) * unit
    ends = np.minimum(np.flatnonzero(edges == -1) * unit, limit)
    return [(int(a), int(b)) for a, b in zip(starts, ends) if b > a]


def find_snapshot(node: BlockNode, spec: str) -> SnapshotInfo:
    """bdrv_snapshot_load_tmp_by_id_or_name() / the snapshot.id=,snapshot.name= form."""
    from qblock.drivers.qcow2.snapshot_ops import find_by_id_and_name

    if node.drv.format_name != "qcow2":
        raise MeasureError(f"Block format '{node.drv.format_name}' used by device '' does not "
                           "support temporarily loading internal snapshots")
    if spec.startswith("snapshot."):
        fields: dict[str, str] = {}
        for item in spec.split(","):
            key, _, value = item.partition("=")
            if key not in ("snapshot.id", "snapshot.name"):
                raise ValueError(f"Invalid parameter '{key}'")
            fields[key] = value
        index = find_by_id_and_name(node.drv, fields.get("snapshot.id"),
                                    fields.get("snapshot.name"))
    else:
        index = find_by_id_and_name(node.drv, spec, None)
        if index < 0:
            index = find_by_id_and_name(node.drv, None, spec)
    if index < 0:
        raise MeasureError("Can't find snapshot")
    return node.drv.snapshots[index]


def _qcow2_geometry(opts: dict[str, Any]) -> tuple[int, int, int, bool, str, bool]:
    """The option checks of qcow2_measure(), in its order, with its messages.

    Returns (cluster_size, version, refcount_bits, extended_l2, prealloc, has_backing).
    """
    extended_l2 = bool(opts.get("extended_l2", False))
    cluster_size = opts.get("cluster_size", 65536)
    bits = (cluster_size & -cluster_size).bit_length() - 1 if cluster_size else 32
    if bits < 9 or bits > 21 or 1 << bits != cluster_size:
        raise MeasureError("Cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cluster_size < 512 * 32:
        raise MeasureError("Extended L2 entries are only supported with cluster sizes of at "
                           f"least {512 * 32} bytes")
    compat = opts.get("compat")
    if compat is not None and compat not in _QCOW2_VERSIONS:
        raise MeasureError(f"Invalid compatibility level: '{compat}'")
    version = _QCOW2_VERSIONS.get(compat, 3) if compat is not None else 3
    refcount_bits = opts.get("refcount_bits", 16)
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise MeasureError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise MeasureError("Different refcount widths than 16 bits require compatibility "
                           "level 1.1 or above (use compat=1.1 or greater)")
    prealloc = opts.get("preallocation", "off")
    if prealloc not in _PREALLOC:
        raise MeasureError(f"invalid parameter value: {prealloc}")
    if opts.get("encrypt.format") is not None or opts.get("encryption"):
        raise MeasureError("qblock cannot measure encrypted images")
    return cluster_size, version, refcount_bits, extended_l2, prealloc, "backing_file" in opts


async def qcow2_measure(opts: dict[str, Any], src: BlockNode | None,
                        snapshot: SnapshotInfo | None = None) -> dict[str, int]:
    """qcow2_measure(): BlockMeasureInfo for a qcow2 image made with ``opts`` (from ``src``,
    or from its internal ``snapshot``)."""
    cluster_size, version, refcount_bits, extended_l2, prealloc, has_backing = \
        _qcow2_geometry(opts)
    l2e_size = 16 if extended_l2 else 8
    virtual_size = _round_up(opts.get("size", 0), cluster_size)
    l2_tables = -(-(virtual_size // cluster_size) // (cluster_size // l2e_size))
    if l2_tables * 8 > QCOW_MAX_L1_SIZE:
        raise MeasureError("The image size is too large (try using a larger cluster size)")
    required = 0
    if src is not None:
        # qcow2_snapshot_load_tmp() swaps the L1 table but keeps the image's length.
        size = src.length()
        virtual_size = _round_up(size, cluster_size)
        if has_backing:
            # The new backing file may share nothing with the source: count everything.
            required = virtual_size
        elif snapshot is not None:
            required = await snapshot_required(src, snapshot, cluster_size)
        else:
            required = await _allocated_bytes(src, size, cluster_size)
    if prealloc in ("full", "falloc"):
        required = virtual_size
    full = calc_prealloc_size(virtual_size, cluster_size, refcount_bits.bit_length() - 1,
                              extended_l2)
    # The metadata of the fully allocated image is counted even where it is not needed.
    info = {"required": full - virtual_size + required, "fully-allocated": full}
    if (version >= 3 and src is not None and src.drv.format_name == "qcow2"
            and src.drv.header.version >= 3):
        info["bitmaps"] = persistent_bitmaps_size(src, cluster_size)
    return info


def raw_measure(opts: dict[str, Any], src: BlockNode | None) -> dict[str, int]:
    """raw_measure(): the virtual size, which a raw file needs in full."""
    required = src.length() if src is not None else _round_up(opts.get("size", 0), 512)
    return {"required": required, "fully-allocated": required}


# -- command line ----------------------------------------------------------------------------
def _parse_create_options(out_fmt: str, text: str | None) -> dict[str, Any]:
    """QemuOpts parsing of ``-o`` against the format's and the file's creation options."""
    raw: dict[str, str] = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        raw[key] = value
    size = raw.pop("size", None)
    if out_fmt == "raw":
        for key in raw:
            if key not in _FILE_KINDS:
                raise imgcreate.CreateOptionError(f"Invalid parameter '{key}'")
    out = imgcreate.qcow2_create_kwargs(raw)
    if size is not None:
        try:
            out["size"] = imgfmt.parse_size(size)
        except (ValueError, OverflowError):
            raise imgcreate.CreateOptionError(
                "Parameter 'size' expects a non-negative number below 2^64\n"
                "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                "and exabytes, respectively.") from None
    return out


async def _open_source(filename: str, fmt: str | None, image_opts: bool,
                       share: bool) -> api.AsyncDisk:
    """img_open() read-only with the backing chain; QEMU's messages on failure."""
    try:
        if image_opts:
            target: Any = parse_keyval(filename)
            return await api.open_async(target, read_only=True, share=share)
        fmt = fmt or api.probe_format(filename)
        if fmt not in ("raw", "qcow2"):
            error(f"Unknown file format '{fmt}'")
            raise CommandFailed()
        return await api.open_async(filename, driver=fmt, read_only=True, share=share)
    except OSError as e:
        error(f"Could not open '{filename}': Could not open '{filename}': "
              f"{os.strerror(e.errno or 0)}")
    except (QBlockError, KeyvalError) as e:
        error(f"Could not open '{filename}': {e}")
    raise CommandFailed()


async def cmd_measure(argv: list[str]) -> int:
    """qemu-img measure [--output=ofmt] [-O fmt] [-o opts] [--size N | [-f fmt] FILE]."""
    opts, args = getopt_args(argv, "hf:O:o:l:U", ["help", "image-opts", "object=", "output=",
                                                  "size=", "force-share"])
    fmt = snapshot = options = None
    out_fmt, output, share, image_opts = "raw", "human", False, False
    size: int | None = None
    for o, v in opts:
        if o in ("-h", "--help"):
            print("usage: qblock img measure [--output=ofmt] [-O output_fmt] [-o options] "
                  "[--size N | [--image-opts] [-f fmt] [-l snapshot_param] filename]")
            return 0
        if o == "-f":
            fmt = v
        elif o == "-O":
            out_fmt = v
        elif o == "-o":
            options = v if options is None else f"{options},{v}"
        elif o == "-l":
            snapshot = v
        elif o in ("-U", "--force-share"):
            share = True
        elif o == "--object":
            raise object_unsupported()
        elif o == "--image-opts":
            image_opts = True
        elif o == "--output":
            if v not in ("human", "json"):
                error("--output must be used with human or json as argument.")
                return 1
            output = v
        elif o == "--size":
            try:
                size = imgfmt.parse_size(v)
            except (ValueError, OverflowError):
                error("Invalid image size specified. You may use k, M, G, T, P or E suffixes "
                      "for")
                error("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
                return 1
    if len(args) > 1:
        error("At most one filename argument is allowed.")
        return 1
    filename = args[0] if args else None
    if filename is None and (image_opts or fmt or snapshot):
        error("--image-opts, -f, and -l require a filename argument.")
        return 1
    if filename is not None and size is not None:
        error("--size N cannot be used together with a filename.")
        return 1
    if filename is None and size is None:
        error("Either --size N or one filename must be specified.")
        return 1
    disk = await _open_source(filename, fmt, image_opts, share) if filename else None
    try:
        sn = None
        if disk is not None and snapshot is not None:
            try:
                sn = find_snapshot(disk.node, snapshot)
            except ValueError as e:
                msg = str(e) if isinstance(e, MeasureError) else None
                if msg is None:
                    error(str(e))
                    error(f"Failed in parsing snapshot param '{snapshot}'")
                else:
                    error(f"Failed to load snapshot: {msg}")
                return 1
        info = await _measure(out_fmt, options, size, disk, sn)
    finally:
        if disk is not None:
            await disk.close()
    if output == "human":
        print(f"required size: {info['required']}")
        print(f"fully allocated size: {info['fully-allocated']}")
        if "bitmaps" in info:
            print(f"bitmaps size: {info['bitmaps']}")
    else:
        print(to_json(info, pretty=True))
    return 0


async def _measure(out_fmt: str, options: str | None, size: int | None,
                   disk: api.AsyncDisk | None, sn: SnapshotInfo | None) -> dict[str, int]:
    if out_fmt not in ("raw", "qcow2"):
        error(f"Unknown file format '{out_fmt}'")
        raise CommandFailed()
    try:
        opts = _parse_create_options(out_fmt, options)
    except imgcreate.CreateOptionError as e:
        error(str(e))
        error(f"Invalid options for file format '{out_fmt}'")
        raise CommandFailed() from None
    if size is not None:
        opts["size"] = size
    src = disk.node if disk is not None else None
    try:
        if out_fmt == "raw":
            return raw_measure(opts, src)
        return await qcow2_measure(opts, src, sn)
    except (MeasureError, QBlockError) as e:
        error(str(e))
        raise CommandFailed() from None
