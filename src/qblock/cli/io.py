"""``qblock io``: qemu-io, the block layer's command-line test tool.

usage: qblock io [-f FMT] [-r] [-U] [-n] [-t CACHE] [--image-opts] [-c CMD]... [FILE]

Runs each ``-c`` command in order, or reads commands at the ``qemu-io> `` prompt when there
is none.  Output lines and the exit status (1 when a command failed) are qemu-io 7.2's.
"""
from __future__ import annotations

import getopt
import sys

from qblock import api
from qblock.cli.io_cmds import CACHE_MODES, PROG, Session, run_command
from qblock.keyval import parse_keyval

PROMPT = "qemu-io> "


async def _loop(s: Session, commands: list[str]) -> int:
    """command_loop(): the -c commands, else the prompt; the last failure decides."""
    last_error = 0
    if commands:
        for line in commands:
            ret = await run_command(s, line)
            last_error = ret if ret < 0 else last_error
            if s.quit:
                break
    else:
        while not s.quit:
            sys.stdout.write(PROMPT)
            sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:
                break
            ret = await run_command(s, line)
            last_error = ret if ret < 0 else last_error
    await s.close()
    return last_error or s.aio_error


async def _main(argv: list[str]) -> int:
    try:
        opts, args = getopt.gnu_getopt(argv, "c:f:hnrt:UV", [
            "cmd=", "format=", "help", "nocache", "read-only", "cache=", "force-share",
            "image-opts", "version"])
    except getopt.GetoptError as e:
        print(f"{PROG}: {e.msg}", file=sys.stderr)
        return 1
    commands: list[str] = []
    fmt, read_only, share, image_opts = None, False, False, False
    cache = CACHE_MODES["writethrough"]
    for o, v in opts:
        if o in ("-c", "--cmd"):
            commands.append(v)
        elif o in ("-f", "--format"):
            fmt = v
        elif o in ("-r", "--read-only"):
            read_only = True
        elif o in ("-U", "--force-share"):
            share = True
        elif o in ("-n", "--nocache"):
            cache = CACHE_MODES["none"]
        elif o in ("-t", "--cache"):
            if v not in CACHE_MODES:
                print(f"{PROG}: Invalid cache option: {v}", file=sys.stderr)
                return 1
            cache = CACHE_MODES[v]
        elif o == "--image-opts":
            image_opts = True
        elif o in ("-h", "--help"):
            print(__doc__)
            return 0
        elif o in ("-V", "--version"):
            print(f"{PROG} (qblock)")
            return 0
    if len(args) > 1:
        print(f"{PROG}: Unexpected argument: {args[1]}", file=sys.stderr)
        return 1
    if image_opts and fmt:
        print(f"{PROG}: --image-opts and -f are mutually exclusive", file=sys.stderr)
        return 1
    s = Session(cache)
    if args:
        target = parse_keyval(args[0]) if image_opts else args[0]
        if not await s.open(target, fmt, read_only, share, cache):
            return 1
    return 1 if await _loop(s, commands) else 0


def main(argv: list[str]) -> int:
    """Entry point of ``qblock io``."""
    return api.run(_main(argv))
