"""``qblock img bitmap``: qemu-img 7.2's bitmap sub-command (qemu-img.c img_bitmap).

``--repair`` is a qblock extension: an inconsistent bitmap (left ``in_use`` by a crash) is
marked all dirty and stored consistent again; QEMU's only way out is ``--remove``.
"""
from __future__ import annotations


from qblock.block import dirty_bitmap as dbm
from qblock.block.dirty_bitmap import DirtyBitmap, find_bitmap
from qblock.block.node import BlockNode, close_node
from qblock.block.open import open_node
from qblock.cli import imgfmt
from qblock.cli.imgerr import PROG, error, getopt_args
from qblock.errors import InvalidArgument, QBlockError

_LONG = ["help", "add", "remove", "clear", "enable", "disable", "merge=", "repair",
         "granularity=", "source-file=", "source-format="]
_ACTIONS = {"--add": "add", "--remove": "remove", "--clear": "clear", "--enable": "enable",
            "--disable": "disable", "--merge": "merge", "--repair": "repair"}
USAGE = ("bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable | "
         "--repair)... [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] "
         "[--image-opts | -f fmt] filename bitmap")


def _error(msg: str) -> int:
    """Report and give the command's exit status."""
    error(msg)
    return 1


async def _open(filename: str, fmt: str | None, *, read_only: bool) -> BlockNode:
    """img_open() without backing files (BDRV_O_NO_BACKING)."""
    from qblock import api

    return await open_node({"driver": fmt or api.probe_format(filename), "backing": None,
                            "file": {"driver": "file", "filename": filename}},
                           read_only=read_only, implicit=True)


async def main(argv: list[str]) -> int:
    """Apply the actions in their order; exit status 1 on the first failure."""
    opts, args = getopt_args(argv, "b:f:F:g:h", _LONG)
    actions: list[tuple[str, str]] = []
    fmt = src_file = src_fmt = None
    granularity = 0
    for o, v in opts:
        if o in ("-h", "--help"):
            print(f"usage: qblock img {USAGE}")
            return 0
        if o in _ACTIONS:
            actions.append((_ACTIONS[o], v))
        elif o in ("-g", "--granularity"):
            try:
                granularity = imgfmt.parse_size(v)
            except (ValueError, OverflowError):
                return _error("Invalid granularity specified. You may use k, M, G, T, P or E "
                              f"suffixes for\n{PROG}: kilobytes, megabytes, gigabytes, "
                              "terabytes, petabytes and exabytes.")
        elif o == "-f":
            fmt = v
        elif o in ("-b", "--source-file"):
            src_file = v
        elif o in ("-F", "--source-format"):
            src_fmt = v
    if not actions:
        return _error("Need at least one of --add, --remove, --clear, --enable, --disable, "
                      "or --merge")
    if granularity and not any(a == "add" for a, _ in actions):
        return _error("granularity only supported with --add")
    if src_fmt and not src_file:
        return _error("-F only supported with -b")
    if src_file and not any(a == "merge" for a, _ in actions):
        return _error("Merge bitmap source file only supported with --merge")
    if len(args) != 2:
        return _error("Expecting filename and bitmap name")
    filename, name = args
    try:
        node = await _open(filename, fmt, read_only=False)
    except (QBlockError, OSError) as e:
        return _error(f"Could not open '{filename}': {e}")
    src_node = None
    try:
        if src_file is not None:
            try:
                src_node = await _open(src_file, src_fmt, read_only=True)
            except (QBlockError, OSError) as e:
                return _error(f"Could not open '{src_file}': {e}")
        for action, arg in actions:
            try:
                await _apply(node, src_node or node, action, name, arg, granularity)
            except QBlockError as e:
                return _error(f"Operation {action} on bitmap {name} failed: {e}")
        return 0
    finally:
        if src_node is not None:
            await close_node(src_node)
        await close_node(node)


def _find(node: BlockNode, name: str) -> DirtyBitmap:
    bitmap = find_bitmap(node, name)
    if bitmap is None:
        raise InvalidArgument(f"Dirty bitmap '{name}' not found")
    return bitmap


async def _apply(node: BlockNode, src_node: BlockNode, action: str, name: str, arg: str,
                 granularity: int) -> None:
    if action == "add":
        dbm.add(node, name, granularity or None, persistent=True)
    elif action == "remove":
        await dbm.remove(node, _find(node, name))
    elif action == "clear":
        dbm.clear(_find(node, name))
    elif action in ("enable", "disable"):
        dbm.set_enabled(_find(node, name), action == "enable")
    elif action == "merge":
        dbm.merge(_find(node, name), iter([_find(src_node, arg)]))
    else:
        dbm.repair(_find(node, name))
