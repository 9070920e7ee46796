"""``python -m bench``: run the side-by-side benchmarks of qblock against QEMU's tools."""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from bench.report import print_table, write_json
from bench.runner import ScenarioResult, run_scenario
from bench.scenarios import load_all

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"
_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """A size like qemu-img's: bytes, or a number with a k/M/G/T (binary) suffix."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgtBKMGT]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size '{text}'")
    size = int(float(m.group(1)) * _SUFFIXES[m.group(2).lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return size


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench",
                                description="qblock against QEMU's tools, same work, same files.")
    p.add_argument("--rounds", type=positive_int, default=5,
                   help="rounds per scenario, both sides each round (default 5)")
    p.add_argument("--only", metavar="NAME[,NAME]", help="run only these scenarios")
    p.add_argument("--size", type=parse_size, default=parse_size("1G"),
                   help="image size, e.g. 8M or 1G (default 1G)")
    p.add_argument("--dir", type=Path, help="work directory for the images "
                   "(default: a temporary directory, removed afterwards)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="where to write every round's times (default bench/results/latest.json)")
    p.add_argument("--keep", action="store_true",
                   help="keep each scenario's files (images, worker specs) in --dir")
    p.add_argument("--settle", type=non_negative_float, metavar="SECONDS",
                   help="before each timed run: sync, pause this long, read the inputs "
                        "through again (default: each scenario's own, 0 for most; see "
                        "README, Settling)")
    p.add_argument("--cold-memory", action="store_true",
                   help="after settling, do not back free memory for the scenarios that do "
                        "(see README, Backed memory)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    registry = load_all()
    if args.list:
        width = max(map(len, registry), default=0)
        for name, sc in registry.items():
            print(f"{name:<{width}}  [{sc.unit}]  {sc.description}")
        return 0
    names = list(registry)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in registry]
        if unknown:
            print(f"bench: unknown scenario(s): {', '.join(unknown)} "
                  f"(known: {', '.join(registry)})", file=sys.stderr)
            return 1
    if args.keep and not args.dir:
        print("bench: --keep needs --dir", file=sys.stderr)
        return 1
    if shutil.which("qemu-io") is None:
        print("bench: qemu-io not found in PATH", file=sys.stderr)
        return 1
    results: list[ScenarioResult] = []
    with tempfile.TemporaryDirectory(prefix="qblock-bench-") as tmp:
        base = args.dir.resolve() if args.dir else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"{name}: {registry[name].description}", file=sys.stderr)
            results.append(run_scenario(registry[name], base, args.size, args.rounds,
                                        keep=args.keep, settle=args.settle,
                                        back=not args.cold_memory))
    print_table(results, args.rounds)
    write_json(results, args.json, rounds=args.rounds, workdir=base)
    print(f"\nresults: {args.json}")
    return 1 if any(r.error for r in results) else 0
