"""qblock.create() makes images that qemu-img recognises, with the asked-for layout."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import qblock
from qblock.errors import InvalidArgument

pytestmark = pytest.mark.interop


def _info(path: Path) -> dict:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_create_raw_and_qcow2_seen_by_qemu_img(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    qblock.create(raw, 3 << 20, "raw")
    assert _info(raw)["format"] == "raw" and _info(raw)["virtual-size"] == 3 << 20
    q = tmp_path / "d.qcow2"
    qblock.create(q, 1 << 30, cluster_size=4096, lazy_refcounts=True)
    info = _info(q)
    assert (info["format"], info["virtual-size"], info["cluster-size"]) == ("qcow2", 1 << 30, 4096)
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    with qblock.open(q) as disk:
        disk.write(4000, b"\x5a" * 200)
    res = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 4000 200", str(q)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout


def test_create_refuses_unknown_format_and_options(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="Unknown file format 'vmdk'"):
        qblock.create(tmp_path / "x", 1 << 20, "vmdk")
    with pytest.raises(InvalidArgument, match="cluster_size"):
        qblock.create(tmp_path / "y.raw", 1 << 20, "raw", cluster_size=4096)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.raw").exists()
