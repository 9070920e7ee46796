"""The ``qblock`` console script and its ``demo`` sub-command, run as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import qblock
from qblock.cli import main as cli

SRC = Path(__file__).resolve().parents[2] / "src"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "qblock.cli.main", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_demo_writes_traces_and_reads_back(tmp_path: Path) -> None:
    res = run_cli("demo", "--dir", str(tmp_path), "--size", str(4 << 20))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "read back: ok" in out
    assert "wr_bytes=4096" in out and "wr_highest_offset=1052672" in out
    events = [line.split(":", 1)[1].split()[0] for line in out.splitlines()
              if line.split("@", 1)[0].isdigit()]
    assert events == ["blk_co_pwritev", "bdrv_co_pwritev_part", "bdrv_co_pwritev_part",
                      "file_co_pwritev"]
    image = tmp_path / "scratch.raw"
    data = image.read_bytes()
    assert len(data) == 4 << 20
    assert data[1 << 20:(1 << 20) + 4096] == b"\xab" * 4096
    assert data.count(0) == len(data) - 4096


def test_help_version_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main([]) == 1
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"qblock {qblock.__version__}")
    assert cli.main(["no-such-command"]) == 1
    assert "unknown command 'no-such-command'" in capsys.readouterr().err
