"""``qblock ctl``: graph rendering of stored qemu-storage-daemon 7.2 replies, and libvirt's
domblkinfo arithmetic (REFERENCE §9) checked against numbers the tests work out themselves."""
from __future__ import annotations

import html
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import qblock
from qblock.cli import ctl, ctl_blkinfo, ctl_graph
from qblock.cli.ctl_blkinfo import DiskSource, SourceStat

DATA = Path(__file__).resolve().parents[1] / "data" / "qmp-7.2"
SRC = Path(__file__).resolve().parents[2] / "src"
requires_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz is not installed")


def reply(name: str) -> Any:
    return json.loads((DATA / name).read_text())["return"]


def seed_graph() -> ctl_graph.BlockGraph:
    """Seed 000's graph: an export's BlockBackend -> drive01 (qcow2) -> file01 (file)."""
    return ctl_graph.BlockGraph.from_replies(reply("08-x-debug-query-block-graph.json"),
                                             reply("08-query-named-block-nodes.json"))


# -- graph ------------------------------------------------------------------------------------

def test_text_tree_of_seed_000_graph() -> None:
    assert ctl_graph.render_text(seed_graph()) == (
        "BlockBackend #1 (anonymous)\n"
        "└── root: drive01 (qcow2) /srv/img/base01.qcow2\n"
        "    │   perm: write, consistent-read; shared: write-unchanged, write, consistent-read\n"
        "    └── file: file01 (file) /srv/img/base01.qcow2\n"
        "            perm: resize, write, consistent-read; shared: write-unchanged, "
        "consistent-read\n")


def test_text_tree_with_backing_chain() -> None:
    """After blockdev-snapshot-sync: over01 has a file child and a backing child (drive01)."""
    g = ctl_graph.BlockGraph.from_replies(
        {"return": reply("03-x-debug-query-block-graph.json")},
        {"return": reply("03-query-named-block-nodes.json")})
    lines = ctl_graph.render_text(g).splitlines()
    assert lines[0] == "BlockBackend #1 (anonymous)"
    assert lines[1] == "└── root: over01 (qcow2) /srv/img/overlay01.qcow2"
    assert lines[3] == "    ├── file: #block360 (file) /srv/img/overlay01.qcow2"
    assert lines[4] == ("    │       perm: resize, write, consistent-read; "
                        "shared: write-unchanged, consistent-read")
    assert lines[5] == "    └── backing: drive01 (qcow2) /srv/img/base01.qcow2"
    assert lines[6] == ("        │   perm: consistent-read; "
                        "shared: resize, write-unchanged, write, consistent-read")
    assert lines[7] == "        └── file: file01 (file) /srv/img/base01.qcow2"
    assert len(lines) == 9


def test_shared_node_is_expanded_once_and_free_nodes_are_roots() -> None:
    graph = {"nodes": [{"id": 3, "type": "block-driver", "name": "base"},
                       {"id": 4, "type": "block-driver", "name": "base-file"},
                       {"id": 2, "type": "block-driver", "name": "top"},
                       {"id": 1, "type": "block-job", "name": "job0"},
                       {"id": 5, "type": "block-driver", "name": "spare"}],
             "edges": [{"parent": 1, "child": 2, "name": "main node", "perm": [],
                        "shared-perm": ["consistent-read"]},
                       {"parent": 1, "child": 3, "name": "base", "perm": ["consistent-read"],
                        "shared-perm": []},
                       {"parent": 2, "child": 3, "name": "backing", "perm": ["consistent-read"],
                        "shared-perm": []},
                       {"parent": 3, "child": 4, "name": "file", "perm": ["consistent-read"],
                        "shared-perm": []}]}
    text = ctl_graph.render_text(ctl_graph.BlockGraph.from_replies(graph))
    assert [ln for ln in text.splitlines() if "──" not in ln and "perm:" not in ln] == [
        "block-job job0", "spare"]
    assert text.count("file: base-file") == 1
    assert "backing: base\n" in text and "└── base: base (see above)" in text
    assert "perm: -; shared: consistent-read" in text


def test_export_names_its_anonymous_backend() -> None:
    g = ctl_graph.BlockGraph.from_replies(
        reply("08-x-debug-query-block-graph.json"), None,
        [{"id": "exp01", "node-name": "drive01", "type": "nbd", "shutting-down": False}])
    assert ctl_graph.render_text(g).splitlines()[0] == "BlockBackend (export exp01)"


def test_dot_lists_every_node_and_edge_with_labels() -> None:
    g = seed_graph()
    source = ctl_graph.to_dot(g).source
    assert 'n2 [label="drive01\\nqcow2\\n/srv/img/base01.qcow2"' in source
    assert 'n3 [label="file01\\nfile\\n/srv/img/base01.qcow2"' in source
    for e in reply("08-x-debug-query-block-graph.json")["edges"]:
        assert (f'n{e["parent"]} -> n{e["child"]} [label="{e["name"]}\\n'
                f'perm: {", ".join(e["perm"])}\\nshared: {", ".join(e["shared-perm"])}"]'
                ) in source


@requires_dot
def test_dot_as_graphviz_reads_it() -> None:
    """graphviz itself parses the DOT back into the same vertices and edges."""
    g = seed_graph()
    out = json.loads(ctl_graph.to_dot(g).pipe(format="json"))
    names = {o["_gvid"]: o["name"] for o in out["objects"]}
    labels = {o["name"]: o["label"] for o in out["objects"]}
    assert labels["n2"] == "drive01\\nqcow2\\n/srv/img/base01.qcow2"
    edges = {(names[e["tail"]], names[e["head"]], e["label"].split("\\n")[0])
             for e in out["edges"]}
    assert edges == {("n1", "n2", "root"), ("n2", "n3", "file")}


@requires_dot
def test_png_of_seed_000_graph_from_saved_reply(tmp_path: Path) -> None:
    png = tmp_path / "graph.png"
    proc = subprocess.run(
        [sys.executable, "-m", "qblock.cli.main", "ctl", "graph",
         "--json", str(DATA / "08-x-debug-query-block-graph.json"),
         "--nodes", str(DATA / "08-query-named-block-nodes.json"),
         "--format", "png", "-o", str(png)],
        capture_output=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""  # graphviz reported neither error nor warning
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > 100 and height > 200  # three vertices stacked top to bottom


@requires_dot
def test_svg_names_nodes(tmp_path: Path) -> None:
    out = tmp_path / "g.svg"
    assert ctl.main(["graph", "--json", str(DATA / "08-x-debug-query-block-graph.json"),
                     "--nodes", str(DATA / "08-query-named-block-nodes.json"),
                     "--format", "svg", "-o", str(out)]) == 0
    svg = html.unescape(out.read_text())
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    for word in ("drive01", "file01", "qcow2", "root", "consistent-read"):
        assert word in svg


def test_graph_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["graph", "--json", str(tmp_path / "missing.json")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert ctl.main(["graph", "--socket", str(tmp_path / "none.sock")]) == 1
    assert "cannot connect" in capsys.readouterr().err
    assert ctl.main(["graph", "--socket", "x", "--nodes", "y"]) == 1
    assert "--nodes only goes with --json" in capsys.readouterr().err


# -- domblkinfo: running daemon ---------------------------------------------------------------

def fixed_stat(size: int, allocated: int | None = None) -> Any:
    """A stat_fn that records which source libvirt's logic asked for."""
    asked: list[DiskSource] = []

    def stat_fn(source: DiskSource) -> SourceStat:
        asked.append(source)
        return SourceStat(size, allocated)
    stat_fn.asked = asked  # type: ignore[attr-defined]
    return stat_fn


def test_running_qcow2_on_file_from_stored_replies() -> None:
    """qsd 7.2's replies for over01: capacity = virtual-size, allocation = actual-size, and as
    allocation equals QEMU's physical, physical = st_size of the file (stat)."""
    named = reply("03-query-named-block-nodes-flat.json")
    image = next(n for n in named if n["node-name"] == "over01")["image"]
    stat_fn = fixed_stat(5_000_000, 2_363_392)
    info = ctl_blkinfo.running_block_info(
        "over01", reply("03-query-blockstats.json"),
        reply("03-query-blockstats-query-nodes.json"), named, stat_fn=stat_fn)
    assert (info.capacity, info.allocation, info.physical) == (
        image["virtual-size"], image["actual-size"], 5_000_000)
    assert stat_fn.asked == [DiskSource("/srv/img/overlay01.qcow2", "file", "qcow2")]
    # wr_highest_offset is valid (the file node's stats carry it) but unused for qcow2 on a file
    assert info.wr_highest_offset == 2424832 and info.allocation_from == "actual-size"


def test_running_stat_failure_keeps_qemu_physical() -> None:
    named = reply("03-query-named-block-nodes-flat.json")
    info = ctl_blkinfo.running_block_info(
        "drive01", [], reply("03-query-blockstats-query-nodes.json"), named,
        stat_fn=lambda source: None)
    assert (info.capacity, info.allocation, info.physical) == (10737418240, 4460544, 4460544)
    assert info.host_allocated is None


def _replies(top_drv: str, leaf_drv: str, *, wr: int | None, virtual: int,
             actual: int | None) -> tuple[list[Any], list[Any]]:
    """query-blockstats {query-nodes} and query-named-block-nodes for disk -> disk-file."""
    leaf_stats: dict[str, Any] = {"wr_bytes": 0}
    if wr is not None:
        leaf_stats["wr_highest_offset"] = wr
    nodes_stats = [{"node-name": "disk-file", "stats": leaf_stats},
                   {"node-name": "disk", "stats": {"wr_highest_offset": 0},
                    "parent": {"node-name": "disk-file", "stats": leaf_stats}}]
    image: dict[str, Any] = {"virtual-size": virtual}
    if actual is not None:
        image["actual-size"] = actual
    named = [{"node-name": "disk", "drv": top_drv, "file": "/dev/x", "image": image},
             {"node-name": "disk-file", "drv": leaf_drv, "file": "/dev/x",
              "image": {"virtual-size": virtual}}]
    return nodes_stats, named


@pytest.mark.parametrize("top, leaf, wr, actual, stat_size, expected", [
    # raw on a file: allocation = highest host offset written; differs from actual-size, so
    # physical stays QEMU's actual-size (no stat)
    ("raw", "file", 5 << 20, 1 << 20, 99, (16 << 20, 5 << 20, 1 << 20)),
    # raw, nothing written yet: allocation 0 -> actual-size, physical from stat
    ("raw", "file", 0, 1 << 20, 16 << 20, (16 << 20, 1 << 20, 16 << 20)),
    # qcow2 on a block device: wr_highest_offset counts (thin LV fill level)
    ("qcow2", "host_device", 3 << 20, 8 << 20, 99, (16 << 20, 3 << 20, 8 << 20)),
    # no wr_highest_offset in the parent stats: allocation = physical, then stat
    ("qcow2", "host_device", None, 8 << 20, 32 << 20, (16 << 20, 8 << 20, 32 << 20)),
    # no actual-size: QEMU's physical = capacity, so allocation == capacity (seed 002's sight)
    ("qcow2", "file", 1 << 20, None, 20 << 20, (16 << 20, 16 << 20, 20 << 20)),
])
def test_running_libvirt_formula(top: str, leaf: str, wr: int | None, actual: int | None,
                                 stat_size: int, expected: tuple[int, int, int]) -> None:
    nodes_stats, named = _replies(top, leaf, wr=wr, virtual=16 << 20, actual=actual)
    info = ctl_blkinfo.running_block_info("disk", [], nodes_stats, named,
                                          stat_fn=fixed_stat(stat_size))
    assert (info.capacity, info.allocation, info.physical) == expected


def test_running_lookup_by_backend_name_and_unknown_name() -> None:
    nodes_stats, named = _replies("raw", "file", wr=4096, virtual=1 << 20, actual=8192)
    device = [{"device": "vda", "node-name": "disk", "stats": {}, "parent": {"stats": {}}}]
    info = ctl_blkinfo.running_block_info("vda", device, nodes_stats, named,
                                          stat_fn=fixed_stat(1 << 20))
    assert (info.capacity, info.allocation, info.physical) == (1 << 20, 4096, 8192)
    with pytest.raises(KeyError, match="cannot find statistics for device 'vdb'"):
        ctl_blkinfo.running_block_info("vdb", device, nodes_stats, named)


def test_relative_source_is_resolved_against_daemon_cwd() -> None:
    nodes = {"d": {"drv": "qcow2"}, "f": {"drv": "file", "file": "test01.qcow2"}}
    assert ctl_blkinfo.disk_source("d", "f", nodes, "/srv/img") == DiskSource(
        "/srv/img/test01.qcow2", "file", "qcow2")
    assert ctl_blkinfo.disk_source("f", "f", nodes).format == "raw"


# -- domblkinfo: offline image ----------------------------------------------------------------

def _expected_offline(path: Path, header_size: int | None) -> tuple[int, int, int]:
    st = os.stat(path)
    return (header_size if header_size else st.st_size, st.st_blocks * 512, st.st_size)


def test_offline_qcow2(tmp_path: Path) -> None:
    path = tmp_path / "t.qcow2"
    qblock.create(path, 32 << 20)
    with qblock.open(path) as disk:
        disk.write(3 << 20, b"\x5a" * (1 << 20))
    header_size = struct.unpack(">Q", path.read_bytes()[24:32])[0]  # qcow2.txt "Header": size
    assert header_size == 32 << 20
    info = ctl_blkinfo.offline_block_info(str(path))
    assert (info.capacity, info.allocation, info.physical) == _expected_offline(path, header_size)
    assert info.host_allocated == info.allocation


def test_offline_sparse_raw(tmp_path: Path) -> None:
    path = tmp_path / "r.raw"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"\1" * 65536)
    info = ctl_blkinfo.offline_block_info(str(path))
    assert (info.capacity, info.allocation, info.physical) == _expected_offline(path, None)
    assert info.allocation < info.physical  # sparse: holes are not allocated


def test_offline_cli_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.qcow2"
    qblock.create(path, 2 << 30)
    assert ctl.main(["domblkinfo", "--offline", str(path), "--human"]) == 0
    out = capsys.readouterr().out.splitlines()
    st = os.stat(path)
    alloc, alloc_unit = ctl_blkinfo.pretty_capacity(st.st_blocks * 512)
    phys, phys_unit = ctl_blkinfo.pretty_capacity(st.st_size)
    assert out[:4] == ["Capacity:       2.000 GiB",
                       f"Allocation:     {alloc:.3f} {alloc_unit}",
                       f"Physical:       {phys:.3f} {phys_unit}",
                       f"Host allocated: {alloc:.3f} {alloc_unit}"]
    assert out[4] == "" and out[5].startswith("Capacity   = guest-visible size")
    assert ctl.main(["domblkinfo", "--offline", str(path), "--brief"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Capacity:       2147483648", f"Allocation:     {st.st_blocks * 512}",
        f"Physical:       {st.st_size}", f"Host allocated: {st.st_blocks * 512}"]


def test_offline_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + struct.pack(">I", 7) + bytes(504))
    assert ctl.main(["domblkinfo", "--offline", str(bad)]) == 1
    assert capsys.readouterr().err == f"qblock ctl: {bad}: Unsupported qcow2 version 7\n"
    assert ctl.main(["domblkinfo", "--offline", str(tmp_path / "missing")]) == 1
    assert "No such file or directory" in capsys.readouterr().err
    assert ctl.main(["domblkinfo", "--socket", str(tmp_path / "none.sock")]) == 1
    assert "domblkinfo needs a NODE" in capsys.readouterr().err


# -- virsh's output format --------------------------------------------------------------------

@pytest.mark.parametrize("value, text", [
    (0, "0.000 B"), (1023, "1023.000 B"), (1024, "1.000 KiB"), (1536, "1.500 KiB"),
    (2 << 30, "2.000 GiB"), ((1 << 40) - 1, "1024.000 GiB"), (3 << 40, "3.000 TiB"),
    (5 << 50, "5.000 PiB"), (2 << 60, "2.000 EiB")])
def test_pretty_capacity_like_virsh(value: int, text: str) -> None:
    scaled, unit = ctl_blkinfo.pretty_capacity(value)
    assert f"{scaled:.3f} {unit}" == text


def test_all_zero_prints_dashes() -> None:
    info = ctl_blkinfo.BlockInfo(0, 0, 0, DiskSource(None, "network", "raw"),
                                 "actual-size", "actual-size")
    assert ctl_blkinfo.format_block_info(info) == [
        "Capacity:       -", "Allocation:     -", "Physical:       -", "Host allocated: -"]
