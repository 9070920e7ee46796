"""The implicit filter nodes jobs insert above a node: ``commit_top`` and ``mirror_top``.

block/commit.c bdrv_commit_top and block/mirror.c bdrv_mirror_top: a filter whose only child is
``backing`` (FILTERED|PRIMARY).  Requests pass through; ``on_write`` tells a mirror which ranges
guest writes touched.  ``drain`` holds new requests back and waits for those in flight, so a job
can change the graph; ``release`` lets them continue on the node that took the filter's place.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from qblock.block import io
from qblock.block.graph import BdrvChild, replace_node
from qblock.block.node import BlockNode, close_node, registry
from qblock.block.perm import PERM_ALL, PERM_NONE, ROLE_FILTER, Perm, Role
from qblock.drivers.base import BlockDriver, BlockStatus, ReqFlags, Status


class FilterTopDriver(BlockDriver):
    """A pass-through filter on its ``backing`` child."""

    is_filter = True

    def __init__(self, name: str, *, takes_perms: bool) -> None:
        self.format_name = name  # type: ignore[misc]  # per instance: commit_top or mirror_top
        self.takes_perms = takes_perms
        self.is_commit = True  # a mirror (not a commit) forwards its parents' permissions
        self.stopped = False  # mirror.c MirrorBDSOpaque.stop: the job no longer uses the child
        self.on_write: Callable[[int, int], None] | None = None
        self.redirect: BlockNode | None = None
        self.in_flight = 0
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()

    def getlength(self) -> int:
        return self._target().length()

    def _target(self) -> BlockNode:
        if self.redirect is not None:
            return self.redirect
        edge = self.node.backing
        assert edge is not None
        return edge.node

    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # commit.c bdrv_commit_top_child_perm(): commit_top takes nothing, shares everything
        if not self.takes_perms:
            return PERM_NONE, PERM_ALL
        if self.stopped:
            return PERM_NONE, PERM_ALL
        # mirror.c bdrv_mirror_top_child_perm(): only forwards guest writes, shares through
        child_perm, child_shared = self.node.default_child_perms(edge, perm, shared)
        if not self.is_commit:
            return child_perm, child_shared
        return perm & Perm.WRITE, child_shared

    async def _request(self, op: Callable[[BlockNode], Any], offset: int, length: int,
                       write: bool) -> None:
        await self._open.wait()
        self.in_flight += 1
        self._idle.clear()
        try:
            await op(self._target())
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
        if write and self.on_write is not None and self.redirect is None:
            self.on_write(offset, length)

    async def co_preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        await self._request(lambda n: io.node_preadv(n, offset, buf, flags), offset, len(buf),
                            False)

    async def co_pwritev(self, offset: int, data: memoryview, flags: ReqFlags) -> None:
        await self._request(lambda n: io.node_pwritev(n, offset, data, flags), offset,
                            len(data), True)

    async def co_pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        await self._request(lambda n: io.node_pwrite_zeroes(n, offset, length, flags), offset,
                            length, True)

    async def co_pdiscard(self, offset: int, length: int) -> None:
        await self._request(lambda n: io.node_pdiscard(n, offset, length), offset, length, True)

    async def co_flush_to_os(self) -> None:
        await io.flush(self._target())

    async def co_block_status(self, offset: int, length: int) -> BlockStatus:
        return BlockStatus(Status.RAW | Status.OFFSET_VALID, length, offset, self._target())

    async def drain(self) -> None:
        """Hold new requests back and wait until none is in flight."""
        self._open.clear()
        while self.in_flight:
            await self._idle.wait()

    def release(self, to: BlockNode) -> None:
        """Let held requests go on to ``to`` (the node now in the filter's place)."""
        self.redirect = to
        self._open.set()


def insert_node(drv: BlockDriver, driver_name: str, top: BlockNode, node_name: str | None,
                children: list[tuple[BlockNode, str, Role]],
                keep: list[BdrvChild]) -> BlockNode:
    """bdrv_insert_node(): a new node on ``drv`` with ``children`` takes over ``top``'s
    parents (but ``keep``); on failure nothing of it stays in the graph."""
    node = BlockNode(drv, {"driver": driver_name}, node_name=node_name)
    drv.node = node
    node.filename = top.filename
    node.request_alignment = top.request_alignment
    registry.add(node)
    try:
        for child, name, role in children:
            node.add_child(child, name, role)
        replace_node(top, node, keep=keep)
    except Exception:
        for _child, name, _role in children:
            if node.child(name) is not None:
                node.remove_child(name)
        registry.remove(node)
        node.closed = True
        raise
    return node


def insert_filter(name: str, top: BlockNode, node_name: str | None, *, takes_perms: bool,
                  keep: list[BdrvChild]) -> BlockNode:
    """Create the filter above ``top`` and move ``top``'s parents (but ``keep``) onto it."""
    return insert_node(FilterTopDriver(name, takes_perms=takes_perms), name, top, node_name,
                       [(top, "backing", ROLE_FILTER)], keep)


def undo_insert(node: BlockNode) -> None:
    """Take back ``insert_filter`` when the job that wanted the filter could not start."""
    below = _backing(node)
    if node.parents:
        replace_node(node, below)
    node.remove_child("backing")
    registry.remove(node)
    node.closed = True


async def remove_filter(node: BlockNode, keep: list[BdrvChild]) -> BlockNode:
    """bdrv_drop_filter(): parents left on the filter go back to its child; close the filter."""
    drv = node.drv
    assert isinstance(drv, FilterTopDriver)
    below = _backing(node)
    if node.parents:
        replace_node(node, below, keep=keep)
    if drv.redirect is None:
        drv.release(below)
    node.remove_child("backing")
    await close_node(node)
    return below


def _backing(node: BlockNode) -> BlockNode:
    edge = node.backing
    assert edge is not None
    return edge.node
