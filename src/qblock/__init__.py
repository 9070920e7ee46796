"""qblock: QEMU's block layer in Python — the node graph, qcow2, QMP, NBD and the tools.

The small public face: ``create`` makes an image, ``open``/``open_async`` give a disk object;
errors derive from ``QBlockError``.
"""
from qblock.api import (AsyncDisk, Disk, create, create_async, open, open_async, probe_format,
                        run)
from qblock.errors import QBlockError

__all__ = ["AsyncDisk", "Disk", "QBlockError", "create", "create_async", "open", "open_async",
           "probe_format", "run"]
__version__ = "0.1.0"
