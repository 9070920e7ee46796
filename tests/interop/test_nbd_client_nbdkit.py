"""qblock's nbd client driver against nbdkit's memory plugin (a server that is not QEMU).

qblock writes, zero-writes and discards through the driver while a bytearray model follows;
every read through qblock equals the model, and nbdcopy (libnbd, another client) reading the
same export afterwards gets the model's bytes too.
"""
from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

import qblock
from daemon_tools import wait_for_socket

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(shutil.which("nbdkit") is None or shutil.which("nbdcopy") is None,
                                 reason="nbdkit and nbdcopy are needed")]
SIZE = 4 << 20


def test_client_against_nbdkit_memory(tmp_path: Path) -> None:
    sock = tmp_path / "nbdkit.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "memory", str(SIZE)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        model = bytearray(SIZE)
        rng = random.Random(7)
        options = {"driver": "nbd", "server": {"type": "unix", "path": str(sock)}}
        with qblock.open(options) as disk:
            assert disk.size == SIZE
            for _ in range(60):
                off, length = rng.randrange(SIZE - 70000), rng.randrange(1, 70000)
                kind = rng.choice(("write", "write", "zero"))
                if kind == "write":
                    data = rng.randbytes(length)
                    disk.write(off, data)
                    model[off:off + length] = data
                else:
                    disk.write_zeroes(off, length)
                    model[off:off + length] = bytes(length)
                probe = rng.randrange(SIZE - 100000)
                assert disk.read(probe, 100000) == model[probe:probe + 100000]
            disk.flush()
            assert disk.read(0, SIZE) == model
        out = tmp_path / "copy.raw"
        subprocess.run(["nbdcopy", f"nbd+unix://?socket={sock}", str(out)], check=True,
                       timeout=60)
        assert out.read_bytes() == model
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stderr:
            proc.stderr.close()
