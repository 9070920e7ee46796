"""qblock: QEMU's block layer in Python — the node graph, qcow2, QMP, NBD and the tools.

The small public face: ``create`` makes an image, ``open``/``open_async`` give a disk object;
errors derive from ``QBlockError``.  They are imported on first use (PEP 562), so a tool
importing one subpackage does not load the whole block layer first.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qblock.api import (AsyncDisk, Disk, create, create_async, open, open_async,
                            probe_format, run)
    from qblock.errors import QBlockError

__all__ = ["AsyncDisk", "Disk", "QBlockError", "create", "create_async", "open", "open_async",
           "probe_format", "run"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'qblock' has no attribute {name!r}")
    module = importlib.import_module("qblock.errors" if name == "QBlockError" else "qblock.api")
    return getattr(module, name)
