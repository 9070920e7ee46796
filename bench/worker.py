"""The qblock side of a workload: ``python -m bench.worker SPEC.json [--profile OUT]``.

Opens the image with ``qblock.open(path, driver=FMT)`` and issues the spec's requests in order,
one at a time like qemu-io's commands: writes from a buffer filled with the pattern once,
reads into one reusable buffer (both from ``qblock.blockalign``, as qemu-io's come from
qemu_io_alloc()'s blk_blockalign()), flushes with ``disk.flush()``.  Prints a JSON report (bytes,
requests, and the open / requests / close split) on stdout.  ``--profile`` writes cProfile
statistics of the whole run to OUT, to see where the time goes.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import sys
import time
from pathlib import Path
from typing import Any

import qblock


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Execute a workload spec through the public API; return what was done and how long."""
    t0 = time.perf_counter()
    disk = qblock.open(spec["image"], driver=spec["format"], read_only=spec["read_only"])
    t1 = time.perf_counter()
    write_bufs: dict[tuple[int, int], memoryview] = {}
    read_buf = qblock.blockalign(max((op[2] for op in spec["ops"] if op[0] == "read"), default=0))
    nbytes = requests = 0
    try:
        for kind, offset, length, pattern in spec["ops"]:
            if kind == "write":
                data = write_bufs.get((length, pattern))
                if data is None:
                    data = write_bufs[length, pattern] = qblock.blockalign(length)
                    data[:] = bytes([pattern]) * length
                disk.write(offset, data)
            elif kind == "read":
                disk.readinto(offset, read_buf[:length])
            else:
                disk.flush()
                continue
            nbytes += length
            requests += 1
        t2 = time.perf_counter()
    finally:
        disk.close()
    t3 = time.perf_counter()
    return {"bytes": nbytes, "requests": requests, "open_s": t1 - t0, "io_s": t2 - t1,
            "close_s": t3 - t2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    parser.add_argument("spec", type=Path, help="workload spec (JSON) written by the harness")
    parser.add_argument("--profile", type=Path, help="write cProfile statistics to this file")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    if args.profile:
        profiler = cProfile.Profile()
        report = profiler.runcall(run, spec)
        profiler.dump_stats(args.profile)
    else:
        report = run(spec)
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
