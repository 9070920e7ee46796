"""Internal qcow2 snapshots against the real QEMU 7.2 tools and qemu-storage-daemon.

Snapshots qblock takes are listed, checked, applied and deleted by qemu-img with the content
saved when each was taken; snapshots qemu-img takes are listed, applied and deleted by qblock;
``qblock img snapshot`` prints what ``qemu-img snapshot`` prints and exits alike (our error
prefix "qblock-img: " aside); the QMP commands answer like qemu-storage-daemon's; and a
property test runs random write / create / apply / delete sequences against a model.
"""
from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qblock
from daemon_tools import on_both_daemons
from qblock.cli.main import main
from qblock.drivers.qcow2.snapshot_ops import (bdrv_snapshot_create, bdrv_snapshot_delete,
                                               bdrv_snapshot_goto)
from qemu_tools import check, compare, create, qemu_img, qemu_io, requires_qemu, run, \
    slow_mode, to_raw

pytestmark = [pytest.mark.interop, requires_qemu]
MiB = 1024 * 1024


def ours(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """``qblock img ARGS`` in-process: (exit code, stdout, stderr with qemu-img's prefix)."""
    capsys.readouterr()
    rc = main(["img", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err.replace("qblock-img", "qemu-img")


def theirs(*args: str | Path) -> tuple[int, str, str]:
    p = run(["qemu-img", *map(str, args)], check=False)
    return p.returncode, p.stdout, p.stderr


def _assert_clean(path: Path) -> None:
    res = check(path)
    assert res.clean and not res.leaks, str(res)


def _applied_equals(img: Path, name: str, saved: Path, tmp: Path) -> None:
    """qemu-img snapshot -a on a copy gives exactly the saved raw content."""
    work = tmp / f"apply-{name}.qcow2"
    shutil.copyfile(img, work)
    qemu_img("snapshot", "-a", name, work)
    cmp = compare(work, saved, fmt_b="raw")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    work.unlink()


@pytest.mark.parametrize("opts", [
    {"cluster_size": 512}, {}, {"cluster_size": 2 * MiB},
    {"refcount_bits": 64}, {"extended_l2": True, "cluster_size": 128 * 1024},
], ids=["512", "64k", "2M", "refcount64", "extended_l2"])
def test_qblock_snapshots_read_by_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       opts: dict[str, Any]) -> None:
    img = tmp_path / "img.qcow2"
    size = 8 * MiB
    create(img, size, **opts)
    names = ["first", "second", "third"]
    for i, name in enumerate(names):
        with qblock.open(str(img)) as disk:
            disk.write(i * 1536 * 1024, bytes([i + 1]) * (700 * 1024))
            disk.write(4096, bytes([0x40 + i]) * 8192)  # rewrites a cluster every snapshot shares
        to_raw(img, tmp_path / f"{name}.raw")
        assert ours(capsys, "snapshot", "-c", name, img)[0] == 0
    with qblock.open(str(img)) as disk:
        disk.write(0, b"\xee" * (3 * MiB))
    listing = theirs("snapshot", "-l", img)
    assert listing[0] == 0 and [ln.split()[1] for ln in listing[1].splitlines()[2:]] == names
    assert ours(capsys, "snapshot", "-l", img) == listing
    _assert_clean(img)
    for name in names:
        _applied_equals(img, name, tmp_path / f"{name}.raw", tmp_path)
    for name in ("second", "first", "third"):
        qemu_img("snapshot", "-d", name, img)
        _assert_clean(img)
    assert theirs("snapshot", "-l", img) == (0, "", "")


def test_qemu_snapshots_used_by_qblock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "img.qcow2"
    create(img, 4 * MiB)
    steps = [["write -P 1 0 1M", "write -c -P 2 2M 128k"],
             ["write -P 3 512k 1M", "write -z 2M 64k"],
             ["discard 0 256k", "write -P 4 3M 64k"]]
    for i, cmds in enumerate(steps):
        qemu_io(img, cmds)
        to_raw(img, tmp_path / f"s{i}.raw")
        qemu_img("snapshot", "-c", f"s{i}", img)
    qemu_io(img, ["write -P 9 0 4M"])
    assert ours(capsys, "snapshot", "-l", img) == theirs("snapshot", "-l", img)
    for i in (1, 0, 2):
        work = tmp_path / "work.qcow2"
        shutil.copyfile(img, work)
        assert ours(capsys, "snapshot", "-a", f"s{i}", work) == (0, "", "")
        assert compare(work, tmp_path / f"s{i}.raw", fmt_b="raw").returncode == 0
        _assert_clean(work)
    for i in (1, 2, 0):
        assert ours(capsys, "snapshot", "-d", f"s{i}", img) == (0, "", "")
        _assert_clean(img)
    assert theirs("snapshot", "-l", img) == (0, "", "")
    assert qemu_io(img, ["read -P 9 0 4M"], read_only=True).returncode == 0


def test_apply_after_resize_like_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """QEMU 7.2 resizes images with snapshots and gives the snapshot's size back on apply."""
    img = tmp_path / "img.qcow2"
    create(img, 2 * MiB)
    qemu_io(img, ["write -P 3 1M 1M"])
    to_raw(img, tmp_path / "s.raw")
    qemu_img("snapshot", "-c", "s", img)
    for size, mode in (("5M", []), ("1M", ["--shrink"])):
        qemu_img("resize", *mode, img, size)
        qemu_io(img, ["write -P 4 0 64k"])
        work = {who: tmp_path / f"{who}.qcow2" for who in ("q", "o")}
        for path in work.values():
            shutil.copyfile(img, path)
        assert theirs("snapshot", "-a", "s", work["q"]) == (0, "", "")
        assert ours(capsys, "snapshot", "-a", "s", work["o"]) == (0, "", "")
        assert compare(work["o"], work["q"], strict=True).returncode == 0
        assert compare(work["o"], tmp_path / "s.raw", fmt_b="raw").returncode == 0
        _assert_clean(work["o"])


def _without_dates(path: Path) -> bytes:
    """The image file with each snapshot's date_sec/date_nsec zeroed (qcow2.txt "Snapshot
    table entry" bytes 16-23), walking the table as the spec lays it out."""
    data = bytearray(path.read_bytes())
    nb, pos = struct.unpack_from(">IQ", data, 60)
    for _ in range(nb):
        pos = -(-pos // 8) * 8
        id_len, name_len = struct.unpack_from(">HH", data, pos + 12)
        extra = struct.unpack_from(">I", data, pos + 36)[0]
        data[pos + 16:pos + 24] = bytes(8)
        pos += 40 + extra + id_len + name_len
    return bytes(data)


@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_same_bytes_as_qemu_img(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                cluster_size: int) -> None:
    """The same create / write / apply / delete sequence through qemu-img and through qblock
    leaves byte-identical image files, the snapshots' dates aside: same allocation order,
    same tables, same refcounts, same COPIED flags, same discarded clusters."""
    template = tmp_path / "template.qcow2"
    create(template, MiB, cluster_size=cluster_size)
    qemu_io(template, ["write -P 1 0 300k", "write -c -P 2 512k 64k"])
    steps: list[list[str] | str] = [
        ["-c", "a"], "write -P 3 4k 100k", ["-c", "b"], ["-a", "a"], "write -P 4 200k 8k",
        ["-d", "b"], ["-c", "c"], ["-a", "1"], "write -P 5 0 4k", ["-d", "a"]]
    files = {}
    for who in ("q", "o"):
        img = files[who] = tmp_path / f"{who}.qcow2"
        shutil.copyfile(template, img)
        for step in steps:
            if isinstance(step, str):
                qemu_io(img, [step])
            elif who == "q":
                qemu_img("snapshot", *step, img)
            else:
                assert ours(capsys, "snapshot", *step, img) == (0, "", "")
    assert _without_dates(files["o"]) == _without_dates(files["q"])
    _assert_clean(files["o"])


_CASES = [
    ["-a", "nope", "{img}"], ["-d", "nope", "{img}"], ["-d", "1", "{img}"],
    ["-a", "1", "{img}"], ["-a", "base", "{img}"], ["-d", "base", "{img}"],
    ["-c", "base", "{img}"], ["-q", "-c", "", "{img}"], ["{img}"],
    ["-c", "x", "{raw}"], ["-a", "x", "{raw}"], ["-d", "x", "{raw}"], ["-l", "{raw}"],
    ["-l", "-c", "x", "{img}"], ["-x", "{img}"], ["-a"], ["-c", "a", "b", "c"],
    ["-U", "-c", "zz", "{img}"], ["-l", "{dir}/missing.qcow2"], ["-f", "qcow2", "-l", "{img}"],
    ["-l", "-U", "{img}"], ["-l", "--image-opts", "driver=qcow2,file.filename={img}"],
]


@pytest.mark.parametrize("case", _CASES, ids=[" ".join(c) for c in _CASES])
def test_cli_matches_qemu_img(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              case: list[str]) -> None:
    """Each case on its own copies: same exit code, stdout and stderr, and qemu-img check
    clean on the copy qblock changed."""
    template = tmp_path / "template.qcow2"
    create(template, MiB)
    qemu_io(template, ["write -P 7 0 128k"])
    qemu_img("snapshot", "-c", "base", template)
    qemu_io(template, ["write -P 8 64k 128k"])
    results = []
    for who, tool in (("q", theirs), ("o", None)):
        d = tmp_path / who
        d.mkdir()
        shutil.copyfile(template, d / "img.qcow2")
        (d / "img.raw").write_bytes(bytes(MiB))
        argv = [a.format(img=d / "img.qcow2", raw=d / "img.raw", dir=d) for a in case]
        res = tool(*(["snapshot", *argv])) if tool else ours(capsys, "snapshot", *argv)
        results.append((res[0], res[1].replace(str(d), "D"), res[2].replace(str(d), "D")))
    assert results[1] == results[0]
    _assert_clean(tmp_path / "o" / "img.qcow2")
    assert compare(tmp_path / "q" / "img.qcow2", tmp_path / "o" / "img.qcow2").returncode == 0


def test_one_bit_refcounts_refuse_like_qemu(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """refcount_bits=1 cannot hold a second reference: the same error; qblock's image stays
    clean (QEMU leaks the cluster of the L1 copy it wrote first)."""
    for who in ("q", "o"):
        create(tmp_path / f"{who}.qcow2", MiB, refcount_bits=1)
        qemu_io(tmp_path / f"{who}.qcow2", ["write -P 1 0 128k"])
    q = theirs("snapshot", "-c", "s", tmp_path / "q.qcow2")
    o = ours(capsys, "snapshot", "-c", "s", tmp_path / "o.qcow2")
    assert o == q == (1, "", "qemu-img: Could not create snapshot 's': -22 (Invalid argument)\n")
    _assert_clean(tmp_path / "o.qcow2")


# -- QMP on both daemons ----------------------------------------------------------------------
def _prepare(d: Path) -> None:
    create(d / "img.qcow2", 2 * MiB)
    qemu_io(d / "img.qcow2", ["write -P 5 0 512k"])
    create(d / "ro.qcow2", MiB)
    qemu_img("snapshot", "-c", "base", d / "ro.qcow2")
    create(d / "img.raw", MiB, fmt="raw")


def _mask(reply: Any) -> Any:
    """Dates and clocks differ between runs; their presence and types do not."""
    if isinstance(reply, dict):
        return {k: (type(v).__name__ if k.startswith(("date-", "vm-clock-")) else _mask(v))
                for k, v in reply.items()}
    return reply


async def _qmp_script(sock: Path, d: Path) -> list[Any]:
    from qemu.qmp import ExecuteError, QMPClient

    client = QMPClient("test")
    await client.connect(str(sock))
    out: list[Any] = []

    async def ex(cmd: str, args: dict[str, Any] | None = None) -> None:
        try:
            out.append(_mask(await client.execute(cmd, args)))
        except ExecuteError as e:
            out.append((e.error_class, str(e)))

    try:
        await ex("blockdev-add", {"driver": "file", "node-name": "f0",
                                  "filename": str(d / "img.qcow2")})
        await ex("blockdev-add", {"driver": "qcow2", "node-name": "d0", "file": "f0"})
        await ex("blockdev-add", {"driver": "raw", "node-name": "r0",
                                  "file": {"driver": "file", "filename": str(d / "img.raw")}})
        await ex("blockdev-add", {"driver": "qcow2", "node-name": "ro", "read-only": True,
                                  "file": {"driver": "file", "filename": str(d / "ro.qcow2")}})
        await ex("blockdev-snapshot-internal-sync", {"device": "ro", "name": "x"})
        await ex("blockdev-snapshot-delete-internal-sync", {"device": "ro", "name": "base"})
        for name in ("s1", "s1", "", "s2"):
            await ex("blockdev-snapshot-internal-sync", {"device": "d0", "name": name})
        await ex("blockdev-snapshot-internal-sync", {"device": "f0", "name": "x"})
        await ex("blockdev-snapshot-internal-sync", {"device": "r0", "name": "x"})
        await ex("blockdev-snapshot-internal-sync", {"device": "nope", "name": "x"})
        for args in ({}, {"name": "zz"}, {"id": "7"}, {"id": "1", "name": "s2"}):
            await ex("blockdev-snapshot-delete-internal-sync", {"device": "d0", **args})
        await ex("blockdev-snapshot-delete-internal-sync", {"device": "r0", "name": "x"})
        await ex("blockdev-snapshot-delete-internal-sync", {"device": "d0", "id": "1"})
        await ex("transaction", {"actions": [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "d0", "name": "t1"}},
            {"type": "abort", "data": {}}]})
        await ex("transaction", {"actions": [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "d0", "name": "t2"}}]})
        await ex("blockdev-snapshot-delete-internal-sync", {"device": "d0", "name": "s2"})
        await ex("blockdev-snapshot-internal-sync", {"device": "d0", "name": "s3"})
        for node in ("d0", "f0", "r0", "ro"):
            await ex("blockdev-del", {"node-name": node})
    finally:
        await client.disconnect()
    return out


def test_qmp_like_qemu_storage_daemon(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("qemu.qmp")
    results = on_both_daemons(tmp_path, _prepare, _qmp_script)
    assert results["qblock"] == results["qsd"]
    listings = []
    for who in ("qsd", "qblock"):
        img = tmp_path / who / "img.qcow2"
        _assert_clean(img)
        listing = theirs("snapshot", "-l", img)
        assert ours(capsys, "snapshot", "-l", img) == listing  # VM clock set, icount blank
        # ID and TAG columns; dates and clocks are the daemons' own
        listings.append([ln[:26] for ln in listing[1].splitlines()])
    assert listings[0] == listings[1] and len(listings[0]) == 4


def test_apply_with_bitmaps_refused_like_qemu(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Creating a snapshot of an image with a persistent bitmap works; applying one does not
    (bdrv_snapshot_goto(): "Device has active dirty bitmaps")."""
    results = []
    for who in ("q", "o"):
        img = tmp_path / f"{who}.qcow2"
        create(img, MiB)
        qemu_img("bitmap", "--add", img, "bm0")
        tool = theirs if who == "q" else lambda *a: ours(capsys, *a)
        results.append([tool("snapshot", "-c", "s", img), tool("snapshot", "-a", "s", img),
                        tool("snapshot", "-d", "s", img)])
        _assert_clean(img)
    assert results[1] == results[0]
    assert results[0][1] == (1, "", "qemu-img: Could not apply snapshot 's': Device has active "
                                    "dirty bitmaps\n")


# -- property test ----------------------------------------------------------------------------
_SIZE = 512 * 1024
_NAMES = ["a", "b", "c", "d"]
_OPS = st.one_of(
    st.tuples(st.just("write"), st.integers(0, _SIZE // 512 - 1), st.integers(1, 192),
              st.integers(1, 255)),
    st.tuples(st.just("create"), st.sampled_from(_NAMES)),
    st.tuples(st.just("apply"), st.sampled_from(_NAMES)),
    st.tuples(st.just("delete"), st.sampled_from(_NAMES)),
)


@settings(max_examples=100 if slow_mode() else 15, derandomize=not slow_mode(), deadline=None)
@given(st.lists(_OPS, min_size=1, max_size=25),
       st.sampled_from([{"cluster_size": 4096}, {"cluster_size": 65536},
                        {"cluster_size": 65536, "extended_l2": True}]))
def test_random_snapshot_sequences_match_model(ops: list[tuple], opts: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        img = tmp / "img.qcow2"
        create(img, _SIZE, **opts)
        current = bytearray(_SIZE)
        saved: dict[str, bytes] = {}

        async def apply_all() -> None:
            disk = await qblock.open_async(str(img))
            try:
                for op in ops:
                    kind, name = op[0], op[1]
                    if kind == "write":
                        _, sector, count, byte = op
                        count = min(count, _SIZE // 512 - sector)
                        data = bytes([byte]) * (count * 512)
                        await disk.write(sector * 512, data)
                        current[sector * 512:sector * 512 + len(data)] = data
                    elif kind == "create" and name not in saved:
                        await bdrv_snapshot_create(disk.node, name)
                        saved[name] = bytes(current)
                    elif kind == "apply" and name in saved:
                        await bdrv_snapshot_goto(disk.node, name)
                        current[:] = saved[name]
                    elif kind == "delete" and name in saved:
                        await bdrv_snapshot_delete(disk.node, None, name)
                        del saved[name]
                    assert bytes(await disk.read(0, _SIZE)) == current, op
            finally:
                await disk.close()
        qblock.run(apply_all())
        _assert_clean(img)
        listed = theirs("snapshot", "-l", img)[1].splitlines()[2:]
        assert sorted(ln.split()[1] for ln in listed) == sorted(saved)
        for name, content in saved.items():
            (tmp / f"{name}.raw").write_bytes(content)
            _applied_equals(img, name, tmp / f"{name}.raw", tmp)
        assert to_raw(img, tmp / "now.raw") == bytes(current)
