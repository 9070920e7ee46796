"""Edges of the block graph (BdrvChild) and the operations that rewire it.

block.c's model: every parent (a node, a BlockBackend, a job) reaches a child node through a
BdrvChild that carries a name ("root", "file", "backing", ...), a role and the permissions the
parent takes (``perm``) and tolerates from others (``shared``).  Any rewiring recomputes the
permissions of everything below it in one transaction: all checks pass, or nothing changes.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from qblock.block.perm import PERM_ALL, PERM_NONE, Perm, Role, perm_names
from qblock.errors import PermissionConflict, ReadOnlyError

if TYPE_CHECKING:
    from qblock.block.node import BlockNode


class Parent(Protocol):
    """Anything that holds BdrvChild edges: a BlockNode, a BlockBackend or a block job."""

    def parent_desc(self) -> str:
        """How conflict messages name this parent (block.c get_parent_desc)."""

    def child_perms(self, child: BdrvChild) -> tuple[Perm, Perm]:
        """The (perm, shared) this parent needs on ``child`` given its own state."""


class BdrvChild:
    """One edge parent -> child node."""

    __slots__ = ("name", "role", "parent", "node", "perm", "shared", "frozen")

    def __init__(self, parent: Parent, node: BlockNode, name: str, role: Role,
                 perm: Perm = PERM_NONE, shared: Perm = PERM_ALL) -> None:
        self.parent = parent
        self.node = node
        self.name = name
        self.role = role
        self.perm = perm
        self.shared = shared
        self.frozen = False

    def __repr__(self) -> str:
        return (f"<BdrvChild {self.name} {self.parent.parent_desc()} -> {self.node.node_name} "
                f"perm={perm_names(self.perm)} shared={perm_names(self.shared)}>")


def cumulative_perms(parents: Iterable[BdrvChild],
                     overrides: dict[BdrvChild, tuple[Perm, Perm]]) -> tuple[Perm, Perm]:
    """Union of what the parents take, intersection of what they share."""
    perm, shared = PERM_NONE, PERM_ALL
    for edge in parents:
        p, s = overrides.get(edge, (edge.perm, edge.shared))
        perm |= p
        shared &= s
    return perm, shared


def _conflict_message(node: BlockNode, a: BdrvChild, b: BdrvChild, perms: Perm) -> str:
    names = ", ".join(perm_names(perms))
    return (f"Permission conflict on node '{node.node_name}': permissions '{names}' are both "
            f"required by {b.parent.parent_desc()} (uses node '{node.node_name}' as "
            f"'{b.name}' child) and unshared by {a.parent.parent_desc()} (uses node "
            f"'{node.node_name}' as '{a.name}' child).")


def _check_parents(node: BlockNode, new: dict[BdrvChild, tuple[Perm, Perm]]) -> None:
    # block.c bdrv_parent_perms_conflict() walks bs->parents, where every new edge is inserted
    # at the head; walking newest first names the same users in the same roles as QEMU.
    edges = node.parents[::-1]
    for a in edges:
        _, a_shared = new.get(a, (a.perm, a.shared))
        for b in edges:
            if a is b:
                continue
            b_perm, _ = new.get(b, (b.perm, b.shared))
            missing = b_perm & ~a_shared
            if missing:
                raise PermissionConflict(_conflict_message(node, a, b, Perm(missing)))


def _topological(roots: Iterable[BlockNode]) -> list[BlockNode]:
    order: list[BlockNode] = []
    seen: set[int] = set()

    def visit(node: BlockNode) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        for edge in node.children.values():
            visit(edge.node)
        order.append(node)

    for root in roots:
        visit(root)
    order.reverse()
    return order


def refresh_perms(roots: Iterable[BlockNode],
                  new: dict[BdrvChild, tuple[Perm, Perm]] | None = None) -> None:
    """Recompute permissions below ``roots``; check every node; apply all or raise.

    ``new`` holds edges whose permissions the caller sets explicitly (BlockBackend, job edges).
    Each node's drivers get a chance to refuse (file locking) before anything is applied.
    """
    new = dict(new or {})
    order = _topological(roots)
    for node in order:
        _check_parents(node, new)
        perm, shared = cumulative_perms(node.parents, new)
        if node.read_only and perm & (Perm.WRITE | Perm.WRITE_UNCHANGED):
            raise ReadOnlyError("Block node is read-only")  # block.c bdrv_node_refresh_perm
        for edge in node.children.values():
            child_perm, child_shared = node.child_perms_for(edge, perm, shared)
            if edge.node.force_share:  # block.c bdrv_child_perm()
                child_shared = PERM_ALL
            new[edge] = (child_perm, child_shared)
    checked: list[BlockNode] = []
    try:
        for node in order:
            perm, shared = cumulative_perms(node.parents, new)
            node.drv.check_perm(perm, shared)
            checked.append(node)
    except Exception:
        for node in checked:
            node.drv.abort_perm()
        raise
    for edge, (perm, shared) in new.items():
        edge.perm, edge.shared = perm, shared
    for node in order:
        node.drv.set_perm(*cumulative_perms(node.parents, {}))


def attach_child(parent: Parent, node: BlockNode, name: str, role: Role,
                 perm: Perm | None = None, shared: Perm | None = None) -> BdrvChild:
    """Create the edge ``parent`` -> ``node``; permissions are checked before it exists.

    With ``perm``/``shared`` given (BlockBackend, job) they are what the edge takes; otherwise
    the parent node derives them from its own permissions.
    """
    edge = BdrvChild(parent, node, name, role)
    node.parents.append(edge)
    overrides = {}
    if perm is not None:
        overrides[edge] = (perm, PERM_ALL if shared is None else shared)
    else:
        overrides[edge] = parent.child_perms(edge)
    try:
        refresh_perms([node], overrides)
    except Exception:
        node.parents.remove(edge)
        raise
    return edge


def detach_child(edge: BdrvChild) -> None:
    """Remove ``edge``; the child loses that parent's permissions (never fails)."""
    edge.node.parents.remove(edge)
    refresh_perms([edge.node])


def set_edge_perms(edge: BdrvChild, perm: Perm, shared: Perm) -> None:
    """Change what an explicit user (BlockBackend, job) takes on its edge."""
    refresh_perms([edge.node], {edge: (perm, shared)})


def _move_edges(edges: list[BdrvChild], to: BlockNode) -> None:
    for edge in edges:
        edge.node.parents.remove(edge)
        edge.node = to
        to.parents.append(edge)


def _rewire(edges: list[BdrvChild], old: BlockNode, new: BlockNode) -> None:
    """Point ``edges`` from ``old`` to ``new`` transactionally."""
    if any(e.frozen for e in edges):
        raise PermissionConflict(f"Cannot change '{edges[0].name}' link to '{old.node_name}'")
    _move_edges(edges, new)
    try:
        affected = [new, old]
        for edge in edges:
            if hasattr(edge.parent, "children"):
                affected.append(edge.parent)  # a node parent derives new perms for the edge
        refresh_perms(affected)
    except Exception:
        _move_edges(edges, old)
        refresh_perms([old, new])
        raise


def replace_node(old: BlockNode, new: BlockNode, *, keep: Iterable[BdrvChild] = ()) -> None:
    """Move every parent of ``old`` onto ``new`` (block.c bdrv_replace_node).

    Edges from ``new`` or from nodes below it stay, or the graph would get a loop; so do the
    edges in ``keep`` (block-job edges stay at their node).
    """
    below_new = {id(n) for n in _topological([new])}
    keep_ids = {id(e) for e in keep}
    edges = [e for e in old.parents
             if id(e) not in keep_ids and id(e.parent) not in below_new]
    _rewire(edges, old, new)


def append_node(new_top: BlockNode, old: BlockNode) -> None:
    """Insert ``new_top`` above ``old`` (block.c bdrv_append, what blockdev-snapshot does).

    ``old`` becomes the backing child of ``new_top``, then every other parent of ``old`` moves
    to ``new_top``.  On failure the graph is as before.
    """
    new_top.set_backing(old)
    try:
        replace_node(old, new_top, keep=[e for e in old.parents if e.parent is new_top])
    except Exception:
        new_top.set_backing(None)
        raise
