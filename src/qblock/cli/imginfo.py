"""ImageInfo for ``qblock img info``: the image file's header fed to block/qapi.py's builder.

qemu-img info reaches bdrv_query_image_info() like the monitor does; qblock reads the qcow2
header from the image file itself (a check-mode parse, as tolerant as qemu-img check's open,
without the backing file and without guest I/O) and builds the ImageInfo with the same code
as ``query-named-block-nodes``.
"""
from __future__ import annotations

import struct
from typing import Any

from qblock.block import io
from qblock.block.graph import BdrvChild
from qblock.block.qapi import getlength, path_combine, qcow2_image_info
from qblock.drivers.qcow2.header import Qcow2Header

__all__ = ["image_info", "path_combine", "read_header"]


async def image_info(filename: str, fmt: str, file: BdrvChild) -> dict[str, Any]:
    """ImageInfo of the image at ``filename`` whose file node is behind ``file``."""
    allocated = file.node.drv.allocated_file_size()
    if fmt == "raw":
        # a raw node forwards bdrv_get_info to file-posix: dirty-flag false, no cluster size
        info: dict[str, Any] = {"filename": filename, "format": fmt, "dirty-flag": False}
        if allocated is not None:
            info["actual-size"] = allocated
        info["virtual-size"] = getlength(file.node)
        return info
    return await qcow2_image_info(filename, await read_header(file), file, allocated)


async def read_header(file: BdrvChild) -> Qcow2Header:
    """Parse the header cluster (a check-mode parse: as tolerant as qemu-img check's open)."""
    head = bytes(await io.pread(file, 0, 512))
    cluster_bits = min(max(struct.unpack_from(">I", head, 20)[0], 9), 21)
    return Qcow2Header.parse(bytes(await io.pread(file, 0, 1 << cluster_bits)), check=True)
