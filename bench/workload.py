"""Request workloads run identically by qemu-io and by the qblock worker.

A workload is an image, its format, an open mode and a list of requests.  The QEMU side renders
the requests as ``qemu-io -f FMT -c ...`` commands; the qblock side hands the same list to
``bench.worker`` in a fresh Python process, which issues them through qblock's public API.
Both sides are timed from outside, as whole processes, the same way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import qblock

from bench.scenario import MIB, Context, Measurement, Scenario

# Linux execve() limits the argument strings to ARG_MAX (2 MiB with an 8 MiB stack) including the
# environment; one qemu-io invocation takes at most this many bytes of -c commands.
QEMU_IO_ARG_BUDGET = 512 * 1024

# A request: ("write", offset, length, pattern) / ("read", offset, length, 0) / ("flush", 0, 0, 0)
Op = tuple[str, int, int, int]
KINDS = ("read", "write", "flush")


def sequential(kind: str, size: int, chunk: int, pattern: int = 0) -> list[Op]:
    """Requests of ``chunk`` bytes covering [0, size) in order (the last may be shorter)."""
    return [(kind, off, min(chunk, size - off), pattern) for off in range(0, size, chunk)]


@dataclass(frozen=True)
class Workload:
    """The same requests for both sides; ``ops`` ends with a flush for write workloads."""

    image: Path
    fmt: str
    ops: Sequence[Op]
    read_only: bool = False

    def __post_init__(self) -> None:
        for op in self.ops:
            if op[0] not in KINDS:
                raise ValueError(f"unknown request kind {op[0]!r}")

    @property
    def bytes(self) -> int:
        return sum(op[2] for op in self.ops if op[0] != "flush")

    @property
    def requests(self) -> int:
        return sum(1 for op in self.ops if op[0] != "flush")

    def empty(self) -> Workload:
        """The same open and close with no request: each side's start-up cost."""
        return Workload(self.image, self.fmt, (), self.read_only)


# -- timing ---------------------------------------------------------------------------------
def timed(argv: list[str], *, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run a process to completion; return its wall time and stdout.  Fails loudly."""
    start = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=env, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or proc.stderr.strip():
        raise RuntimeError(f"{argv[0]} failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[:2000]}")
    return elapsed, proc.stdout


# -- QEMU side: qemu-io ---------------------------------------------------------------------
def qemu_io_command(op: Op) -> str:
    """The qemu-io command for one request (``-q``: no per-request statistics line)."""
    kind, offset, length, pattern = op
    if kind == "write":
        return f"write -q -P 0x{pattern:02x} {offset} {length}"
    if kind == "read":
        return f"read -q {offset} {length}"
    return "flush"


def qemu_io_batches(ops: Iterable[Op], budget: int = QEMU_IO_ARG_BUDGET) -> list[list[str]]:
    """Split the commands into batches whose -c arguments fit one command line."""
    batches: list[list[str]] = [[]]
    used = 0
    for op in ops:
        cmd = qemu_io_command(op)
        cost = len(cmd) + len("-c") + 2
        if batches[-1] and used + cost > budget:
            batches.append([])
            used = 0
        batches[-1].append(cmd)
        used += cost
    return batches


def qemu_io_argv(wl: Workload, commands: list[str]) -> list[str]:
    # qemu-io defaults to writethrough (a flush after every write); qblock writes back, as
    # qemu-img bench -t writeback does: both sides flush only where the workload says so.
    argv = ["qemu-io", "-f", wl.fmt, "-t", "writeback"]
    if wl.read_only:
        argv.append("-r")
    for cmd in commands:
        argv += ["-c", cmd]
    return argv + [str(wl.image)]


def run_qemu_io(wl: Workload) -> Measurement:
    """Run the workload with qemu-io, one process per command-line batch, timed end to end."""
    batches = qemu_io_batches(wl.ops) if wl.ops else [[]]
    total = 0.0
    for commands in batches:
        elapsed, _ = timed(qemu_io_argv(wl, commands))
        total += elapsed
    return Measurement(total, wl.bytes, invocations=len(batches),
                       detail={"requests": wl.requests})


# -- QEMU side: qemu-img bench -----------------------------------------------------------
def qemu_img_bench_argv(wl: Workload, *, empty: bool = False) -> list[str]:
    """``qemu-img bench`` doing the workload's requests: it must be sequential, one size, from 0.

    qemu-img bench reuses one buffer for every request (qemu-io allocates one per command);
    queue depth 1 like qemu-io and the worker.  A trailing flush becomes ``--flush-interval``
    equal to the request count: one flush after the last request.
    """
    reqs = [op for op in wl.ops if op[0] != "flush"]
    kinds = {op[0] for op in reqs}
    chunk = reqs[0][2] if reqs else 0
    if (len(kinds) != 1 or any(op != (reqs[0][0], i * chunk, chunk, reqs[0][3])
                               for i, op in enumerate(reqs))
            or any(op[0] == "flush" for op in wl.ops[:-1])):
        raise ValueError("qemu-img bench runs only sequential same-size requests from offset 0")
    count = 0 if empty else len(reqs)
    argv = ["qemu-img", "bench", "-f", wl.fmt, "-t", "writeback", "-d", "1", "-c", str(count),
            "-s", str(chunk)]
    if "write" in kinds:
        argv += ["-w", f"--pattern={reqs[0][3]}"]
        if wl.ops[-1][0] == "flush" and count:
            argv.append(f"--flush-interval={count}")
    return argv + [str(wl.image)]


def run_qemu_img_bench(wl: Workload, *, empty: bool = False) -> Measurement:
    elapsed, _ = timed(qemu_img_bench_argv(wl, empty=empty))
    return Measurement(elapsed, 0 if empty else wl.bytes, detail={"requests": wl.requests})


# -- qblock side: bench.worker --------------------------------------------------------------
def worker_env() -> dict[str, str]:
    """The environment of a worker: wherever this process found qblock and bench, it will too."""
    paths = [str(Path(qblock.__file__).resolve().parent.parent),
             str(Path(__file__).resolve().parent.parent)]
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        paths += [os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    # an installed package runs from cached bytecode; don't time a recompile of every module
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def write_spec(wl: Workload, path: Path) -> Path:
    """Store the workload as the worker's JSON spec (also handy to profile a worker by hand)."""
    spec = {"image": str(wl.image), "format": wl.fmt, "read_only": wl.read_only,
            "ops": [list(op) for op in wl.ops]}
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def run_worker(spec: Path) -> Measurement:
    """Run ``python -m bench.worker SPEC`` and time it; the worker reports what it did."""
    elapsed, out = timed([sys.executable, "-m", "bench.worker", str(spec)], env=worker_env())
    report = json.loads(out)
    return Measurement(elapsed, report["bytes"], detail=report)


def spec_path(ctx: Context, name: str) -> Path:
    return ctx.dir / f"{name}.spec.json"


# -- building scenarios from workloads ------------------------------------------------------
def fill_raw(path: Path, size: int, pattern: int) -> None:
    """Write a raw file of ``size`` bytes of ``pattern`` (allocated, not sparse) and sync it."""
    chunk = memoryview(bytes([pattern]) * (8 * MIB))
    with open(path, "wb") as f:
        for off in range(0, size, len(chunk)):
            f.write(chunk[:size - off])
        f.flush()
        os.fsync(f.fileno())


def io_scenario(name: str, description: str, *, prepare: Callable[[Path, int], None],
                make_ops: Callable[[int], list[Op]], fmt: str = "raw", read_only: bool = False,
                unit: str = "MiB/s", qemu_tool: str = "qemu-io") -> Scenario:
    """A scenario whose both sides run the same request list on one image.

    ``prepare(image, size)`` creates the image; ``make_ops(size)`` gives the requests.  The
    QEMU side is ``qemu-io`` or ``qemu-img-bench`` (sequential workloads only).  The start-up
    runs open and close the same image with no request.
    """
    if qemu_tool not in ("qemu-io", "qemu-img-bench"):
        raise ValueError(f"unknown QEMU tool {qemu_tool!r}")

    def workload(ctx: Context) -> Workload:
        wl: Workload = ctx.data["workload"]
        return wl

    def setup(ctx: Context) -> None:
        image = ctx.dir / f"image.{fmt}"
        prepare(image, ctx.size)
        wl = Workload(image, fmt, make_ops(ctx.size), read_only)
        if qemu_tool == "qemu-img-bench":
            qemu_img_bench_argv(wl)  # refuses a workload it cannot express
        ctx.files["image"] = image
        ctx.data["workload"] = wl
        write_spec(wl, spec_path(ctx, "run"))
        write_spec(wl.empty(), spec_path(ctx, "startup"))

    def amount(m: Measurement, wl: Workload) -> Measurement:
        if unit == "IOPS":
            m.amount = wl.requests
        return m

    def run_qemu(ctx: Context) -> Measurement:
        wl = workload(ctx)
        if qemu_tool == "qemu-img-bench":
            return amount(run_qemu_img_bench(wl), wl)
        return amount(run_qemu_io(wl), wl)

    def startup_qemu(ctx: Context) -> float:
        wl = workload(ctx)
        if qemu_tool == "qemu-img-bench":
            return run_qemu_img_bench(wl, empty=True).seconds
        return run_qemu_io(wl.empty()).seconds

    return Scenario(
        name=name, description=description, unit=unit, setup=setup,
        run_qblock=lambda ctx: amount(run_worker(spec_path(ctx, "run")), workload(ctx)),
        run_qemu=run_qemu,
        startup_qblock=lambda ctx: run_worker(spec_path(ctx, "startup")).seconds,
        startup_qemu=startup_qemu,
    )
