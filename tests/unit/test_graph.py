"""Graph primitives of block.c: node names, edges, permissions, replace/append, deletion.

Expected permissions and messages were taken from qemu-storage-daemon 7.2
(x-debug-query-block-graph and --blockdev errors), see the comments at each test.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import qblock
from qblock.block.backend import BlockBackend
from qblock.block.graph import append_node, detach_child, replace_node
from qblock.block.node import BlockNode, check_node_name, close_node, registry
from qblock.block.open import open_node
from qblock.block.perm import PERM_ALL, PERM_NONE, ROLE_IMAGE, Perm, Role, default_child_perms
from qblock.errors import InvalidArgument, NodeInUse, PermissionConflict, ReadOnlyError

CR, W, WU, RS = Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE
MIB = 1 << 20


def node(**options: Any) -> BlockNode:
    return qblock.run(open_node(options))


def null(name: str, **options: Any) -> BlockNode:
    return node(driver="null-co", **{"node-name": name, "size": MIB, **options})


def writer(n: BlockNode, name: str = "") -> BlockBackend:
    """A BlockBackend that writes and lets others only read (qemu-img/qemu-io style)."""
    return BlockBackend(n, CR | W, CR | WU, name=name)


def snapshot(n: BlockNode) -> list[tuple[object, str, Perm, Perm]]:
    """The parents of ``n`` with what each edge holds, to compare before/after a refusal."""
    return [(e.parent, e.name, e.perm, e.shared) for e in n.parents]


# -- node names ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "Z", "a1", "node-0.b_c", "x" * 31])
def test_valid_node_names(name: str) -> None:
    check_node_name(name)
    assert null(name).node_name == name
    assert registry.find(name).node_name == name


@pytest.mark.parametrize("name", ["1x", "-a", ".a", "_a", "a b", "a/b", "a,b", "#block1", "é", ""])
def test_invalid_node_name_refused_and_not_registered(name: str) -> None:
    before = dict(registry.nodes)
    with pytest.raises(InvalidArgument, match=re.escape(f"Invalid node-name: '{name}'")):
        null(name)
    assert registry.nodes == before


def test_node_name_must_be_shorter_than_32() -> None:
    # block.c bdrv_assign_node_name: strlen >= sizeof(bs->node_name) (32) is refused
    with pytest.raises(InvalidArgument, match="Node name too long"):
        null("x" * 32)
    assert registry.lookup("x" * 32) is None


def test_implicit_children_get_generated_names(make_image: Any) -> None:
    # util/id.c id_generate(): '#block' + a counter + two random digits, never reused
    path = make_image(MIB)
    nodes = [node(driver="raw", **{"node-name": f"r{i}"},
                  file={"driver": "file", "filename": str(path), "locking": "off"})
             for i in range(3)]
    names = [n.file.node.node_name for n in nodes]
    for name in names:
        assert re.fullmatch(r"#block\d+\d\d", name), name
        assert registry.find(name).implicit_name
    assert len(set(names)) == 3
    counters = [int(name[len("#block"):-2]) for name in names]
    assert counters == sorted(counters) and len(set(counters)) == 3
    for n in nodes:
        qblock.run(close_node(n))


def test_root_node_needs_a_name() -> None:
    with pytest.raises(InvalidArgument, match="'node-name' must be specified for the root node"):
        node(driver="null-co")


def test_duplicate_node_name() -> None:
    first = null("dup")
    with pytest.raises(InvalidArgument, match="Duplicate nodes with node-name='dup'"):
        null("dup")
    assert registry.find("dup") is first


# -- attach / detach -------------------------------------------------------------------------
def test_attach_and_detach_backend() -> None:
    n = null("n0")
    blk = writer(n)
    (edge,) = n.parents
    assert edge.name == "root" and edge.parent is blk
    assert (edge.perm, edge.shared) == (CR | W, CR | WU)
    qblock.run(blk.close())
    assert n.parents == []
    assert n.closed  # the last user gone, a node nobody owns is closed


def test_parent_node_edge_and_detach_recomputes_child_perms() -> None:
    base = null("base")
    raw = node(driver="raw", file="base", **{"node-name": "r"})
    (edge,) = base.parents
    assert edge.parent is raw and edge.name == "file" and raw.file is edge
    assert edge.role == Role.FILTERED | Role.PRIMARY  # raw without offset/size is a filter
    assert (edge.perm, edge.shared) == (PERM_NONE, PERM_ALL)
    blk = BlockBackend(raw, CR | W | RS, CR | WU)
    assert (edge.perm, edge.shared) == (CR | W | RS, CR | WU)
    detach_child(blk.root)
    blk.root = None
    assert (edge.perm, edge.shared) == (PERM_NONE, PERM_ALL)


def test_refused_attach_leaves_no_edge() -> None:
    n = null("ro", **{"read-only": True})
    reader = BlockBackend(n, CR, PERM_ALL)
    before = snapshot(n)
    with pytest.raises(ReadOnlyError, match="Block node is read-only"):
        BlockBackend(n, CR | W, PERM_ALL)
    assert snapshot(n) == before
    blk2 = BlockBackend(n, CR, CR)  # a compatible reader still attaches
    assert len(n.parents) == 2
    qblock.run(blk2.close())
    qblock.run(reader.close())


# -- permissions -----------------------------------------------------------------------------
def test_two_writers_conflict_names_both_users() -> None:
    # qemu-storage-daemon 7.2 names the earlier user as 'required by' and the newcomer as
    # 'unshared by' (block.c bdrv_parent_perms_conflict walks newest parent first).
    n = null("n")
    first = writer(n, "blk0")
    with pytest.raises(PermissionConflict) as exc:
        writer(n, "blk1")
    assert str(exc.value) == (
        "Permission conflict on node 'n': permissions 'write' are both required by "
        "block device 'blk0' (uses node 'n' as 'root' child) and unshared by "
        "block device 'blk1' (uses node 'n' as 'root' child).")
    assert snapshot(n) == [(first, "root", CR | W, CR | WU)]


def test_unnamed_backends_conflict_message() -> None:
    n = null("n")
    writer(n)
    with pytest.raises(PermissionConflict) as exc:
        writer(n)
    assert str(exc.value) == (
        "Permission conflict on node 'n': permissions 'write' are both required by "
        "an unnamed block device (uses node 'n' as 'root' child) and unshared by "
        "an unnamed block device (uses node 'n' as 'root' child).")


def test_conflict_below_a_filter_names_the_parent_node() -> None:
    f = null("f")
    raw = node(driver="raw", file="f", **{"node-name": "r"})
    writer(raw)
    with pytest.raises(PermissionConflict) as exc:
        BlockBackend(f, CR, CR)  # a reader that does not let anyone write
    assert str(exc.value) == (
        "Permission conflict on node 'f': permissions 'write' are both required by "
        "node 'r' (uses node 'f' as 'file' child) and unshared by "
        "an unnamed block device (uses node 'f' as 'root' child).")
    assert len(f.parents) == 1


def test_writers_that_share_write_coexist() -> None:
    n = null("n")
    a = BlockBackend(n, CR | W, PERM_ALL)
    b = BlockBackend(n, CR | W, PERM_ALL)
    assert n.cumulative_perms() == (CR | W, PERM_ALL)
    with pytest.raises(PermissionConflict, match="permissions 'write' are both required"):
        writer(n)
    qblock.run(a.close())
    qblock.run(b.close())


def test_set_perm_is_checked() -> None:
    n = null("n")
    a = BlockBackend(n, CR, PERM_ALL)
    b = BlockBackend(n, CR | W, PERM_ALL)
    with pytest.raises(PermissionConflict):
        a.set_perm(CR, CR)
    assert (a.edge.perm, a.edge.shared) == (CR, PERM_ALL)
    qblock.run(b.close())
    a.set_perm(CR, CR)
    assert (a.edge.perm, a.edge.shared) == (CR, CR)


def test_raw_filter_over_file_child_perms(make_image: Any) -> None:
    # QSD 7.2: raw over file, writable NBD export on raw (perm CR|W, shared CR|W|WU):
    # the file edge takes CR|W and shares CR|W|WU (filter: passed through).
    path = make_image(MIB)
    raw = node(driver="raw", file={"driver": "file", "filename": str(path)},
               **{"node-name": "r"})
    BlockBackend(raw, CR | W, CR | W | WU)
    assert (raw.file.perm, raw.file.shared) == (CR | W, CR | W | WU)


def test_raw_window_over_file_child_perms(make_image: Any) -> None:
    # QSD 7.2, raw with offset/size (a DATA child): no users -> perm none, shared CR|W|WU;
    # writable export -> perm CR|W (raw_child_perm drops the RESIZE its parent did not ask
    # for), shared CR|W|WU; read-only export -> perm CR.
    path = make_image(MIB)
    raw = node(driver="raw", offset=4096, size=8192,
               file={"driver": "file", "filename": str(path)}, **{"node-name": "r"})
    assert raw.file.role == Role.DATA | Role.PRIMARY
    assert (raw.file.perm, raw.file.shared) == (PERM_NONE, CR | W | WU)
    blk = BlockBackend(raw, CR | W, CR | W | WU)
    assert (raw.file.perm, raw.file.shared) == (CR | W, CR | W | WU)
    blk.set_perm(CR, CR | W | WU)
    assert (raw.file.perm, raw.file.shared) == (CR, CR | W | WU)


def test_cow_child_perms() -> None:
    # QSD 7.2, qcow2 with a backing file under a writable export: backing edge perm CR,
    # shared CR|W|WU|RS; a parent that does not share write gets shared CR|WU only.
    top = node(driver="raw", file={"driver": "null-co", "size": MIB}, **{"node-name": "top"})
    base = null("base")
    assert top.set_backing(base) is None
    cow = top.cow_child()
    assert cow is top.backing and cow.role == Role.COW and cow.node is base
    blk = BlockBackend(top, CR | W, CR | W | WU)
    assert (cow.perm, cow.shared) == (CR, CR | W | WU | RS)
    blk.set_perm(CR | W, CR | WU)
    assert (cow.perm, cow.shared) == (CR, CR | WU)
    blk.set_perm(PERM_NONE, PERM_ALL)
    assert (cow.perm, cow.shared) == (PERM_NONE, CR | W | WU | RS)


@pytest.mark.parametrize(("role", "writable", "perm", "shared", "expect"), [
    # qcow2 'file' (IMAGE) under a writable export, QSD 7.2: CR|W|RS, shared CR|WU
    (ROLE_IMAGE, True, CR | W, CR | W | WU, (CR | W | RS, CR | WU)),
    # read-only qcow2 under a read-only export: CR, shared CR|WU
    (ROLE_IMAGE, False, CR, CR | W | WU, (CR, CR | WU)),
    # a writable format node takes W|RS on its file even with no users (metadata updates)
    (ROLE_IMAGE, True, PERM_NONE, PERM_ALL, (CR | W | RS, CR | WU)),
    # DATA child: WRITE_UNCHANGED implies WRITE, WRITE implies RESIZE, RESIZE unshared
    (Role.DATA | Role.PRIMARY, True, CR | WU, PERM_ALL, (CR | W | WU | RS, CR | W | WU)),
    # filtered child: passed through unchanged
    (Role.FILTERED | Role.PRIMARY, True, W | RS, CR, (W | RS, CR)),
    # COW child: only consistent-read; W|RS shared only if the parent shares W
    (Role.COW, True, PERM_ALL, CR, (CR, CR | WU)),
    (Role.COW, True, W, PERM_ALL, (PERM_NONE, PERM_ALL)),
])
def test_default_child_perms_table(role: Role, writable: bool, perm: Perm, shared: Perm,
                                   expect: tuple[Perm, Perm]) -> None:
    assert default_child_perms(role, perm, shared, writable=writable) == expect


# -- replace / append ------------------------------------------------------------------------
def test_replace_node_moves_every_parent() -> None:
    old, new = null("old"), null("new")
    a = BlockBackend(old, CR | W, PERM_ALL)
    b = BlockBackend(old, CR, PERM_ALL)
    raw = node(driver="raw", file="old", **{"node-name": "p"})
    replace_node(old, new)
    assert old.parents == []
    assert {id(e) for e in new.parents} == {id(a.root), id(b.root), id(raw.file)}
    assert a.node is new and b.node is new and raw.file.node is new
    assert (a.root.perm, b.root.perm) == (CR | W, CR)


def test_replace_node_refused_leaves_graph_unchanged() -> None:
    old = null("old")
    new = null("new", **{"read-only": True})
    a = BlockBackend(old, CR | W, PERM_ALL)
    b = BlockBackend(old, CR, PERM_ALL)
    before_old, before_new = snapshot(old), snapshot(new)
    with pytest.raises(ReadOnlyError):
        replace_node(old, new)
    assert snapshot(old) == before_old and snapshot(new) == before_new
    assert a.node is old and b.node is old


def test_append_node_moves_all_parents_and_keeps_its_backing_edge() -> None:
    # block.c bdrv_append (blockdev-snapshot): old becomes new's backing, every other
    # parent of old moves to new.
    old = null("old")
    a = BlockBackend(old, CR | W, CR | W | WU)
    b = BlockBackend(old, CR, PERM_ALL)
    raw = node(driver="raw", file="old", **{"node-name": "p"})
    top = node(driver="raw", file={"driver": "null-co", "size": MIB}, **{"node-name": "top"})
    append_node(top, old)
    assert [e.parent for e in old.parents] == [top]
    assert top.backing.node is old
    assert {id(e) for e in top.parents} == {id(a.root), id(b.root), id(raw.file)}
    # the parents share CR|W|WU between them, so the COW edge lets others write and resize
    assert (top.backing.perm, top.backing.shared) == (CR, CR | W | WU | RS)
    assert a.node is top and raw.file.node is top


def test_append_refused_at_backing_attach_rolls_back() -> None:
    old = null("old")
    BlockBackend(old, CR | W, PERM_NONE)  # lets nobody else even read
    top = node(driver="raw", file={"driver": "null-co", "size": MIB}, **{"node-name": "top"})
    reader = BlockBackend(top, CR, PERM_ALL)  # so the new backing edge needs consistent-read
    before = snapshot(old)
    with pytest.raises(PermissionConflict) as exc:
        append_node(top, old)
    assert str(exc.value) == (
        "Permission conflict on node 'old': permissions 'consistent-read' are both "
        "required by node 'top' (uses node 'old' as 'backing' child) and unshared by "
        "an unnamed block device (uses node 'old' as 'root' child).")
    assert snapshot(old) == before
    assert top.backing is None and [e.parent for e in top.parents] == [reader]


def test_append_refused_after_backing_attach_rolls_back() -> None:
    old = null("old")
    a = BlockBackend(old, CR | W, PERM_ALL)
    top = node(driver="raw", file={"driver": "null-co", "size": MIB},
               **{"node-name": "top", "read-only": True})
    before = snapshot(old)
    with pytest.raises(ReadOnlyError):
        append_node(top, old)  # the writer cannot move onto a read-only overlay
    assert snapshot(old) == before and a.node is old
    assert top.backing is None and top.parents == []
    assert old.cumulative_perms() == (CR | W, PERM_ALL)


# -- delete rules ----------------------------------------------------------------------------
def test_close_node_refuses_a_node_with_users(make_image: Any) -> None:
    path: Path = make_image(MIB)
    f = node(driver="file", filename=str(path), **{"node-name": "f"})
    raw = node(driver="raw", file="f", **{"node-name": "r"})
    blk = writer(raw)
    with pytest.raises(NodeInUse, match="in use"):
        qblock.run(close_node(raw))
    with pytest.raises(NodeInUse, match="in use"):
        qblock.run(close_node(f))  # used by 'r' as its file child
    assert not raw.closed and not f.closed and registry.lookup("r") is raw
    qblock.run(blk.close())  # r loses its last user: closed, and f with it
    assert raw.closed and f.closed
    assert registry.lookup("r") is None and registry.lookup("f") is None


def test_monitor_owned_child_outlives_its_parent() -> None:
    f = null("f")
    f.monitor_owned = True
    raw = node(driver="raw", file="f", **{"node-name": "r"})
    qblock.run(close_node(raw))
    assert raw.closed and not f.closed and f.parents == []
    assert registry.lookup("f") is f


def test_add_and_remove_child_of_a_node() -> None:
    parent = null("p")
    child = null("c")
    blk = BlockBackend(parent, CR, PERM_ALL)
    edge = parent.add_child(child, "backing", Role.COW)
    assert parent.children["backing"] is edge and child.parents == [edge]
    assert (edge.perm, edge.shared) == (CR, CR | W | WU | RS)
    with pytest.raises(InvalidArgument, match="already has a 'backing' child"):
        parent.add_child(null("c2"), "backing", Role.COW)
    assert parent.remove_child("backing") is child
    assert child.parents == [] and "backing" not in parent.children
    qblock.run(blk.close())
