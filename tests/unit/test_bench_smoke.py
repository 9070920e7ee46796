"""The bench/ harness runs end to end, so it cannot rot.  Not a timed test: no speed asserted."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cli import parse_size
from bench.scenarios import load_all
from bench.sockets import listening, wait_listening
from bench.workload import (
    Workload,
    qemu_img_bench_argv,
    qemu_io_batches,
    qemu_io_command,
    sequential,
)

REPO = Path(__file__).resolve().parents[2]
SIZE = 8 << 20


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"),
                                                      env.get("PYTHONPATH")]))
    return env


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
def test_one_round_of_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--rounds", "1", "--size", "8M", "--dir", str(work),
         "--json", str(out), "--settle", "0"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "ratio = QEMU time / qblock time" in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["harness"]["rounds"] == 1
    scenarios = doc["scenarios"]
    assert set(scenarios) == set(load_all())
    for name, res in scenarios.items():
        assert "error" not in res, name
        assert res["size"] == SIZE
        assert res["settle_s"] == 0
        for side in ("qblock", "qemu"):
            (rnd,) = res[side]["rounds"]
            assert rnd["seconds"] > 0 and res[side]["median_s"] == rnd["seconds"]
            assert rnd["amount"] > 0
            assert "net" in rnd and "median_net_s" in res[side]
        assert res["ratio_wall"] == pytest.approx(res["qemu"]["median_s"]
                                                 / res["qblock"]["median_s"])
        assert "ratio" in res  # net ratio: None when a net time is not positive at tiny sizes
        assert {r["position"] for s in ("qblock", "qemu") for r in res[s]["rounds"]} == {0, 1}
        detail = res["qblock"]["rounds"][0]["detail"]
        if res["unit"] == "MiB/s" and "bytes" in detail:  # the qblock worker reports its bytes
            assert detail["bytes"] == res["qblock"]["rounds"][0]["amount"] == SIZE
    assert not any(work.iterdir()), "teardown left files behind"
    if "bitmap-4t" in scenarios:
        _check_bitmap_round(scenarios["bitmap-4t"], proc.stderr)


def _check_bitmap_round(res: dict, log: str) -> None:
    """Both daemons ran every step and their bitmaps hash alike; the step table was printed."""
    q, e = (res[side]["rounds"][0]["detail"] for side in ("qblock", "qemu"))
    steps = {"add", "mark", "merge", "sha256", "store"}
    assert set(q["steps"]) == set(e["steps"]) == steps
    assert q["sha256"] == e["sha256"]
    assert q["nbd_writes"] == e["nbd_writes"] == 1000 and q["disk_size"] == 4096 * SIZE
    assert res["qblock"]["rounds"][0]["seconds"] == pytest.approx(
        sum(q["steps"][s] for s in steps - {"mark"}))
    assert set(q["in_process"]) == {"add", "mark batched", "mark one by one", "merge", "sha256"}
    assert "bitmap-4t: 32 GiB disk" in log and "(qblock only)" in log


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
def test_write_scenario_leaves_its_pattern_in_the_image(tmp_path: Path) -> None:
    """Both sides really write: setup's 0x5a bytes end up all 0xa5, and --keep keeps them."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "raw-seq-write", "--rounds", "1",
         "--size", "3M", "--dir", str(tmp_path), "--keep", "--json", str(tmp_path / "o.json")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    data = (tmp_path / "raw-seq-write" / "image.raw").read_bytes()
    assert data == b"\xa5" * (3 << 20)
    assert (tmp_path / "raw-seq-write" / "run.spec.json").exists()


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
def test_qcow2_write_scenario_leaves_an_image_qemu_accepts(tmp_path: Path) -> None:
    """Round 2 runs QEMU first, then qblock into a fresh image: what is kept is qblock's."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "qcow2-seq-write", "--rounds", "2",
         "--size", "3M", "--dir", str(tmp_path), "--keep", "--json", str(tmp_path / "o.json")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    image = tmp_path / "qcow2-seq-write" / "image.qcow2"
    check = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    # 3 MiB of 64 KiB clusters, all allocated by qblock's writes, no leak, no corruption
    assert report["allocated-clusters"] == report["total-clusters"] == 48
    assert "leaks" not in report and "corruptions" not in report
    verify = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0xa5 0 3M",
                             str(image)], capture_output=True, text=True, check=False)
    assert "Pattern verification failed" not in verify.stdout and verify.returncode == 0


def test_random_reads_are_seeded_aligned_and_in_bounds() -> None:
    from bench.scenarios.qcow2 import random_reads

    ops = random_reads(1 << 30)
    assert len(ops) == 20000 and ops == random_reads(1 << 30)
    assert all(k == "read" and n == 4096 and off % 4096 == 0 and off + n <= 4 << 30
               for k, off, n, _ in ops)
    assert len({op[1] for op in ops}) > 19000
    assert len(random_reads(8 << 20)) == 156


def test_unknown_scenario_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "no-such-scenario",
                           "--json", str(tmp_path / "x.json")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "unknown scenario(s): no-such-scenario" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_qemu_io_commands_split_to_fit_the_command_line() -> None:
    ops = sequential("write", 10 << 20, 1 << 20, 0xA5) + [("flush", 0, 0, 0)]
    assert qemu_io_command(ops[1]) == "write -q -P 0xa5 1048576 1048576"
    assert qemu_io_command(("read", 0, 512, 0)) == "read -q 0 512"
    batches = qemu_io_batches(ops, budget=100)
    assert len(batches) > 1
    assert all(sum(len(c) + 4 for c in b) <= 100 for b in batches)
    assert [c for b in batches for c in b] == [qemu_io_command(op) for op in ops]
    assert qemu_io_batches(ops) == [[qemu_io_command(op) for op in ops]]


def test_qemu_img_bench_expresses_only_sequential_workloads() -> None:
    image = Path("x.raw")
    writes = Workload(image, "raw", sequential("write", 4 << 20, 1 << 20, 0xA5)
                      + [("flush", 0, 0, 0)])
    assert qemu_img_bench_argv(writes) == [
        "qemu-img", "bench", "-f", "raw", "-t", "writeback", "-d", "1", "-c", "4",
        "-s", "1048576", "-w", "--pattern=165", "--flush-interval=4", "x.raw"]
    assert "-c" in (argv := qemu_img_bench_argv(writes, empty=True))
    assert argv[argv.index("-c") + 1] == "0" and "--flush-interval=0" not in " ".join(argv)
    reads = Workload(image, "raw", sequential("read", 2 << 20, 1 << 20), read_only=True)
    assert "-w" not in qemu_img_bench_argv(reads)
    for bad in ([("read", 1 << 20, 1 << 20, 0)],                      # not from offset 0
                sequential("read", 1536, 1024),                       # ragged last request
                [("read", 0, 512, 0), ("write", 512, 512, 1)]):       # mixed kinds
        with pytest.raises(ValueError):
            qemu_img_bench_argv(Workload(image, "raw", bad))


def test_sequential_covers_the_image_once() -> None:
    ops = sequential("read", 5 * 1024 + 100, 1024)
    assert [(o[1], o[2]) for o in ops] == [(i * 1024, 1024) for i in range(5)] + [(5120, 100)]


def test_sizes_parse_like_qemu_img() -> None:
    assert parse_size("8M") == 8 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("4096") == 4096
    assert parse_size("1.5k") == 1536


def _clock_scenario(settle: float, events: list[tuple[str, float]], back_memory: float = 0.0):
    from bench.scenario import Measurement, Scenario

    def side(name: str):
        def run(ctx) -> Measurement:
            events.append((name, time.monotonic()))
            return Measurement(0.01, 1 << 20)
        return run

    def startup(ctx) -> float:
        events.append(("startup", time.monotonic()))
        return 0.001

    return Scenario(name="clock", description="timing only", unit="MiB/s",
                    setup=lambda ctx: None, run_qblock=side("qblock"), run_qemu=side("qemu"),
                    startup_qblock=startup, startup_qemu=startup, settle=settle,
                    back_memory=back_memory)


@pytest.mark.parametrize("override", [None, 0.0])
def test_settle_pauses_before_every_timed_run(tmp_path: Path, override: float | None) -> None:
    """A scenario's settle (or --settle) comes between its start-up run and each timed run;
    a scenario that settles runs each side once untimed first."""
    from bench.runner import run_scenario

    events: list[tuple[str, float]] = []
    log = io.StringIO()
    res = run_scenario(_clock_scenario(0.2, events), tmp_path, 1 << 20, 2, settle=override,
                       log=log)
    assert res.error is None
    expected = 0.2 if override is None else 0.0
    assert res.as_json()["settle_s"] == expected
    warm_up = ["startup", "qblock", "startup", "qemu"] if expected else []
    assert [e for e, _ in events] == [*warm_up, "startup", "qblock", "startup", "qemu",
                                      "startup", "qemu", "startup", "qblock"]
    assert ("warm-up" in log.getvalue()) == bool(expected)
    assert [len(side.rounds) for side in res.sides.values()] == [2, 2]
    gaps = [b - a for (ea, a), (eb, b) in zip(events, events[1:]) if ea == "startup"]
    assert len(gaps) == 4 + len(warm_up) // 2
    if expected:
        assert min(gaps) >= expected
    else:
        assert max(gaps) < 0.15


@pytest.mark.parametrize(("settle", "back", "expected"),
                         [(0.01, True, 512 << 10), (0.01, False, 0), (0.0, True, 0)])
def test_memory_is_backed_after_settling_unless_cold_memory(
        tmp_path: Path, settle: float, back: bool, expected: int) -> None:
    """back_memory is a share of --size (half of 1 MiB here), backed only where the scenario
    settles and --cold-memory is not given; the JSON says how much."""
    from bench.runner import run_scenario

    res = run_scenario(_clock_scenario(settle, [], back_memory=0.5), tmp_path, 1 << 20, 1,
                       back=back, log=io.StringIO())
    assert res.error is None
    assert res.as_json()["back_memory_bytes"] == expected


def test_backing_memory_touches_and_releases_it() -> None:
    """In a fresh process: the peak resident size grows by the memory backed, the resident
    size does not keep it."""
    code = ("from bench.runner import back_memory\n"
            "def kib(key):\n"
            "    with open('/proc/self/status') as f:\n"
            "        return next(int(l.split()[1]) for l in f if l.startswith(key))\n"
            "before = kib('VmHWM:')\n"
            "back_memory(64 << 20)\n"
            "print(before, kib('VmHWM:'), kib('VmRSS:'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), check=True,
                         capture_output=True, text=True).stdout
    before, peak, rss = map(int, out.split())
    assert peak - before >= 63 << 10 and peak - rss >= 63 << 10  # KiB


def test_warm_reads_a_file_through(tmp_path: Path) -> None:
    from bench.runner import warm

    path = tmp_path / "f"
    path.write_bytes(os.urandom(8 << 20) + b"tail")
    assert warm(path) == (8 << 20) + 4


def test_settle_must_not_be_negative() -> None:
    from bench.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--settle", "-1"])
    assert build_parser().parse_args(["--settle", "2.5"]).settle == 2.5
    assert build_parser().parse_args([]).settle is None


def test_paired_ratio_cancels_a_machine_that_drifts() -> None:
    """The machine slows down threefold over the rounds while qblock stays 25 % slower than
    QEMU within each round: the paired ratio sees the 0.8, the ratio of medians does not."""
    from bench.report import print_table
    from bench.runner import RoundResult, ScenarioResult, SideSummary

    def side(times: list[float]) -> SideSummary:
        return SideSummary([RoundResult(i, i % 2, t, 0.0, 1, 1 << 20)
                            for i, t in enumerate(times)], "MiB/s")

    speed = [1.0, 1.5, 2.0, 2.5, 3.0]
    qemu = [1.0 * s for s in speed]
    qblock = [1.25 * s for s in speed]
    qblock[2] = 3.0 * speed[2]  # one round where qblock drew a far slower machine
    res = ScenarioResult(_clock_scenario(0.0, []), 1 << 20,
                         sides={"qblock": side(qblock), "qemu": side(qemu)})
    assert res.round_ratios == pytest.approx([0.8, 0.8, 1 / 3, 0.8, 0.8])
    assert res.ratio_paired == pytest.approx(0.8)
    assert res.ratio == pytest.approx(2.0 / 3.125)
    doc = res.as_json()
    assert doc["ratio_paired"] == pytest.approx(0.8) and len(doc["round_ratios"]) == 5
    out = io.StringIO()
    print_table([res], 5, out)
    assert "0.80 (0.33-0.80)" in out.getvalue()


def test_a_bound_socket_is_not_listening_until_listen(tmp_path: Path) -> None:
    """The race CI hit: the daemon's socket file exists from bind(), connects are refused
    until listen(); the harness waits for listen() and never probes by connecting."""
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        assert path.exists() and not listening(path)
        server.listen()
        assert listening(path)
    assert not listening(tmp_path / "other.sock")


def test_waiting_for_a_daemon_that_exits_names_it(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('no monitor')"],
                            stderr=subprocess.PIPE)
    with pytest.raises(RuntimeError, match="test daemon exited with status 1: no monitor"):
        wait_listening(tmp_path / "never.sock", proc, "test daemon")
    proc.wait()
    proc.stderr.close()


def test_waiting_past_the_timeout_names_the_socket(tmp_path: Path) -> None:
    """A daemon still running but not listening: the wait gives up without reading its
    stderr (that would block until it exits)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                            stderr=subprocess.PIPE)
    try:
        with pytest.raises(RuntimeError, match=r"did not listen on .*never.sock within 0.2 s"):
            wait_listening(tmp_path / "never.sock", proc, timeout=0.2)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
