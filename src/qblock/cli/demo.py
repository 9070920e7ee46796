"""``qblock demo``: the API on a scratch image, with one traced write through every layer."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import qblock
from qblock import trace


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qblock demo", description=__doc__)
    parser.add_argument("--dir", help="where to create the scratch image (default: a temp dir)")
    parser.add_argument("--size", type=int, default=64 << 20, help="image size in bytes")
    args = parser.parse_args(argv)
    workdir = args.dir or tempfile.mkdtemp(prefix="qblock-demo-")
    path = os.path.join(workdir, "scratch.raw")
    with open(path, "wb") as f:
        f.truncate(args.size)
    print(f"scratch image: {path} ({args.size} bytes, raw)")
    with qblock.open(path, driver="raw") as disk:
        print(f"graph: BlockBackend -root-> {disk.node.node_name} (raw) "
              f"-file-> {disk.node.file.node.node_name} (file)")
        if not trace.has_sinks():
            trace.add_sink(trace.log_sink(sys.stdout))
        trace.enable("blk_co_*")
        trace.enable("bdrv_co_*")
        trace.enable("file_co_*")
        print("trace of one 4 KiB write at offset 1 MiB:")
        pattern = b"\xab" * 4096
        disk.write(1 << 20, pattern)
        trace.reset()
        verdict = "ok" if disk.read(1 << 20, 4096) == pattern else "MISMATCH"
        print(f"read back: {verdict}")
        st = disk.backend.stats.to_qmp(disk.node.wr_highest_offset)
        print(f"stats: wr_bytes={st['wr_bytes']} rd_bytes={st['rd_bytes']} "
              f"wr_highest_offset={st['wr_highest_offset']}")
    return 0
