"""ImageInfo for ``qblock img info`` (block/qapi.c bdrv_query_image_info, QEMU 7.2 shape).

Dicts are built in QAPI field order, so ``qobject.to_json`` prints QEMU's key order.  qcow2
metadata (header, snapshot table, bitmap directory) is read from the image file itself, the
way qemu-img opens an image for info: without its backing file and without guest I/O.
"""
from __future__ import annotations

import os
import struct
from typing import Any

from qblock.block import io
from qblock.block.graph import BdrvChild
from qblock.drivers.qcow2.header import AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, Qcow2Header

_SNAPSHOT = struct.Struct(">QIHHIIQII")  # qcow2.txt "Snapshot table entry"
_BITMAP_DIR = struct.Struct(">QIIBBHI")  # qcow2.txt "Bitmap directory entry"
BME_FLAG_IN_USE = 1
BME_FLAG_AUTO = 2


def path_combine(base: str, name: str) -> str:
    """block.c path_combine(): ``name`` relative to the directory of ``base``."""
    if os.path.isabs(name):
        return name
    slash = base.rfind("/")
    return base[:slash + 1] + name if slash >= 0 else name


async def read_snapshots(file: BdrvChild, h: Qcow2Header) -> list[dict[str, Any]]:
    """SnapshotInfo list from the snapshot table (qcow2.txt "Snapshot table")."""
    out = []
    offset = h.snapshots_offset
    for _ in range(h.nb_snapshots):
        head = bytes(await io.pread(file, offset, _SNAPSHOT.size))
        (_l1, _l1s, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra_len) = _SNAPSHOT.unpack(head)
        extra = bytes(await io.pread(file, offset + _SNAPSHOT.size, extra_len))
        strings = bytes(await io.pread(file, offset + _SNAPSHOT.size + extra_len,
                                       id_len + name_len))
        if extra_len >= 8:
            vm_state = struct.unpack_from(">Q", extra)[0]
        icount = struct.unpack_from(">q", extra, 16)[0] if extra_len >= 24 else -1
        sn: dict[str, Any] = {
            "id": strings[:id_len].decode("utf-8", "replace"),
            "name": strings[id_len:].decode("utf-8", "replace"),
            "vm-state-size": vm_state, "date-sec": date_sec, "date-nsec": date_nsec,
            "vm-clock-sec": vm_clock // 1_000_000_000,
            "vm-clock-nsec": vm_clock % 1_000_000_000}
        if icount != -1:
            sn["icount"] = icount
        out.append(sn)
        offset += (_SNAPSHOT.size + extra_len + id_len + name_len + 7) & ~7
    return out


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
    """qcow2.c qcow2_get_specific_info(): ImageInfoSpecificQCow2."""
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
    data["compression-type"] = h.compression_name
    return {"type": "qcow2", "data": data}


async def image_info(filename: str, fmt: str, file: BdrvChild) -> dict[str, Any]:
    """ImageInfo of the image at ``filename`` whose file node is behind ``file``."""
    info: dict[str, Any] = {"filename": filename, "format": fmt, "dirty-flag": False}
    allocated = file.node.drv.allocated_file_size()
    if fmt == "raw":
        if allocated is not None:
            info["actual-size"] = allocated
        info["virtual-size"] = file.node.length()
        return info
    h = await read_header(file)
    info["dirty-flag"] = h.dirty
    if allocated is not None:
        info["actual-size"] = allocated
    info["virtual-size"] = h.size
    info["cluster-size"] = h.cluster_size
    if h.crypt_method:
        info["encrypted"] = True
    if h.backing_file:
        info["backing-filename"] = h.backing_file
        info["full-backing-filename"] = path_combine(filename, h.backing_file)
        if h.backing_format:
            info["backing-filename-format"] = h.backing_format
    snapshots = await read_snapshots(file, h)
    if snapshots:
        info["snapshots"] = snapshots
    info["format-specific"] = await qcow2_specific(file, h)
    return info


async def read_header(file: BdrvChild) -> Qcow2Header:
    """Parse the header cluster (a check-mode parse: as tolerant as qemu-img check's open)."""
    head = bytes(await io.pread(file, 0, 512))
    cluster_bits = min(max(struct.unpack_from(">I", head, 20)[0], 9), 21)
    return Qcow2Header.parse(bytes(await io.pread(file, 0, 1 << cluster_bits)), check=True)
