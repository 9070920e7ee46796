"""BlockNode: QEMU's BlockDriverState, one node of the block graph.

A node has a node-name, a driver instance (the per-node state QEMU keeps in ``bs->opaque``),
the options it was opened with, its children by name and the edges of its parents.
"""
from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Any

from qblock.block.graph import (BdrvChild, attach_child, cumulative_perms, detach_child,
                                refresh_perms)
from qblock.block.perm import Perm, Role, default_child_perms
from qblock.errors import InvalidArgument, NodeInUse, NodeNotFound

SECTOR_SIZE = 512  # BDRV_SECTOR_SIZE

if TYPE_CHECKING:
    from qblock.block.dirty_bitmap import DirtyBitmap
    from qblock.drivers.base import BlockDriver

# util/id.c id_wellformed(): a letter first, then letters, digits, '-', '.', '_'.
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
NODE_NAME_MAX = 31  # block.c: strlen(node_name) >= sizeof(bs->node_name) (32) is an error


def check_node_name(name: str) -> None:
    """Raise unless ``name`` is a valid user-chosen node-name (block.c bdrv_assign_node_name)."""
    if not _ID_RE.match(name):
        raise InvalidArgument(f"Invalid node-name: '{name}'")
    if len(name) > NODE_NAME_MAX:
        raise InvalidArgument("Node name too long")


class NodeRegistry:
    """All named nodes of this process (block.c graph_bdrv_states)."""

    def __init__(self) -> None:
        self.nodes: dict[str, BlockNode] = {}
        self._counter = 0

    def implicit_name(self) -> str:
        """QEMU's generated names: ``#block``, a counter from 0, two random digits (util/id.c)."""
        while True:
            name = f"#block{self._counter}{random.randrange(100):02d}"
            self._counter += 1
            if name not in self.nodes:
                return name

    def add(self, node: BlockNode) -> None:
        if node.node_name in self.nodes:
            raise InvalidArgument(f"Duplicate nodes with node-name='{node.node_name}'")
        self.nodes[node.node_name] = node

    def remove(self, node: BlockNode) -> None:
        if self.nodes.get(node.node_name) is node:
            del self.nodes[node.node_name]

    def find(self, name: str) -> BlockNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise NodeNotFound(f"Cannot find device='' nor node-name='{name}'") from None

    def lookup(self, name: str) -> BlockNode | None:
        return self.nodes.get(name)


registry = NodeRegistry()


class BlockNode:
    """One node: a format, protocol or filter driver instance with its place in the graph."""

    def __init__(self, drv: BlockDriver, options: dict[str, Any], *, node_name: str | None = None,
                 read_only: bool = False, cache_direct: bool = False, cache_no_flush: bool = False,
                 detect_zeroes: str = "off") -> None:
        if node_name is None:
            node_name = registry.implicit_name()
            self.implicit_name = True
        else:
            check_node_name(node_name)
            self.implicit_name = False
        self.node_name = node_name
        self.drv = drv
        self.options = options
        self.read_only = read_only
        self.cache_direct = cache_direct
        self.cache_no_flush = cache_no_flush
        self.detect_zeroes = detect_zeroes
        self.children: dict[str, BdrvChild] = {}
        self.parents: list[BdrvChild] = []
        self.monitor_owned = False
        self.unmap = False  # discard=unmap (BDRV_O_UNMAP): discards reach the driver
        self.force_share = False  # force-share=on: every user of this node shares everything
        self.closed = False
        self.wr_highest_offset = 0
        self.write_threshold = 0
        self.dirty_bitmaps: list[DirtyBitmap] = []
        self.in_flight = 0
        self.tracked: list[Any] = []  # block/io.py TrackedRequest
        self.filename = ""
        self.request_alignment = 1
        self.max_transfer = 0

    def __repr__(self) -> str:
        return f"<BlockNode {self.node_name} driver={self.drv.format_name}>"

    # -- as a parent -------------------------------------------------------------------------
    def parent_desc(self) -> str:
        return f"node '{self.node_name}'"

    def cumulative_perms(self) -> tuple[Perm, Perm]:
        """What all parents take together, and what they all share."""
        return cumulative_perms(self.parents, {})

    def child_perms(self, edge: BdrvChild) -> tuple[Perm, Perm]:
        return self.child_perms_for(edge, *self.cumulative_perms())

    def child_perms_for(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """What this node asks of ``edge``'s child given its own cumulative permissions."""
        return self.drv.child_perm(edge, perm, shared)

    def default_child_perms(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        return default_child_perms(edge.role, perm, shared, writable=not self.read_only)

    # -- children ----------------------------------------------------------------------------
    def add_child(self, child: BlockNode, name: str, role: Role) -> BdrvChild:
        if name in self.children:
            raise InvalidArgument(f"Node '{self.node_name}' already has a '{name}' child")
        edge = attach_child(self, child, name, role)
        self.children[name] = edge
        return edge

    def remove_child(self, name: str) -> BlockNode:
        edge = self.children.pop(name)
        detach_child(edge)
        return edge.node

    def child(self, name: str) -> BdrvChild | None:
        return self.children.get(name)

    @property
    def file(self) -> BdrvChild | None:
        return self.children.get("file")

    @property
    def backing(self) -> BdrvChild | None:
        return self.children.get("backing")

    def set_backing(self, node: BlockNode | None) -> BlockNode | None:
        """Attach ``node`` as the COW child or drop the link (block.c bdrv_set_backing_hd).

        Returns the former backing node; the caller releases it with ``unref_if_unused``.
        """
        old = self.children.get("backing")
        if old is not None:
            if old.frozen:
                raise NodeInUse(f"Cannot change 'backing' link from '{self.node_name}' "
                                f"to '{old.node.node_name}'")
            self.remove_child("backing")
        if node is not None:
            try:
                self.add_child(node, "backing", Role.COW)
            except Exception:
                if old is not None:
                    self.children["backing"] = attach_child(self, old.node, "backing", Role.COW)
                raise
        return old.node if old is not None else None

    def child_with_role(self, roles: Role) -> BdrvChild | None:
        """The first child whose role has any of ``roles`` (QEMU keeps at most one of each)."""
        bits = int(roles)  # int arithmetic: Flag.__and__ is slow on the request path
        for edge in self.children.values():
            if int(edge.role) & bits:
                return edge
        return None

    def primary_child(self) -> BdrvChild | None:
        return self.child_with_role(Role.PRIMARY)

    def filtered_child(self) -> BdrvChild | None:
        return self.child_with_role(Role.FILTERED)

    def cow_child(self) -> BdrvChild | None:
        return self.child_with_role(Role.COW)

    def storage_child(self) -> BdrvChild | None:
        """The child holding the data (qcow2 'file', raw 'file'), not the backing."""
        return self.child_with_role(Role.DATA | Role.FILTERED)

    def backing_chain(self) -> list[BlockNode]:
        """This node and every node below it through COW or filter links."""
        chain = [self]
        node = self
        while True:
            edge = node.cow_child() or node.filtered_child()
            if edge is None:
                return chain
            node = edge.node
            chain.append(node)

    # -- state -------------------------------------------------------------------------------
    def length(self) -> int:
        """bdrv_getlength(): the driver's length in whole sectors (block.c keeps
        total_sectors = DIV_ROUND_UP(length, BDRV_SECTOR_SIZE)); the tail reads as zeroes."""
        return -(-self.drv.getlength() // SECTOR_SIZE) * SECTOR_SIZE

    def set_read_only(self, read_only: bool) -> None:
        """Reopen read-only or read-write (block.c bdrv_reopen_set_read_only)."""
        if read_only == self.read_only:
            return
        if read_only and any(e.perm & (Perm.WRITE | Perm.RESIZE) for e in self.parents):
            raise NodeInUse(f"Node '{self.node_name}' is in use for writing")
        # bdrv_reopen_queue_child(): a file child only this node uses becomes writable with
        # it (it stays so when the node goes back: the format may still flush tables to it)
        storage = self.file
        if not read_only and storage is not None and len(storage.node.parents) == 1:
            storage.node.set_read_only(False)
        self.drv.reopen_read_only(read_only)
        self.read_only = read_only
        refresh_perms([self])


async def unref_if_unused(node: BlockNode | None) -> None:
    """Close a node once nobody uses it (bdrv_unref dropping the last reference)."""
    if node is not None and not node.parents and not node.monitor_owned and not node.closed:
        await close_node(node)


async def close_node(node: BlockNode) -> None:
    """Flush and close ``node``, then release the children only it used (block.c bdrv_close)."""
    if node.parents:
        raise NodeInUse(f"Node '{node.node_name}' is in use")
    if node.closed:
        return
    node.closed = True
    try:
        await node.drv.close()
    finally:
        registry.remove(node)
        for name in list(node.children):
            await unref_if_unused(node.remove_child(name))
