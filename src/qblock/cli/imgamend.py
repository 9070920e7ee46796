"""``qblock img amend``: qemu-img 7.2's amend sub-command (qemu-img.c img_amend).

The option list, its help text and the parsing messages are QEMU's (block/qcow2.c
qcow2_amend_opts, util/qemu-option.c); the work is drivers/qcow2/amend.py.
"""
from __future__ import annotations

import re
from typing import Any

from qblock.cli import imgfmt
from qblock.cli.imgprogress import Progress
from qblock.cli.imgerr import error, error_exit, getopt_args, object_unsupported
from qblock.cli.imgresize import open_writable
from qblock.drivers.qcow2.amend import amend_options
from qblock.errors import QBlockError

# qcow2_amend_opts as ``-o help`` lists them (sorted by name, as qemu_opts_print_help does).
_AMEND_OPTIONS = (
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("data_file", "str", "File name of an external data file"),
    ("data_file_raw", "bool (on/off)", "The external data file must stay valid as a raw image"),
    ("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    ("encrypt.keyslot", "num", "Select a single keyslot to modify explicitly"),
    ("encrypt.new-secret", "str",
     "New secret to set in the matching keyslots. Empty string to erase"),
    ("encrypt.old-secret", "str", "Select all keyslots that match this password"),
    ("encrypt.state", "str", "Select new state of affected keyslots (active/inactive)"),
    ("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
    ("refcount_bits", "num", "Width of a reference count entry in bits"),
    ("size", "size", "Virtual disk size"),
)
_KINDS = {name: kind.split()[0] for name, kind, _ in _AMEND_OPTIONS}
# Options qcow2 only takes at creation (qcow2_create_opts minus the amend ones).
_CREATE_ONLY = ("cluster_size", "compression_type", "encrypt.cipher-alg", "encrypt.cipher-mode",
                "encrypt.format", "encrypt.hash-alg", "encrypt.ivgen-alg",
                "encrypt.ivgen-hash-alg", "encrypt.key-secret", "encryption", "extended_l2",
                "preallocation", "nocow", "extent_size_hint")
_CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")


def option_help(fmt: str) -> str:
    """print_amend_option_help(): the amend options of ``fmt``."""
    lines = [f"Amend options for '{fmt}':"]
    for name, kind, text in _AMEND_OPTIONS:
        lines.append(f"  {name + '=<' + kind + '>':<22} - {text}")
    return "\n".join(lines)


def _split_options(text: str) -> list[tuple[str, str]]:
    """QemuOpts ``a=1,b=2`` (",," is a comma; a bare name means "on")."""
    items: list[tuple[str, str]] = []
    for part in re.split(r"(?<!,),(?!,)", text):
        if not part:
            continue
        key, eq, value = part.partition("=")
        items.append((key, value.replace(",,", ",") if eq else "on"))
    return items


def parse_amend_options(text: str) -> dict[str, Any]:
    """qemu_opts_do_parse() against qcow2_amend_opts: typed values, QEMU's messages."""
    out: dict[str, Any] = {}
    for key, value in _split_options(text):
        kind = _KINDS.get(key)
        if kind is None:
            hint = "\nThis option is only supported for image creation" \
                if key in _CREATE_ONLY else ""
            raise ValueError(f"Invalid parameter '{key}'{hint}")
        if kind == "bool":
            if value not in ("on", "off"):
                raise ValueError(f"Parameter '{key}' expects 'on' or 'off'")
            out[key] = value == "on"
        elif kind == "num":
            if not re.fullmatch(r"0[xX][0-9a-fA-F]+|[0-9]+", value):
                raise ValueError(f"Parameter '{key}' expects a number")
            out[key] = int(value, 0) if value[:2].lower() == "0x" else int(value)
        elif kind == "size":
            try:
                out[key] = imgfmt.parse_size(value)
            except (ValueError, OverflowError):
                raise ValueError(
                    f"Parameter '{key}' expects a non-negative number below 2^64\n"
                    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                    "peta-\nand exabytes, respectively.") from None
        else:
            out[key] = value
    return out


def _has_help(text: str) -> bool:
    return any(key in ("help", "?") for key, _ in _split_options(text))


async def cmd_amend(argv: list[str]) -> int:
    """qemu-img amend [-f fmt] [-t cache] [-p] [-q] [--force] -o OPTIONS FILE."""
    opts, args = getopt_args(argv, "ho:f:t:pq", ["help", "object=", "image-opts", "force"])
    options = fmt = None
    cache, progress, quiet, image_opts = "writeback", False, False, False
    for o, v in opts:
        if o in ("-h", "--help"):
            print("usage: qblock img amend [--image-opts] [-p] [-q] [-f fmt] [-t cache] "
                  "[--force] -o options filename")
            return 0
        if o == "-o":
            options = v if options is None else f"{options},{v}"
        elif o == "-f":
            fmt = v
        elif o == "-t":
            cache = v
        elif o == "-p":
            progress = True
        elif o == "-q":
            quiet = True
        elif o == "--object":
            raise object_unsupported()
        elif o == "--image-opts":
            image_opts = True
        # --force only matters for LUKS keyslot changes, which qblock does not do.
    if options is None:
        raise error_exit("Must specify options (-o)")
    if fmt is not None and _has_help(options):
        return _print_help(fmt)
    if len(args) != 1:
        error("Expecting one image file name")
        return 1
    if cache not in _CACHE_MODES:
        error(f"Invalid cache option: {cache}")
        return 1
    blk = await open_writable(args[0], fmt, image_opts)
    try:
        node = blk.node
        fmt = node.drv.format_name
        if _has_help(options):
            return _print_help(fmt)
        if fmt != "qcow2":
            error(f"Format driver '{fmt}' does not support option amendment")
            return 1
        try:
            parsed = parse_amend_options(options)
        except ValueError as e:
            error(str(e))
            return 1
        return await _amend(node.drv, parsed, Progress(Progress.wanted(progress, quiet)))
    finally:
        await blk.close()


def _print_help(fmt: str) -> int:
    if fmt not in ("raw", "qcow2"):
        error(f"Unknown file format '{fmt}'")
        return 1
    if fmt != "qcow2":
        error(f"Format driver '{fmt}' does not support option amendment")
        return 1
    print(option_help(fmt))
    return 0


async def _amend(drv: Any, parsed: dict[str, Any], progress: Progress) -> int:
    progress.start()
    try:
        await amend_options(drv, parsed, progress.fraction)
    except QBlockError as e:
        error(str(e))
        return 1
    finally:
        progress.end()
    return 0
