"""Dirty bitmaps against QEMU 7.2: QMP replies side by side with qemu-storage-daemon, qcow2
bitmaps written by qemu-img/qemu-io loaded by qblock and the other way round (same sha256,
``qemu-img check`` clean), and the in_use flag left by a killed daemon.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import qblock
from qblock.errors import QBlockError
from qblock.block.dirty_bitmap import DirtyBitmap, create_bitmap
from tests.interop.daemon_tools import QSD, env, qblock as qblock_argv, qsd, running

legacy = pytest.importorskip("qemu.qmp.legacy")
pytestmark = pytest.mark.skipif(QSD is None or shutil.which("qemu-io") is None,
                                reason="qemu-storage-daemon and qemu-io are needed")
MiB = 1 << 20


def tool(*args: str | Path) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True,
                          timeout=60).stdout


def image(path: Path, size: str = "8M", *opts: str) -> Path:
    tool("qemu-img", "create", "-q", "-f", "qcow2", *opts, path, size)
    return path


def blockdev(path: Path) -> list[str]:
    return ["--blockdev", f"driver=file,node-name=file0,filename={path}",
            "--blockdev", "driver=qcow2,node-name=fmt0,file=file0"]


def session(argv: list[str], sock: Path, steps: list[tuple[str, dict[str, Any]]]
            ) -> list[dict[str, Any]]:
    """Run the QMP steps on a fresh daemon; the replies without ids."""
    with running(argv, sock):
        mon = legacy.QEMUMonitorProtocol(str(sock))
        mon.connect()
        try:
            return [mon.cmd_raw(name, args) for name, args in steps]
        finally:
            mon.close()


def both(tmp: Path, img: Path, steps: list[tuple[str, dict[str, Any]]]
         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The same steps on qblock daemon and qemu-storage-daemon, each on its own copy."""
    (tmp / "q").mkdir()
    (tmp / "s").mkdir()
    mine, theirs = tmp / "q" / img.name, tmp / "s" / img.name
    shutil.copy(img, mine)
    shutil.copy(img, theirs)
    a = session(*qblock_argv(tmp / "q", *blockdev(mine)), steps)
    b = session(*qsd(tmp / "s", *blockdev(theirs)), steps)
    return a, b


def dirty_bitmaps(reply: dict[str, Any]) -> Any:
    return [n.get("dirty-bitmaps") for n in reply["return"] if n["node-name"] == "fmt0"]


def sha_of(d: str, name: str) -> tuple[str, dict[str, Any]]:
    return ("x-debug-block-dirty-bitmap-sha256", {"node": d, "name": name})


def test_qmp_replies_match_qsd(tmp_path: Path) -> None:
    img = image(tmp_path / "t.qcow2")
    add = "block-dirty-bitmap-add"
    steps: list[tuple[str, dict[str, Any]]] = [
        (add, {"node": "fmt0", "name": "a"}),
        (add, {"node": "fmt0", "name": "a"}),
        (add, {"node": "fmt0", "name": ""}),
        (add, {"node": "nosuch", "name": "x"}),
        (add, {"node": "fmt0", "name": "g", "granularity": 1000}),
        (add, {"node": "fmt0", "name": "g", "granularity": 256}),
        (add, {"node": "fmt0", "name": "p", "granularity": 512, "persistent": True,
               "disabled": True}),
        (add, {"node": "fmt0", "name": "big", "granularity": 1 << 31, "persistent": True}),
        (add, {"node": "file0", "name": "f"}),
        (add, {"node": "file0", "name": "fp", "persistent": True}),
        ("block-dirty-bitmap-remove", {"node": "fmt0", "name": "nosuch"}),
        ("block-dirty-bitmap-clear", {"node": "fmt0", "name": "a"}),
        ("block-dirty-bitmap-disable", {"node": "fmt0", "name": "a"}),
        ("block-dirty-bitmap-enable", {"node": "fmt0", "name": "p"}),
        ("block-dirty-bitmap-merge", {"node": "fmt0", "target": "a",
                                      "bitmaps": ["p", {"node": "fmt0", "name": "nosuch"}]}),
        ("block-dirty-bitmap-merge", {"node": "fmt0", "target": "a",
                                      "bitmaps": ["p", {"node": "file0", "name": "f"}]}),
        ("block-dirty-bitmap-merge", {"node": "fmt0", "target": "nosuch", "bitmaps": []}),
        sha_of("fmt0", "a"), sha_of("fmt0", "p"), sha_of("file0", "f"), sha_of("fmt0", "zz"),
        ("query-named-block-nodes", {}),
        ("block-dirty-bitmap-remove", {"node": "fmt0", "name": "p"}),
        ("block-dirty-bitmap-remove", {"node": "fmt0", "name": "p"}),
        ("query-named-block-nodes", {}),
    ]
    mine, theirs = both(tmp_path, img, steps)
    for (name, args), a, b in zip(steps, mine, theirs):
        if name == "query-named-block-nodes":
            assert dirty_bitmaps(a) == dirty_bitmaps(b), args
        else:
            assert a == b, (name, args)


def test_bitmaps_written_by_qemu_load_in_qblock(tmp_path: Path) -> None:
    """qemu-img bitmap --add, then qemu-io writes recorded by the enabled bitmaps."""
    img = image(tmp_path / "q.qcow2", "16M", "-o", "cluster_size=4096")
    tool("qemu-img", "bitmap", "--add", img, "b64k")
    tool("qemu-img", "bitmap", "--add", "-g", "512", img, "b512")
    tool("qemu-img", "bitmap", "--add", "-g", "1M", img, "off")
    tool("qemu-io", "-c", "write 0 100k", "-c", "write 3M 1", "-c", "write 9M 2M",
         "-c", "discard 15M 64k", img)
    tool("qemu-img", "bitmap", "--disable", img, "off")
    tool("qemu-io", "-c", "write 5M 1", img)
    names = ["b64k", "b512", "off"]
    steps = [sha_of("fmt0", n) for n in names] + [("query-named-block-nodes", {})]
    mine, theirs = both(tmp_path, img, steps)
    assert mine[:3] == theirs[:3]
    assert dirty_bitmaps(mine[3]) == dirty_bitmaps(theirs[3])
    with qblock.open(str(img), read_only=True) as disk:
        loaded = {b.name: b for b in disk.node.dirty_bitmaps}
        assert [loaded[n].sha256() for n in names] == [r["return"]["sha256"]
                                                       for r in theirs[:3]]
        assert loaded["b512"].count() == 100 * 1024 + 512 + 2 * MiB + 64 * 1024 + 512
        assert not loaded["off"].enabled and loaded["off"].get(9 * MiB)
        assert not loaded["off"].get(5 * MiB)
        assert all(b.readonly and not b.inconsistent for b in loaded.values())


def info_bitmaps(img: Path) -> list[dict[str, Any]]:
    info = json.loads(tool("qemu-img", "info", "--output=json", img))
    return info["format-specific"]["data"].get("bitmaps", [])


def qsd_shas(tmp: Path, img: Path, names: list[str]) -> list[str]:
    replies = session(*qsd(tmp, *blockdev(img)), [sha_of("fmt0", n) for n in names])
    return [r["return"]["sha256"] for r in replies]


def test_bitmaps_written_by_qblock_load_in_qemu(tmp_path: Path) -> None:
    img = image(tmp_path / "w.qcow2", "32M")
    tool("qemu-img", "bitmap", "--add", img, "old")
    with qblock.open(str(img)) as disk:
        node = disk.node
        new = create_bitmap(node, "new", 4096)
        new.persistent = True
        off = create_bitmap(node, "off", 65536)
        off.persistent = True
        off.enabled = False
        create_bitmap(node, "temp", 65536)
        disk.write(0, b"a" * 70000)
        disk.write(20 * MiB, b"b" * 3 * MiB)
        disk.discard(30 * MiB, MiB)
        expected = {b.name: b.sha256() for b in node.dirty_bitmaps}
    assert tool("qemu-img", "check", img).startswith("No errors were found")
    flags = {b["name"]: (b["granularity"], b["flags"]) for b in info_bitmaps(img)}
    assert flags == {"old": (65536, ["auto"]), "new": (4096, ["auto"]), "off": (65536, [])}
    names = ["old", "new", "off"]
    assert qsd_shas(tmp_path, img, names) == [expected[n] for n in names]
    # a second qblock session rewrites the same bitmaps in place of the first ones
    with qblock.open(str(img)) as disk:
        assert {b.name: b.sha256() for b in disk.node.dirty_bitmaps} == \
            {n: expected[n] for n in names}
        disk.write(25 * MiB, b"c")
        expected = {b.name: b.sha256() for b in disk.node.dirty_bitmaps}
    assert tool("qemu-img", "check", img).startswith("No errors were found")
    assert qsd_shas(tmp_path, img, names) == [expected[n] for n in names]


def killed_daemon_image(tmp: Path) -> Path:
    """An image whose bitmap 'b' was in use by a qblock daemon killed with SIGKILL."""
    img = image(tmp / "k.qcow2", "8M")
    tool("qemu-img", "bitmap", "--add", img, "b")
    tool("qemu-io", "-c", "write 1M 64k", img)
    argv, sock = qblock_argv(tmp, *blockdev(img))
    with running(argv, sock) as proc:
        mon = legacy.QEMUMonitorProtocol(str(sock))
        mon.connect()
        assert mon.cmd_raw("query-named-block-nodes", {})["return"]
        mon.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return img


def test_killed_daemon_leaves_bitmap_inconsistent_and_repair(tmp_path: Path) -> None:
    img = killed_daemon_image(tmp_path)
    assert info_bitmaps(img) == [{"flags": ["in-use", "auto"], "name": "b",
                                  "granularity": 65536}]
    steps = [("block-dirty-bitmap-clear", {"node": "fmt0", "name": "b"}),
             ("block-dirty-bitmap-enable", {"node": "fmt0", "name": "b"}),
             ("query-named-block-nodes", {})]
    mine, theirs = both(tmp_path, img, steps)
    assert mine[:2] == theirs[:2]
    assert mine[0]["error"]["desc"] == "Bitmap 'b' is inconsistent and cannot be used"
    assert dirty_bitmaps(mine[2]) == dirty_bitmaps(theirs[2])
    # qblock extension: repair makes it usable and all dirty, stored without in_use
    repaired = session(*qblock_argv(tmp_path, *blockdev(img), name="r.sock"), [
        ("x-block-dirty-bitmap-repair", {"node": "fmt0", "name": "b"}),
        ("block-dirty-bitmap-clear", {"node": "fmt0", "name": "nosuch"}),
        sha_of("fmt0", "b"), ("query-named-block-nodes", {})])
    all_dirty = DirtyBitmap("b", 8 * MiB, 65536)
    all_dirty.set_all()
    assert repaired[0] == {"return": {}}
    assert repaired[2]["return"]["sha256"] == all_dirty.sha256()
    assert dirty_bitmaps(repaired[3]) == [[{"name": "b", "count": 8 * MiB,
                                            "granularity": 65536, "recording": True,
                                            "busy": False, "persistent": True}]]
    assert info_bitmaps(img) == [{"flags": ["auto"], "name": "b", "granularity": 65536}]
    assert tool("qemu-img", "check", img).startswith("No errors were found")
    assert qsd_shas(tmp_path, img, ["b"]) == [all_dirty.sha256()]


def test_inconsistent_bitmap_can_be_removed(tmp_path: Path) -> None:
    img = killed_daemon_image(tmp_path)
    replies = session(*qblock_argv(tmp_path, *blockdev(img), name="r.sock"), [
        ("block-dirty-bitmap-remove", {"node": "fmt0", "name": "b"}),
        ("query-named-block-nodes", {})])
    assert replies[0] == {"return": {}}
    assert dirty_bitmaps(replies[1]) == [None]
    assert info_bitmaps(img) == []
    assert tool("qemu-img", "check", img).startswith("No errors were found")


def qblock_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qblock.cli.main", "img", *map(str, args)],
                          capture_output=True, text=True, timeout=60, env=env())


def shas(img: Path) -> dict[str, str]:
    with qblock.open(str(img), read_only=True) as disk:
        return {b.name or "": b.sha256() for b in disk.node.dirty_bitmaps}


CLI_STEPS = [
    ["--add", "-g", "1000"], ["--add", "-g", "1000x"], ["--clear"], ["--merge", "nosuch"], [],
    ["--add", "--add"], ["--add", "-g", "4k", "--disable"], ["--merge", "b512"],
    ["--enable", "--clear"], ["--merge", "b512", "-F", "qcow2"], ["--remove"], ["--remove"],
    ["--add", "-g", "512"], ["--merge", "b512", "-b", "{src}"], ["--disable"], ["--add", "-x"],
    ["--add", "-g"],
]


def test_img_bitmap_matches_qemu_img(tmp_path: Path) -> None:
    """The same qemu-img bitmap command lines on two copies: same output, exit status and
    resulting bitmaps (qemu-img info, qemu-img check, sha256 of each bitmap)."""
    src = image(tmp_path / "src.qcow2", "4M")
    tool("qemu-img", "bitmap", "--add", "-g", "512", src, "b512")
    tool("qemu-io", "-c", "write 1000 3000", "-c", "write 2M 300k", src)
    mine, theirs = tmp_path / "mine.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(src, mine)
    shutil.copy(src, theirs)
    for step in CLI_STEPS:
        args = [a.replace("{src}", str(src)) for a in step]
        name = "new" if args != ["--merge", "b512", "-b", str(src)] else "b512"
        a = qblock_img("bitmap", *args, mine, name)
        b = subprocess.run(["qemu-img", "bitmap", *args, str(theirs), name],
                           capture_output=True, text=True, timeout=60)
        assert (a.returncode, a.stderr.replace("qblock-img", "qemu-img").replace(
            "mine", "theirs")) == (b.returncode, b.stderr), step
        assert info_bitmaps(mine) == info_bitmaps(theirs), step
    assert shas(mine) == shas(theirs)
    assert tool("qemu-img", "check", mine).startswith("No errors were found")


def test_img_bitmap_repair(tmp_path: Path) -> None:
    """qblock extension: --repair turns a bitmap left in_use into an all-dirty one."""
    img = killed_daemon_image(tmp_path)
    assert qblock_img("bitmap", "--clear", img, "b").stderr == \
        "qblock-img: Operation clear on bitmap b failed: Bitmap 'b' is inconsistent and " \
        "cannot be used\n"
    done = qblock_img("bitmap", "--repair", img, "b")
    assert (done.returncode, done.stderr) == (0, "")
    assert info_bitmaps(img) == [{"flags": ["auto"], "name": "b", "granularity": 65536}]
    assert tool("qemu-img", "check", img).startswith("No errors were found")
    all_dirty = DirtyBitmap("b", 8 * MiB, 65536)
    all_dirty.set_all()
    assert qsd_shas(tmp_path, img, ["b"]) == [all_dirty.sha256()]
    again = qblock_img("bitmap", "--repair", img, "b")
    assert again.stderr == "qblock-img: Operation repair on bitmap b failed: Bitmap 'b' is " \
                           "not inconsistent\n"


def test_resize_keeps_persistent_bitmaps_loadable(tmp_path: Path) -> None:
    """Bitmaps follow a grow and a shrink; QEMU still loads them (table size matches)."""
    img = image(tmp_path / "r.qcow2", "4M")
    tool("qemu-img", "bitmap", "--add", img, "b")
    with qblock.open(str(img)) as disk:
        disk.write(3 * MiB, b"x" * 4096)
        disk.truncate(40 * MiB)
        disk.write(39 * MiB, b"y")
        disk.truncate(36 * MiB)
        bitmap = disk.node.dirty_bitmaps[0]
        assert (bitmap.size, bitmap.count()) == (36 * MiB, 65536)
        expected = bitmap.sha256()
    assert tool("qemu-img", "check", img).startswith("No errors were found")
    assert qsd_shas(tmp_path, img, ["b"]) == [expected]


def test_resize_refused_with_inconsistent_bitmap(tmp_path: Path) -> None:
    img = killed_daemon_image(tmp_path)
    with qblock.open(str(img)) as disk:
        with pytest.raises(QBlockError, match="Bitmap 'b' is inconsistent and cannot be used"):
            disk.truncate(16 * MiB)
        assert disk.size == 8 * MiB
