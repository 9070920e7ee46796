"""The ``qblock`` console script: one entry point, a sub-command per tool.

Each sub-command module exposes ``main(argv: list[str]) -> int`` and parses its own options,
so each tool keeps the command line of the QEMU tool it stands in for.
"""
from __future__ import annotations

import importlib
import sys

from qblock import __version__, trace

SUBCOMMANDS = {
    "daemon": ("qblock.cli.daemon", "qemu-storage-daemon: block nodes served over QMP"),
    "demo": ("qblock.cli.demo", "write, read and trace a scratch image through the block graph"),
    "img": ("qblock.cli.img", "qemu-img: create, info, map, check, compare, convert, bitmap"),
    "io": ("qblock.cli.io", "qemu-io: run read/write/map commands on an image"),
    "nbd": ("qblock.cli.nbd", "qemu-nbd: export a disk image over NBD"),
    "dump": ("qblock.cli.dump", "qcow2.py: dump and edit qcow2 header, extensions, tables"),
    "ctl": ("qblock.cli.ctl", "a QMP client for people: domblkinfo, block graph pictures"),
}


def usage() -> str:
    lines = [f"qblock {__version__} - QEMU's block layer in Python", "",
             "usage: qblock [-T|--trace [enable=]PATTERN|events=FILE|file=FILE|format=json]... "
             "COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 1
    trace_options = []
    while argv and (argv[0] in ("-T", "--trace") or argv[0].startswith("--trace=")):
        opt = argv.pop(0)
        trace_options.append(opt.split("=", 1)[1] if "=" in opt else (argv.pop(0) if argv else ""))
    if trace_options:
        trace.configure(",".join(trace_options))
    if not argv:
        print(usage())
        return 1
    if argv[0] in ("-V", "--version"):
        print(f"qblock {__version__}")
        return 0
    entry = SUBCOMMANDS.get(argv[0])
    if entry is None:
        print(f"qblock: unknown command '{argv[0]}'\n\n{usage()}", file=sys.stderr)
        return 1
    return importlib.import_module(entry[0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
