"""Block QMP commands run in-process through the real dispatcher and command registry.

Messages and reply shapes are QEMU 7.2's: the error texts were taken from
qemu-storage-daemon 7.2 answering the same requests, the shapes are compared with the real
replies kept in tests/data/qmp-7.2 (seed scenario: base drive01 on file01, overlay over01 with
an implicit file node, exported through one BlockBackend).
"""
from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import qblock
from qblock.block import io
from qblock.block.backend import BlockBackend
from qblock.block.node import close_node, registry
from qblock.block.perm import Perm
from qblock.block.qapi import image_info
from qblock.cli.imginfo import image_info as img_info_from_file
from qblock.errors import InvalidArgument
from qblock.monitor.commands.block import BLOCKDEV_OPTIONS
from qblock.monitor.context import BlockState
from qmp_inprocess import execute

DATA = Path(__file__).parent.parent / "data" / "qmp-7.2"
MiB = 1 << 20


def qmp(state: BlockState, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """One request through dispatch() on a negotiated session; returns the reply."""
    return qblock.run(execute(state, name, args))


def ok(state: BlockState, name: str, args: dict[str, Any] | None = None) -> Any:
    reply = qmp(state, name, args)
    assert "return" in reply, reply
    return reply["return"]


def error(state: BlockState, name: str, args: dict[str, Any] | None = None) -> str:
    reply = qmp(state, name, args)
    assert reply["error"]["class"] == "GenericError", reply
    return reply["error"]["desc"]


def shape(value: Any) -> Any:
    """The structure of a JSON value: dict keys and element types, not the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__


def names(replies: list[dict[str, Any]]) -> list[str]:
    """Node names with the numbering of implicit names dropped."""
    return ["#block" if r["node-name"].startswith("#block") else r["node-name"] for r in replies]


def reply_of(name: str) -> Any:
    return json.loads((DATA / name).read_text())["return"]


@pytest.fixture
def state() -> Iterator[BlockState]:
    st = BlockState()
    io.event_hook = st.events.emit
    try:
        yield st
    finally:
        io.event_hook = None
        for blk in st.backends:
            qblock.run(blk.close())
        for node in reversed(list(registry.nodes.values())):
            if not node.parents:
                qblock.run(close_node(node))


@pytest.fixture
def seed(tmp_path: Path, qemu_tool: Any, state: BlockState) -> BlockState:
    """The seed graph of tests/data: over01 (qcow2, implicit file) -> drive01 -> file01."""
    base, overlay = tmp_path / "base01.qcow2", tmp_path / "overlay01.qcow2"
    qemu_tool("qemu-img", "create", "-f", "qcow2", base, "64M", check=True)
    qemu_tool("qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay, check=True)
    ok(state, "blockdev-add", {"driver": "file", "node-name": "file01", "filename": str(base)})
    ok(state, "blockdev-add", {"driver": "qcow2", "node-name": "drive01", "file": "file01",
                               "read-only": True})
    ok(state, "blockdev-add", {"driver": "qcow2", "node-name": "over01", "backing": "drive01",
                               "file": {"driver": "file", "filename": str(overlay)}})
    # what block-export-add would hold: the unnamed BlockBackend of the export
    state.backends.append(BlockBackend(
        registry.find("over01"), Perm.CONSISTENT_READ | Perm.WRITE,
        Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED))
    return state


# -- argument and open errors (texts from qemu-storage-daemon 7.2) ---------------------------
@pytest.mark.parametrize("args, message", [
    ({"driver": "qcow2"}, "Parameter 'file' is missing"),
    ({}, "Parameter 'driver' is missing"),
    ({"driver": "nosuch", "node-name": "x"}, "Parameter 'driver' does not accept value 'nosuch'"),
    ({"driver": "file", "filename": "/nonexistent"},
     "'node-name' must be specified for the root node"),
    ({"driver": "file", "node-name": "x", "filename": "f", "bogus": 1},
     "Parameter 'bogus' is unexpected"),
    ({"driver": "raw", "node-name": "x", "file": {"driver": "file"}},
     "Parameter 'file.filename' is missing"),
    ({"driver": "raw", "node-name": "x", "file": {"driver": "file", "filename": 5}},
     "Invalid parameter type for 'file.filename', expected: string"),
    ({"driver": "raw", "node-name": "x", "file": 5},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ({"driver": "raw", "node-name": "x", "file": "nonode"},
     "Cannot find device='' nor node-name='nonode'"),
    ({"driver": "file", "node-name": "1bad", "filename": "f"}, "Invalid node-name: '1bad'"),
    ({"driver": "file", "node-name": "x", "filename": "/nonexistent/x"},
     "Could not open '/nonexistent/x': No such file or directory"),
    ({"driver": "file", "node-name": "x", "filename": "f", "cache": {"direct": "yes"}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ({"driver": "file", "node-name": "x", "filename": "f", "cache": {"bogus": True}},
     "Parameter 'cache.bogus' is unexpected"),
    ({"driver": "qcow2", "node-name": "x", "file": "nonode", "overlap-check": 3},
     "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks"),
])
def test_blockdev_add_errors(state: BlockState, args: dict[str, Any], message: str) -> None:
    assert error(state, "blockdev-add", args) == message
    assert not registry.nodes


def test_blockdev_add_duplicate_name(state: BlockState, make_image: Any) -> None:
    path = str(make_image(MiB))
    ok(state, "blockdev-add", {"driver": "file", "node-name": "f0", "filename": path})
    assert registry.find("f0").monitor_owned
    assert (error(state, "blockdev-add", {"driver": "file", "node-name": "f0", "filename": path})
            == "Duplicate nodes with node-name='f0'")


# -- blockdev-del (REFERENCE 4.1) ------------------------------------------------------------
def test_blockdev_del_refusals_and_release(seed: BlockState) -> None:
    assert (error(seed, "blockdev-del", {"node-name": "nosuch"})
            == "Failed to find node with node-name='nosuch'")
    assert error(seed, "blockdev-del", {"node-name": "over01"}) == "Node over01 is in use"
    assert (error(seed, "blockdev-del", {"node-name": "drive01"})
            == "Node 'drive01' is busy: node is used as backing hd of 'over01'")
    assert (error(seed, "block_resize", {"node-name": "drive01", "size": MiB})
            == "Device '(null)' is in use")
    implicit = registry.find("over01").file.node.node_name
    assert (error(seed, "blockdev-del", {"node-name": implicit})
            == f"Node {implicit} is not owned by the monitor")
    qblock.run(seed.backends.pop().close())
    assert ok(seed, "blockdev-del", {"node-name": "over01"}) == {}
    # the implicit file node goes with it; drive01 stays, now deletable, then file01
    assert set(registry.nodes) == {"drive01", "file01"}
    ok(seed, "blockdev-add", {"driver": "raw", "node-name": "r0", "file": "drive01"})
    assert error(seed, "blockdev-del", {"node-name": "drive01"}) == "Block device drive01 is in use"
    ok(seed, "blockdev-del", {"node-name": "r0"})
    assert ok(seed, "blockdev-del", {"node-name": "drive01"}) == {}
    assert ok(seed, "blockdev-del", {"node-name": "file01"}) == {}
    assert not registry.nodes


# -- queries: reply shapes of qsd 7.2 --------------------------------------------------------
def test_query_named_block_nodes_matches_qsd(seed: BlockState) -> None:
    nodes = ok(seed, "query-named-block-nodes")
    assert names(nodes) == ["over01", "#block", "drive01", "file01"]
    expected = reply_of("03-query-named-block-nodes.json")
    assert [shape(n) for n in nodes] == [shape(n) for n in expected]
    over = nodes[0]
    assert over["backing_file_depth"] == 1
    assert over["image"]["backing-image"]["filename"] == registry.find("drive01").filename
    flat = ok(seed, "query-named-block-nodes", {"flat": True})
    assert [shape(n) for n in flat] == [shape(n) for n in
                                        reply_of("03-query-named-block-nodes-flat.json")]
    assert flat[0]["backing_file_depth"] == 0  # QEMU counts the depth only when not flat
    assert [n["ro"] for n in flat] == [False, False, True, False]


def test_query_blockstats_matches_qsd(seed: BlockState) -> None:
    assert ok(seed, "query-blockstats") == []  # no named BlockBackend in a daemon
    assert ok(seed, "query-block") == []
    stats = ok(seed, "query-blockstats", {"query-nodes": True})
    expected = reply_of("03-query-blockstats-query-nodes.json")
    assert [shape(s) for s in stats] == [shape(s) for s in expected]
    assert names(stats) == ["file01", "drive01", "#block", "over01"]
    assert stats[3]["parent"]["node-name"] == stats[2]["node-name"]


def test_block_graph_matches_qsd(seed: BlockState) -> None:
    graph = ok(seed, "x-debug-query-block-graph")
    implicit = registry.find("over01").file.node.node_name
    expected = reply_of("03-x-debug-query-block-graph.json")
    for node in expected["nodes"]:
        if node["name"].startswith("#block"):
            node["name"] = implicit
    assert graph == expected


def test_image_info_is_the_same_for_qemu_img_info_and_the_monitor(seed: BlockState) -> None:
    node = registry.find("over01")

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        return await image_info(node), await img_info_from_file(node.filename, "qcow2",
                                                                node.file)

    from_node, from_file = qblock.run(both())
    assert from_node == from_file
    assert from_node["backing-filename"] == registry.find("drive01").filename
    assert from_node["backing-filename-format"] == "qcow2"


# -- block-set-write-threshold ---------------------------------------------------------------
def test_write_threshold_fires_once_and_disarms(seed: BlockState) -> None:
    events: list[dict[str, Any]] = []
    seed.events.subscribe(events.append)
    assert (error(seed, "block-set-write-threshold", {"node-name": "nosuch",
                                                      "write-threshold": 1})
            == "Device 'nosuch' not found")
    ok(seed, "block-set-write-threshold", {"node-name": "over01", "write-threshold": MiB})
    flat = ok(seed, "query-named-block-nodes", {"flat": True})
    assert flat[0]["write_threshold"] == MiB
    blk = seed.backends[0]
    qblock.run(blk.pwritev(0, b"x" * 4096))  # below the threshold: nothing
    assert events == []
    qblock.run(blk.pwritev(MiB - 512, b"y" * 4096))
    qblock.run(blk.pwritev(2 * MiB, b"z" * 4096))  # disarmed: no second event
    assert [e["event"] for e in events] == ["BLOCK_WRITE_THRESHOLD"]
    assert events[0]["data"] == {"node-name": "over01", "amount-exceeded": 4096 - 512,
                                 "write-threshold": MiB}
    assert set(events[0]["timestamp"]) == {"seconds", "microseconds"}
    flat = ok(seed, "query-named-block-nodes", {"flat": True})
    assert flat[0]["write_threshold"] == 0
    stats = ok(seed, "query-blockstats", {"query-nodes": True})
    assert stats[3]["stats"]["wr_highest_offset"] == 2 * MiB + 4096


# -- block_resize ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    ({"node-name": "nosuch", "size": 1024}, "Cannot find device='' nor node-name='nosuch'"),
    ({"device": "nosuch", "size": 1024}, "Cannot find device='nosuch' nor node-name=''"),
    ({"size": 1024}, "Cannot find device='' nor node-name=''"),
    ({"node-name": "q0", "size": -1}, "Parameter 'size' expects a >0 size"),
    ({"node-name": "q0", "size": 1000}, "The new size must be a multiple of 512"),
    ({"node-name": "n0", "size": 2 * MiB}, "Image format driver does not support resize"),
    ({"node-name": "q0"}, "Parameter 'size' is missing"),
    ({"node-name": "q0", "size": "1M"}, "Invalid parameter type for 'size', expected: integer"),
])
def test_block_resize_errors(state: BlockState, tmp_path: Path, qemu_tool: Any,
                             args: dict[str, Any], message: str) -> None:
    path = tmp_path / "a.qcow2"
    qemu_tool("qemu-img", "create", "-f", "qcow2", path, "4M", check=True)
    ok(state, "blockdev-add", {"driver": "qcow2", "node-name": "q0",
                               "file": {"driver": "file", "filename": str(path)}})
    ok(state, "blockdev-add", {"driver": "null-co", "node-name": "n0", "size": MiB})
    assert error(state, "block_resize", args) == message


def test_block_resize_needs_resize_shared_then_grows(seed: BlockState, qemu_tool: Any) -> None:
    # the export's BlockBackend shares everything but resize (block-export-add)
    message = error(seed, "block_resize", {"node-name": "over01", "size": 128 * MiB})
    assert message == ("Permission conflict on node 'over01': permissions 'resize' are both "
                       "required by an unnamed block device (uses node 'over01' as 'root' "
                       "child) and unshared by an unnamed block device (uses node 'over01' "
                       "as 'root' child).")
    assert registry.find("over01").length() == 64 * MiB
    qblock.run(seed.backends.pop().close())
    assert ok(seed, "block_resize", {"node-name": "over01", "size": 128 * MiB}) == {}
    assert registry.find("over01").length() == 128 * MiB
    filename = registry.find("over01").filename
    ok(seed, "blockdev-del", {"node-name": "over01"})
    info = json.loads(qemu_tool("qemu-img", "info", "--output=json", filename,
                                check=True).stdout)
    assert info["virtual-size"] == 128 * MiB


# -- blockdev-create ---------------------------------------------------------------------------
def test_blockdev_create_file_and_qcow2(state: BlockState, tmp_path: Path,
                                        qemu_tool: Any) -> None:
    path = tmp_path / "new.qcow2"
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    assert ok(state, "blockdev-create", {"job-id": "c1", "options": {
        "driver": "file", "filename": str(path), "size": 0}}) == {}
    ok(state, "blockdev-add", {"driver": "file", "node-name": "proto", "filename": str(path)})
    assert ok(state, "blockdev-create", {"job-id": "c2", "options": {
        "driver": "qcow2", "file": "proto", "size": 32 * MiB, "cluster-size": 4096,
        "lazy-refcounts": True, "refcount-bits": 64, "backing-file": "base.raw",
        "backing-fmt": "raw"}}) == {}
    ok(state, "blockdev-del", {"node-name": "proto"})
    check = qemu_tool("qemu-img", "check", "--output=json", path)
    assert check.returncode == 0, check.stderr
    info = json.loads(qemu_tool("qemu-img", "info", "--output=json", "-U", path,
                                check=True).stdout)
    assert info["virtual-size"] == 32 * MiB and info["cluster-size"] == 4096
    assert info["backing-filename"] == "base.raw"
    assert info["backing-filename-format"] == "raw"
    data = info["format-specific"]["data"]
    assert data["lazy-refcounts"] is True and data["refcount-bits"] == 64


def test_blockdev_create_inline_file_and_preallocation(state: BlockState, tmp_path: Path,
                                                       qemu_tool: Any) -> None:
    raw = tmp_path / "full.raw"
    ok(state, "blockdev-create", {"job-id": "c1", "options": {
        "driver": "file", "filename": str(raw), "size": MiB, "preallocation": "full"}})
    assert raw.stat().st_size == MiB and raw.stat().st_blocks * 512 >= MiB
    path = tmp_path / "v2.qcow2"
    path.touch()
    ok(state, "blockdev-create", {"job-id": "c2", "options": {
        "driver": "qcow2", "file": {"driver": "file", "filename": str(path)}, "size": MiB,
        "version": "v2"}})
    assert not registry.nodes  # the inline file node was only opened for the creation
    info = json.loads(qemu_tool("qemu-img", "info", "--output=json", path, check=True).stdout)
    assert info["format-specific"]["data"]["compat"] == "0.10"
    assert qemu_tool("qemu-img", "check", path).returncode == 0


@pytest.mark.parametrize("options, message", [
    ({"driver": "file", "filename": "x"}, "Parameter 'options.size' is missing"),
    ({"driver": "qcow2", "file": "nonode", "size": MiB},
     "Cannot find device='nonode' nor node-name='nonode'"),
    ({"driver": "qcow2", "file": "nonode", "size": MiB, "version": "v4"},
     "Parameter 'options.version' does not accept value 'v4'"),
    ({"driver": "file", "filename": "x", "size": MiB, "preallocation": "metadata"},
     "Unsupported preallocation mode: metadata"),
    ({"driver": "null-co"}, "Driver does not support blockdev-create"),
])
def test_blockdev_create_errors(state: BlockState, tmp_path: Path, options: dict[str, Any],
                                message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert error(state, "blockdev-create", {"job-id": "c", "options": options}) == message
    assert not (tmp_path / "x").exists()


def test_query_commands_list_block_commands(state: BlockState) -> None:
    names = {c["name"] for c in ok(state, "query-commands")}
    assert {"blockdev-add", "blockdev-del", "blockdev-create", "block_resize",
            "block-set-write-threshold", "query-named-block-nodes", "query-block",
            "query-blockstats", "x-debug-query-block-graph"} <= names


def test_qcow2_created_by_qemu_img_reports_like_qsd(state: BlockState, tmp_path: Path) -> None:
    """The values qsd printed for a fresh 10G image: cluster size, format-specific data."""
    path = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(path), "10G"], check=True,
                   capture_output=True, timeout=60)
    ok(state, "blockdev-add", {"driver": "file", "node-name": "file01", "filename": str(path)})
    ok(state, "blockdev-add", {"driver": "qcow2", "node-name": "drive01", "file": "file01"})
    drive, file = ok(state, "query-named-block-nodes")
    qsd = reply_of("08-query-named-block-nodes.json")
    assert drive["image"]["format-specific"] == qsd[0]["image"]["format-specific"]
    assert drive["image"]["virtual-size"] == qsd[0]["image"]["virtual-size"]
    assert drive["image"]["actual-size"] == file["image"]["actual-size"] == \
        path.stat().st_blocks * 512
    # bdrv_getlength() counts whole sectors: the file's length rounded up to 512
    assert file["image"]["virtual-size"] == -(-path.stat().st_size // 512) * 512


@pytest.mark.parametrize(("options", "message"), [
    ({"server": {"type": "unix", "path": "/nonexistent"}, "bogus": 1},
     "Parameter 'bogus' is unexpected"),
    ({}, "Parameter 'server' is missing"),
    ({"server": {"type": "tcp"}}, "Parameter 'server.type' does not accept value 'tcp'"),
])
def test_blockdev_add_nbd_options_checked_before_connecting(options: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        BLOCKDEV_OPTIONS.visit({"driver": "nbd", "node-name": "n0", **options}, "")
