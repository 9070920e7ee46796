"""Permissions and child roles (include/block/block-common.h, block.c bdrv_default_perms)."""
from __future__ import annotations

import enum


class Perm(enum.IntFlag):
    """BLK_PERM_*: what a parent does through an edge, or lets others do (shared).

    QEMU 7.0 removed BLK_PERM_GRAPH_MOD; qblock follows current QEMU and has no graph-mod bit.
    """

    CONSISTENT_READ = 0x1
    WRITE = 0x2
    WRITE_UNCHANGED = 0x4
    RESIZE = 0x8


PERM_ALL = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
PERM_NONE = Perm(0)

# QAPI BlockPermission names, in bit order.
PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent-read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write-unchanged",
    Perm.RESIZE: "resize",
}


def perm_names(perm: int) -> list[str]:
    """QAPI names of the bits in ``perm``, lowest bit first."""
    return [name for bit, name in PERM_NAMES.items() if perm & bit]


class Role(enum.IntFlag):
    """BdrvChildRole: what an edge's child is to its parent."""

    DATA = 1
    METADATA = 2
    FILTERED = 4
    COW = 8
    PRIMARY = 16


ROLE_IMAGE = Role.DATA | Role.METADATA | Role.PRIMARY
ROLE_FILTER = Role.FILTERED | Role.PRIMARY


def default_child_perms(role: Role, perm: Perm, shared: Perm, *, writable: bool) -> tuple[Perm, Perm]:
    """Permissions a node asks of a child from its own cumulative ``perm``/``shared``.

    block.c bdrv_default_perms(): filtered children pass permissions through; COW children are
    only read; storage children (file, data-file) need write and resize for metadata updates
    and do not let others write or resize underneath.
    """
    if role & Role.FILTERED:
        return perm & PERM_ALL, shared & PERM_ALL
    if role & Role.COW:
        child_perm = perm & Perm.CONSISTENT_READ
        child_shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        if shared & Perm.WRITE:
            child_shared |= Perm.WRITE | Perm.RESIZE
        return child_perm, child_shared
    child_perm, child_shared = perm & PERM_ALL, shared & PERM_ALL
    if role & Role.METADATA:
        if writable:
            child_perm |= Perm.WRITE | Perm.RESIZE
        child_perm |= Perm.CONSISTENT_READ
        child_shared &= ~(Perm.WRITE | Perm.RESIZE)
    if role & Role.DATA:
        child_shared &= ~Perm.RESIZE
        if child_perm & Perm.WRITE_UNCHANGED:
            child_perm |= Perm.WRITE
        if child_perm & Perm.WRITE:
            child_perm |= Perm.RESIZE
    return child_perm, child_shared
