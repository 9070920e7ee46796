"""Format probing (block.c bdrv_probe_all): which driver an image file needs, from its bytes."""
from __future__ import annotations

QCOW2_MAGIC = b"QFI\xfb"  # qcow2.txt "Header": magic


def probe_format(filename: str) -> str:
    """qcow2 when the file starts with the qcow2 magic, otherwise raw (as QEMU falls back).

    Raises OSError when the file cannot be read.
    """
    with open(filename, "rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"
