"""Persistent dirty bitmaps as far as the core driver goes (QEMU block/qcow2-bitmap.c).

The driver keeps the bitmaps extension, directory and tables intact but does not track
writes in them.  So, like QEMU on a writable open, it sets the ``in_use`` flag of every
bitmap: from then on the bitmaps read as inconsistent instead of silently missing writes
(qcow2.txt "Bitmap directory": in_use means the bitmap data may be stale).
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from qblock.block import io
from qblock.drivers.qcow2.header import AUTOCLEAR_BITMAPS

if TYPE_CHECKING:
    from qblock.drivers.qcow2.driver import Qcow2Driver

_ENTRY = struct.Struct(">QIIBBHI")  # qcow2.txt "Bitmap directory entry", 24 bytes
BME_FLAG_IN_USE = 1


async def mark_bitmaps_in_use(drv: Qcow2Driver) -> None:
    """Set in_use on every bitmap, updating the directory in place like QEMU.

    update_ext_header_and_dir_in_place(): clear the autoclear bit (header synced), rewrite
    the directory, set the bit again.
    """
    h = drv.header
    bitmaps = h.bitmaps
    if bitmaps is None or not h.autoclear_features & AUTOCLEAR_BITMAPS:
        return
    offset, size = bitmaps.bitmap_directory_offset, bitmaps.bitmap_directory_size
    directory = bytearray(await io.pread(drv.file, offset, size))
    pos = 0
    changed = False
    for _ in range(bitmaps.nb_bitmaps):
        if pos + _ENTRY.size > len(directory):
            return  # a broken directory is left alone; the checker reports it
        _, _, flags, _, _, name_size, extra = _ENTRY.unpack_from(directory, pos)
        if not flags & BME_FLAG_IN_USE:
            struct.pack_into(">I", directory, pos + 12, flags | BME_FLAG_IN_USE)
            changed = True
        pos += -(-(_ENTRY.size + extra + name_size) // 8) * 8
    if not changed:
        return
    h.autoclear_features &= ~AUTOCLEAR_BITMAPS
    await drv.update_header()
    await io.flush(drv.file.node)
    await drv.overlap_check(offset, size, ignore="bitmap_directory")
    await io.pwritev(drv.file, offset, directory)
    await io.flush(drv.file.node)
    h.autoclear_features |= AUTOCLEAR_BITMAPS
    await drv.update_header()
    await io.flush(drv.file.node)
