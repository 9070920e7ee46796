"""``qblock img resize``: qemu-img 7.2's resize sub-command (qemu-img.c img_resize).

Also the writable image open that resize and amend share (qemu-img.c img_open() with
BDRV_O_RDWR), including QEMU's warning when a writable image's format was probed as raw.
"""
from __future__ import annotations

import os
import sys

from qblock import api
from qblock.block.backend import BlockBackend
from qblock.block.node import close_node
from qblock.block.open import open_node
from qblock.block.perm import PERM_ALL, Perm
from qblock.cli import imgfmt
from qblock.cli.imgerr import (RAW_PROBE_WARNING, CommandFailed, error, error_exit, getopt_args,
                               object_unsupported)
from qblock.errors import QBlockError
from qblock.keyval import KeyvalError, parse_keyval

_SIZE_SHIFTS = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_PREALLOC_MODES = ("off", "metadata", "falloc", "full")
# util/qemu-option.c parse_option_size(): sizes are unsigned 64-bit.
_SIZE_ERROR = ("Parameter 'size' expects a non-negative number below 2^64\n"
               "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
               "and exabytes, respectively.")


def parse_u64_size(text: str) -> int:
    """QemuOpts' size parsing: like qemu_strtosz() but anything below 2^64 is accepted.

    Raises ValueError with QEMU's message otherwise.
    """
    if text[:2].lower() == "0x" and len(text) > 2 and all(
            c in "0123456789abcdefABCDEF" for c in text[2:]):
        value = int(text, 16)  # qemu_strtosz() reads plain hexadecimal too
        if value >= 1 << 64:
            raise ValueError(f"Value '{text}' is out of range for parameter 'size'")
        return value
    try:
        return imgfmt.parse_size(text)
    except OverflowError:
        pass
    except ValueError:
        raise ValueError(_SIZE_ERROR) from None
    suffix = text[-1].lower()
    body, shift = (text[:-1], _SIZE_SHIFTS[suffix]) if suffix in _SIZE_SHIFTS else (text, 0)
    whole, _, frac = body.partition(".")
    value = (int(whole or "0") << shift) + int(float("0." + (frac or "0")) * (1 << shift))
    if value >= 1 << 64:
        # qemu_strtosz(): with a "b" suffix an overflow fails to parse, else it is out of
        # range.
        raise ValueError(_SIZE_ERROR if suffix == "b"
                         else f"Value '{text}' is out of range for parameter 'size'")
    return value


async def open_writable(filename: str, fmt: str | None, image_opts: bool,
                        perm: Perm = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
                        ) -> BlockBackend:
    """img_open(BDRV_O_RDWR): the image with its backing chain, for writing.

    Prints QEMU's error ("Could not open ...") and raises CommandFailed on failure.
    """
    if image_opts:
        if fmt is not None:
            error("--image-opts and --format are mutually exclusive")
            raise CommandFailed()
        try:
            options = parse_keyval(filename)
        except KeyvalError as e:
            error(str(e))
            raise CommandFailed() from None
    else:
        if fmt is None:
            try:
                fmt = api.probe_format(filename)
            except OSError as e:
                error(f"Could not open '{filename}': Could not open '{filename}': "
                      f"{os.strerror(e.errno or 0)}")
                raise CommandFailed() from None
            if fmt == "raw":
                print(RAW_PROBE_WARNING.format(filename), file=sys.stderr)
        if fmt not in ("raw", "qcow2"):
            error(f"Unknown file format '{fmt}'")
            raise CommandFailed()
        # Freed metadata clusters are discarded in the file, as QEMU's image tools do.
        options = {"driver": fmt, "file": {"driver": "file", "filename": filename},
                   "discard": "unmap"}
    try:
        node = await open_node(options, read_only=False, implicit=True)
    except (QBlockError, OSError) as e:
        msg = os.strerror(e.errno or 0) if isinstance(e, OSError) else str(e)
        error(f"Could not open '{filename}': {msg}")
        raise CommandFailed() from None
    try:
        return BlockBackend(node, perm, PERM_ALL)
    except QBlockError as e:
        await close_node(node)
        error(f"Could not open '{filename}': {e}")
        raise CommandFailed() from None


def _int64(value: int) -> int:
    """The value as C's int64_t holds it."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


async def cmd_resize(argv: list[str]) -> int:
    """qemu-img resize [--image-opts] [-f fmt] [--preallocation=P] [-q] [--shrink] FILE SIZE."""
    if len(argv) < 2:
        raise error_exit("Not enough arguments")
    size = argv[-1]  # taken off first, so that "-1G" is not read as an option
    opts, args = getopt_args(argv[:-1], "f:hq", ["help", "object=", "image-opts",
                                             "preallocation=", "shrink"])
    fmt, quiet, image_opts, prealloc, shrink = None, False, False, "off", False
    for o, v in opts:
        if o in ("-h", "--help"):
            print("usage: qblock img resize [--object objectdef] [--image-opts] [-f fmt] "
                  "[--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size")
            return 0
        if o == "-f":
            fmt = v
        elif o == "-q":
            quiet = True
        elif o == "--object":
            raise object_unsupported()
        elif o == "--image-opts":
            image_opts = True
        elif o == "--preallocation":
            if v not in _PREALLOC_MODES:
                error(f"Invalid preallocation mode '{v}'")
                return 1
            prealloc = v
        elif o == "--shrink":
            shrink = True
    if len(args) != 1:
        raise error_exit("Expecting image file name and size")
    filename = args[0]
    relative = {"+": 1, "-": -1}.get(size[:1], 0)
    if relative:
        size = size[1:]
    try:
        n = parse_u64_size(size)
    except ValueError as e:
        error(str(e))
        return 1
    blk = await open_writable(filename, fmt, image_opts)
    try:
        return await _resize(blk, n, relative, prealloc, shrink, quiet)
    finally:
        await blk.close()


async def _resize(blk: BlockBackend, n: int, relative: int, prealloc: str, shrink: bool,
                  quiet: bool) -> int:
    current = blk.node.length()
    total = _int64(current + _int64(n) * relative) if relative else _int64(n)
    if total <= 0:
        error("New image size must be positive")
        return 1
    if total <= current and prealloc != "off":
        error("Preallocation can only be used for growing images")
        return 1
    if total < current and not shrink:
        error("Use the --shrink option to perform a shrink operation.")
        error("warning: Shrinking an image will delete all data beyond the shrunken image's "
              "end. Before performing such an operation, make sure there is no important data "
              "there.")
        return 1
    try:
        # qemu-img passes exact=true: the image must end up with exactly this size.
        await blk.truncate(total, exact=True, prealloc=prealloc)
    except QBlockError as e:
        error(str(e))
        return 1
    if not quiet:
        print("Image resized.")
    return 0
