"""NBD exports: qblock daemon against qemu-storage-daemon serving the same qcow2 image (issue 7).

Each run starts the daemon with the image exported read-only over a unix socket, waits for the
socket, then times only the client: ``nbdcopy`` reading the whole export to /dev/null with 1 or
4 connections, or fio's nbd engine doing 4 KiB random reads at queue depth 1 or 16.  The image
(2 x ``--size``, 2 GiB by default) is written in full by ``qemu-img bench`` in setup.  The
daemons' start-up is outside the timed part, so these times are net by construction.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.scenario import Context, Measurement, Scenario, register
from bench.scenarios.qcow2 import create_filled
from bench.sockets import wait_listening
from bench.workload import worker_env

IMAGE_FACTOR = 2
FIO_READS_PER_GIB = 20000


def _setup(ctx: Context) -> None:
    ctx.files["image"] = ctx.dir / "disk.qcow2"
    create_filled(ctx.files["image"], IMAGE_FACTOR * ctx.size)


def _daemon_argv(kind: str, image: Path, sock: Path) -> list[str]:
    prog = ([sys.executable, "-m", "qblock.cli.main", "daemon"] if kind == "qblock"
            else [shutil.which("qemu-storage-daemon") or "qemu-storage-daemon"])
    return [*prog, "--blockdev", f"driver=file,node-name=f,filename={image}",
            "--blockdev", "driver=qcow2,node-name=disk,file=f",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=disk,name=disk"]


@contextmanager
def _serving(kind: str, ctx: Context) -> Iterator[str]:
    """Run one daemon exporting the image; yield the export's NBD URI.

    The socket lives in a short temporary directory: a unix socket path must stay below
    108 bytes, which a deep --dir can exceed.
    """
    sockdir = Path(tempfile.mkdtemp(prefix="qb-nbd-"))
    sock = sockdir / f"{kind}.sock"
    proc = subprocess.Popen(_daemon_argv(kind, ctx.files["image"], sock), env=worker_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(sock, proc, f"{kind} daemon")
        yield f"nbd+unix:///disk?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def _timed(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if res.returncode:
        raise RuntimeError(f"{argv[0]} failed: {res.stderr.strip()}")
    return elapsed, res.stdout


def _nbdcopy(connections: int) -> Callable[[str], Callable[[Context], Measurement]]:
    def side(kind: str) -> Callable[[Context], Measurement]:
        def run(ctx: Context) -> Measurement:
            with _serving(kind, ctx) as uri:
                elapsed, _ = _timed(["nbdcopy", f"--connections={connections}", uri, "null:"])
            return Measurement(elapsed, IMAGE_FACTOR * ctx.size, invocations=0)
        return run
    return side


def _fio(depth: int) -> Callable[[str], Callable[[Context], Measurement]]:
    def side(kind: str) -> Callable[[Context], Measurement]:
        def run(ctx: Context) -> Measurement:
            reads = max(64, FIO_READS_PER_GIB * ctx.size >> 30)
            with _serving(kind, ctx) as uri:
                _, out = _timed([
                    "fio", "--name=randread", "--ioengine=nbd", f"--uri={uri}",
                    "--rw=randread", "--bs=4k", f"--iodepth={depth}", f"--number_ios={reads}",
                    f"--size={IMAGE_FACTOR * ctx.size}", "--randseed=3", "--output-format=json"])
            job = json.loads(out[out.index("{"):])["jobs"][0]["read"]  # after fio's banner
            return Measurement(job["runtime"] / 1000, job["total_ios"], invocations=0,
                               detail={"iops": job["iops"]})
        return run
    return side


def _scenario(name: str, description: str, unit: str,
              side: Callable[[str], Callable[[Context], Measurement]]) -> Scenario:
    return Scenario(name, description, unit, _setup, side("qblock"), side("qemu"))


if shutil.which("nbdcopy") and shutil.which("qemu-storage-daemon"):
    for conns in (1, 4):
        register(_scenario(f"nbd-nbdcopy-{conns}conn",
                           f"nbdcopy --connections={conns} of a 2 x size qcow2 export to null:",
                           "MiB/s", _nbdcopy(conns)))
if shutil.which("fio") and shutil.which("qemu-storage-daemon"):
    for qd in (1, 16):
        register(_scenario(f"nbd-fio-randread-4k-qd{qd}",
                           f"fio nbd engine, 4 KiB random reads at queue depth {qd}", "IOPS",
                           _fio(qd)))
