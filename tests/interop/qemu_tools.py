"""Run the real QEMU tools (qemu-img, qemu-io) and parse what they print.

Also the shared vocabulary of the qcow2 interop tests: an operation list (``Op``) that can be
applied through qblock, replayed through qemu-io and applied to a bytearray model with QEMU's
semantics, so that the three can be compared byte for byte.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import pty
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
TIMEOUT = 120

requires_qemu = pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None,
                                   reason="qemu-img and qemu-io (qemu-utils) are not installed")


def slow_mode() -> bool:
    """True when the full slow runs are wanted (QBLOCK_SLOW=1), else CI runs a bounded slice."""
    return os.environ.get("QBLOCK_SLOW", "") not in ("", "0")


class ToolError(AssertionError):
    """A QEMU tool failed where the test expected it to succeed."""


def run(args: Sequence[str | os.PathLike[str]], *, check: bool = True,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; raise ToolError on a non-zero exit when ``check``."""
    argv = [os.fspath(a) for a in args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C"})
    if check and proc.returncode != 0:
        raise ToolError(f"{' '.join(argv)} exited {proc.returncode}\n"
                        f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


QBLOCK_IMG = [sys.executable, "-m", "qblock.cli.main", "img"]


def run_on_terminal(argv: Sequence[str | os.PathLike[str]], *,
                    cwd: str | os.PathLike[str] | None = None
                    ) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run ``argv`` with stdout on a pseudo-terminal (qblock from this test's sys.path);
    returns the process and everything it showed there, \n as the terminal's \r\n."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(list(argv), cwd=cwd, stdout=secondary, stderr=subprocess.PIPE,
                              env=env, timeout=TIMEOUT, check=False, text=True)
        os.close(secondary)
        secondary = -1
        chunks = []
        while True:  # until the terminal reports its other side closed and drained
            try:
                chunk = os.read(primary, 65536)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    return proc, b"".join(chunks).decode()


def qemu_img(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([QEMU_IMG or "qemu-img", *args], check=check)


def create(path: str | os.PathLike[str], size: int | None, *, fmt: str = "qcow2",
           backing: str | None = None, backing_fmt: str | None = None,
           **options: object) -> None:
    """``qemu-img create``; ``options`` become ``-o key=value`` (bools as on/off)."""
    opts = []
    for key, value in options.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        opts.append(f"{key}={value}")
    args: list[str | os.PathLike[str]] = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    args.append(path)
    if size is not None:
        args.append(str(size))
    qemu_img(*args)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """``qemu-img check --output=json``: the exit code and the ImageCheck object."""

    returncode: int
    report: dict[str, Any]
    stderr: str

    @property
    def corruptions(self) -> int:
        return int(self.report.get("corruptions", 0))

    @property
    def leaks(self) -> int:
        return int(self.report.get("leaks", 0))

    @property
    def check_errors(self) -> int:
        return int(self.report.get("check-errors", 0))

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and not (self.corruptions or self.leaks or self.check_errors)

    def __str__(self) -> str:
        return f"exit {self.returncode}: {json.dumps(self.report)} {self.stderr.strip()}"


def check(path: str | os.PathLike[str], *, repair: str | None = None,
          fmt: str = "qcow2") -> CheckResult:
    """``qemu-img check [-r leaks|all]``; exit 0 clean, 2 corruptions, 3 leaks (REFERENCE §7)."""
    args: list[str | os.PathLike[str]] = ["check", "-f", fmt, "--output=json"]
    if repair:
        args += ["-r", repair]
    proc = qemu_img(*args, path, check=False)
    if proc.returncode not in (0, 1, 2, 3):
        raise ToolError(f"qemu-img check {path} exited {proc.returncode}: {proc.stderr}")
    # With -r the repair report precedes the JSON of the double check; take the last object.
    # Exit 1 (check not completed) may print no JSON at all.
    text = proc.stdout
    start = text.rfind("\n{") + 1 if "\n{" in text else text.find("{")
    report = json.loads(text[start:]) if start >= 0 else {}
    return CheckResult(proc.returncode, report, proc.stderr)


def compare(a: str | os.PathLike[str], b: str | os.PathLike[str], *, fmt_a: str = "qcow2",
            fmt_b: str = "qcow2", strict: bool = False) -> subprocess.CompletedProcess[str]:
    """``qemu-img compare``: exit 0 identical, 1 mismatch ("Content mismatch at offset N!")."""
    args = ["compare", "-U", "-f", fmt_a, "-F", fmt_b] + (["-s"] if strict else [])
    return qemu_img(*args, a, b, check=False)


def info(path: str | os.PathLike[str], *, fmt: str = "qcow2") -> dict[str, Any]:
    return json.loads(qemu_img("info", "-U", "-f", fmt, "--output=json", path).stdout)


def to_raw(path: str | os.PathLike[str], dest: str | os.PathLike[str], *,
           fmt: str = "qcow2") -> bytes:
    """The guest content of an image (backing chain included) as QEMU reads it."""
    qemu_img("convert", "-U", "-f", fmt, "-O", "raw", path, dest)
    return Path(dest).read_bytes()


def qemu_io(path: str | os.PathLike[str], commands: Iterable[str], *, fmt: str | None = "qcow2",
            read_only: bool = False, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run qemu-io commands on an image; with ``check`` any failed command is an error.

    qemu-io opens with discard=unmap (BDRV_O_UNMAP), so its discards reach the format driver.
    """
    args: list[str | os.PathLike[str]] = [QEMU_IO or "qemu-io"]
    if fmt:
        args += ["-f", fmt]
    if read_only:
        args.append("-r")
    for command in commands:
        args += ["-c", command]
    args.append(path)
    proc = run(args, check=False)
    if check and (proc.returncode != 0 or "failed" in proc.stdout or proc.stderr):
        raise ToolError(f"qemu-io {path} exited {proc.returncode}\nstdout: {proc.stdout}\n"
                        f"stderr: {proc.stderr}")
    return proc


def qemu_io_open_error(path: str | os.PathLike[str], *, fmt: str = "qcow2",
                       read_only: bool = True) -> str | None:
    """QEMU's message when qemu-io cannot open an image (``None`` if it opens)."""
    proc = qemu_io(path, ["info"], fmt=fmt, read_only=read_only, check=False)
    prefix = f"can't open device {os.fspath(path)}: "
    for line in proc.stderr.splitlines():
        if prefix in line:
            return line.split(prefix, 1)[1]
    return None


def qemu_io_corruption_message(path: str | os.PathLike[str], length: int, *,
                               fmt: str = "qcow2") -> str | None:
    """The corruption QEMU reports while reading ``length`` bytes read-only (``None`` if none).

    qcow2_signal_corruption prints "qcow2: Image is corrupt: <msg>; further non-fatal
    corruption events will be suppressed" for a read-only node.
    """
    proc = qemu_io(path, [f"read -q 0 {length}"], fmt=fmt, read_only=True, check=False)
    match = re.search(r"qcow2: (?:Image is corrupt|Marking image as corrupt): (.*?); further",
                      proc.stderr)
    return match.group(1) if match else None


# -- operation lists ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Op:
    """One guest request: write, zero (write -z [-u]), discard or compressed write (write -c)."""

    kind: str
    offset: int
    length: int
    seed: int = 0
    unmap: bool = False
    compressible: bool = True

    def data(self) -> bytes:
        """The bytes a write carries: compressible text or random noise, fixed by ``seed``."""
        rng = random.Random(self.seed)
        if self.compressible:
            word = f"qblock-{self.seed}-".encode()
            fill = bytes(rng.randrange(256) for _ in range(64)) + word * 8
            return (fill * (self.length // len(fill) + 1))[:self.length]
        return rng.randbytes(self.length)


def apply_model(model: bytearray, op: Op, cluster_size: int) -> None:
    """Apply ``op`` to a guest-content model with QEMU's qcow2 v3 semantics.

    A discard reads back as zeroes only for whole clusters (and the final partial cluster of
    the image); qcow2 ignores the unaligned head and tail (qcow2_co_pdiscard).
    """
    end = op.offset + op.length
    if op.kind in ("write", "compress"):
        model[op.offset:end] = op.data()
    elif op.kind == "zero":
        model[op.offset:end] = bytes(op.length)
    elif op.kind == "discard":
        start = -(-op.offset // cluster_size) * cluster_size
        stop = end if end == len(model) else end - end % cluster_size
        if stop > start:
            model[start:stop] = bytes(stop - start)
    else:
        raise ValueError(op.kind)


def apply_qblock(disk: Any, op: Op) -> None:
    """Apply ``op`` through a synchronous ``qblock.Disk``."""
    import qblock
    from qblock.drivers.base import ReqFlags

    if op.kind == "write":
        disk.write(op.offset, op.data())
    elif op.kind == "zero":
        disk.write_zeroes(op.offset, op.length, may_unmap=op.unmap)
    elif op.kind == "discard":
        disk.discard(op.offset, op.length)
    elif op.kind == "compress":
        qblock.run(disk.backend.pwritev(op.offset, op.data(), ReqFlags.WRITE_COMPRESSED))
    else:
        raise ValueError(op.kind)


def qemu_io_commands(ops: Iterable[Op], workdir: Path) -> list[str]:
    """The qemu-io commands for ``ops``; write data is staged in files under ``workdir``."""
    commands = []
    for i, op in enumerate(ops):
        if op.kind in ("write", "compress"):
            src = workdir / f"op{i}.bin"
            src.write_bytes(op.data())
            flag = "-c " if op.kind == "compress" else ""
            commands.append(f"write -q {flag}-s {src} {op.offset} {op.length}")
        elif op.kind == "zero":
            commands.append(f"write -q -z {'-u ' if op.unmap else ''}{op.offset} {op.length}")
        elif op.kind == "discard":
            commands.append(f"discard -q {op.offset} {op.length}")
        else:
            raise ValueError(op.kind)
    return commands
