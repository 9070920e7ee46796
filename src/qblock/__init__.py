"""qblock: QEMU's block layer in Python — the node graph, qcow2, QMP, NBD and the tools.

The small public face: ``create`` makes an image, ``open``/``open_async`` give a disk object,
``blockalign`` a page-aligned buffer to read into and write from; errors derive from
``QBlockError``.  They are imported on first use (PEP 562), so a tool importing one
subpackage does not load the whole block layer first.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qblock.api import (AsyncDisk, Disk, create, create_async, open, open_async,
                            probe_format, run)
    from qblock.block.buffer import blockalign
    from qblock.errors import QBlockError

__all__ = ["AsyncDisk", "Disk", "QBlockError", "blockalign", "create", "create_async", "open",
           "open_async", "probe_format", "run"]
__version__ = "0.1.0"
_HOMES = {"QBlockError": "qblock.errors", "blockalign": "qblock.block.buffer"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'qblock' has no attribute {name!r}")
    module = importlib.import_module(_HOMES.get(name, "qblock.api"))
    return getattr(module, name)
