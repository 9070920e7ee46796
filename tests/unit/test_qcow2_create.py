"""qcow2 creation: byte for byte what qemu-img create writes, QEMU's messages and line."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qblock.drivers.qcow2.create import create_image, formatting_line
from qblock.errors import QBlockError

QEMU_IMG = shutil.which("qemu-img")
requires_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")


def _qemu_create(path: Path, size: int, opts: dict[str, Any]) -> str:
    args = [QEMU_IMG or "qemu-img", "create", "-f", "qcow2"]
    o = dict(opts)
    if "backing_file" in o:
        args += ["-u", "-b", o.pop("backing_file"), "-F", o.pop("backing_fmt")]
    if o:
        args += ["-o", ",".join(f"{k}={'on' if v is True else 'off' if v is False else v}"
                                for k, v in o.items())]
    out = subprocess.run([*args, path.name, str(size)], check=True, capture_output=True,
                         text=True, cwd=path.parent)
    return out.stdout.strip()


CASES = [
    (1 << 30, {}),
    (64 << 20, {"compat": "0.10"}),
    (64 << 20, {"cluster_size": 4096, "compression_type": "zstd"}),
    (64 << 20, {"cluster_size": 512, "refcount_bits": 1}),
    (64 << 20, {"cluster_size": 512, "refcount_bits": 64}),
    (3 << 30, {"cluster_size": 2 << 20, "extended_l2": True}),
    (64 << 20, {"extended_l2": True, "lazy_refcounts": True, "refcount_bits": 8}),
    (64 << 20, {"backing_file": "base.qcow2", "backing_fmt": "qcow2"}),
    (1 << 40, {"cluster_size": 16384}),
    (0, {}),
    (100 << 20, {"cluster_size": 4096, "preallocation": "metadata"}),
    (10 << 20, {"extended_l2": True, "preallocation": "metadata"}),
]


@requires_qemu
@pytest.mark.parametrize("size,opts", CASES)
def test_create_matches_qemu_img(tmp_path: Path, size: int, opts: dict[str, Any]) -> None:
    ours = tmp_path / "ours.qcow2"
    theirs = tmp_path / "theirs.qcow2"
    create_image(str(ours), size, **opts)
    line = _qemu_create(theirs, size, opts)
    assert ours.read_bytes() == theirs.read_bytes()
    qemu_opts = {k: ("on" if v is True else v) for k, v in opts.items()}
    assert formatting_line("theirs.qcow2", size, qemu_opts) == line


def test_formatting_line_key_order() -> None:
    # Key order as printed by qemu-img 7.2 for these options (see test above for the check
    # against the real tool with the common ones).
    line = formatting_line("f.qcow2", 1048576, {
        "compat": "1.1", "backing_file": "b.qcow2", "backing_fmt": "qcow2",
        "preallocation": "off", "extended_l2": True, "lazy_refcounts": False})
    assert line == ("Formatting 'f.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=on "
                    "preallocation=off compression_type=zlib size=1048576 compat=1.1 "
                    "backing_file=b.qcow2 backing_fmt=qcow2 lazy_refcounts=off refcount_bits=16")


@pytest.mark.parametrize("opts,message", [
    ({"cluster_size": 1000}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster_size": 4 << 20}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster_size": 4096, "extended_l2": True},
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    ({"compat": "0.10", "lazy_refcounts": True},
     "Lazy refcounts only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"compat": "0.10", "refcount_bits": 8},
     "Different refcount widths than 16 bits require compatibility level 1.1 or above "
     "(use version=v3 or greater)"),
    ({"refcount_bits": 3}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"compat": "0.10", "compression_type": "zstd"},
     "Non-zlib compression type is only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"compat": "1.2"}, "Parameter 'version' does not accept value '1.2'"),
    ({"compression_type": "lz"}, "Parameter 'compression-type' does not accept value 'lz'"),
    ({"backing_fmt": "raw"}, "Backing format cannot be used without backing file"),
])
def test_create_errors(tmp_path: Path, opts: dict[str, Any], message: str) -> None:
    with pytest.raises(QBlockError) as e:
        create_image(str(tmp_path / "x.qcow2"), 1 << 20, **opts)
    assert str(e.value) == message


@requires_qemu
def test_created_image_passes_qemu_check(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    create_image(str(path), 1 << 30, cluster_size=512, refcount_bits=64)
    subprocess.run([QEMU_IMG or "qemu-img", "check", str(path)], check=True,
                   capture_output=True)
