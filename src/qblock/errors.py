"""One error hierarchy for qblock.

Every error carries the QMP error class it is reported as (qapi/error.json: GenericError,
CommandNotFound, DeviceNotFound, DeviceNotActive) and an errno for protocol layers (NBD replies,
qemu-io messages).  Messages follow QEMU's wording where QEMU has one.
"""
from __future__ import annotations

import errno as _errno


class QBlockError(Exception):
    """Base of every error qblock raises on purpose."""

    qmp_class = "GenericError"
    errno = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(QBlockError):
    """A caller passed a value that can never be valid (bad option, size, name)."""

    errno = _errno.EINVAL


class OutOfBounds(InvalidArgument):
    """A request reaches past the end of the node."""


class MisalignedRequest(InvalidArgument):
    """A request is not aligned to the node's request alignment."""


class ReadOnlyError(QBlockError):
    """A write-type request reached a read-only node or backend."""

    errno = _errno.EACCES


class PermissionConflict(QBlockError):
    """Two users of a node want incompatible permissions (block.c bdrv_check_perm)."""

    errno = _errno.EPERM


class NodeNotFound(QBlockError):
    """No node with the given node-name exists."""

    errno = _errno.ENOENT


class DeviceNotFound(QBlockError):
    """QMP DeviceNotFound (e.g. block-commit on an unknown device)."""

    qmp_class = "DeviceNotFound"
    errno = _errno.ENODEV


class NodeInUse(QBlockError):
    """A node still has users and cannot be removed or changed."""

    errno = _errno.EBUSY


class NotSupported(QBlockError):
    """The driver does not implement the operation."""

    errno = _errno.ENOTSUP


class ImageCorrupt(QBlockError):
    """On-disk metadata is inconsistent; the image must not be written."""

    errno = _errno.EIO


class LockError(QBlockError):
    """Another process holds a conflicting lock on an image file."""

    errno = _errno.EAGAIN
