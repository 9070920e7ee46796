"""``qblock img dd``: qemu-img dd (qemu-img.c img_dd).

``dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=BLOCK_SIZE] [count=BLOCKS]
[skip=BLOCKS] if=INPUT of=OUTPUT``: the output image is created with size
``min(input size, count * bs) - skip * bs`` (0 when skip passes the end) and filled from the
input at ``skip * bs``.  Operands, messages and exit codes are qemu-img 7.2's; like it, there
is no progress output.

Also home of ``strtosz``/``cvtnum_full`` (util/cutils.c qemu_strtosz, qemu-img.c
cvtnum_full), which ``qblock img bench`` shares.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from qblock import api
from qblock.block.buffer import blockalign
from qblock.cli.imgerr import error, getopt_args, object_unsupported
from qblock.errors import QBlockError
from qblock.keyval import KeyvalError, parse_keyval

USAGE = ("dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] "
         "[skip=blocks] if=input of=output")
SECTOR = 512
INT_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
COPY_CHUNK = 1 << 20  # bytes moved per request: a whole number of blocks, at least one

_SUFFIX_SHIFT = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
# qemu_strtou64() (strtoull base 10): optional sign, then digits
_DECIMAL = re.compile(r"[+-]?[0-9]+")
_HEX = re.compile(r"[+-]?0[xX][0-9a-fA-F]+")
_FRACTION = re.compile(r"\.[0-9]*")


def strtosz(text: str) -> int:
    """util/cutils.c qemu_strtosz(): bytes with an optional B/k/M/G/T/P/E suffix (1024-based).

    Hex (``0x...``) takes no fraction or suffix; a fraction needs a suffix.  Raises ValueError
    for malformed input and OverflowError above 2**64 - 1.
    """
    m = _DECIMAL.match(text)
    if m is None or "-" in m.group():
        raise ValueError(text)
    pos, value, frac = m.end(), int(m.group()), 0.0
    if value == 0 and text[pos:pos + 1] in ("x", "X"):
        h = _HEX.match(text)
        if h is None:
            raise ValueError(text)
        pos, value = h.end(), int(h.group().lstrip("+"), 16)
        if text[pos:pos + 1] == "." or text[pos:pos + 1].lower() in _SUFFIX_SHIFT:
            raise ValueError(text)
    elif text[pos:pos + 1] == ".":
        f = _FRACTION.match(text, pos)
        assert f is not None
        frac = float("0" + f.group()) if len(f.group()) > 1 else 0.0
        pos = f.end()
    shift = 0
    if text[pos:pos + 1].lower() in _SUFFIX_SHIFT and pos < len(text):
        shift = _SUFFIX_SHIFT[text[pos].lower()]
        pos += 1
    if pos != len(text) or (shift == 0 and frac):
        raise ValueError(text)
    # 64.64 fixed point times the unit, 0.5 rounded upward (do_strtosz)
    fixed = int(frac * 2 ** 64) << shift
    value = (value << shift) + (fixed >> 64) + ((fixed >> 63) & 1)
    if value >= 1 << 64:
        raise OverflowError(text)
    return value


def cvtnum_full(name: str, value: str, lo: int, hi: int) -> int | None:
    """qemu-img.c cvtnum_full(): the number, or None after printing qemu-img's complaint."""
    try:
        res = strtosz(value)
    except ValueError:
        error(f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for")
        error("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
        return None
    except OverflowError:
        res = -1
    if res < lo or res > hi:
        error(f"Invalid {name} specified. Must be between {lo} and {hi}.")
        return None
    return res


def cvtnum(name: str, value: str) -> int | None:
    """qemu-img.c cvtnum(): a non-negative int64."""
    return cvtnum_full(name, value, 0, INT64_MAX)


@dataclass
class DdArgs:
    """struct DdIo / DdInfo: the operands given (None = not given)."""

    bs: int = 512
    count: int | None = None
    skip: int | None = None
    infile: str | None = None
    outfile: str | None = None


def parse_operands(operands: list[str]) -> DdArgs | None:
    """The ``name=value`` loop of img_dd(); None after an error was printed."""
    dd = DdArgs()
    for operand in operands:
        name, eq, value = operand.partition("=")
        if not eq or name not in ("bs", "count", "if", "of", "skip"):
            error(f"unrecognized operand {name}")
            return None
        if name == "bs":
            bs = cvtnum_full("bs", value, 1, INT_MAX)
            if bs is None:
                return None
            dd.bs = bs
        elif name in ("count", "skip"):
            number = cvtnum(name, value)
            if number is None:
                return None
            setattr(dd, name, number)
        elif name == "if":
            dd.infile = value
        else:
            dd.outfile = value
    if dd.infile is None or dd.outfile is None:
        error("Must specify both input and output files")
        return None
    return dd


def copy_range(dd: DdArgs, size: int) -> tuple[int, int, bool]:
    """(output size, first input byte, skip passed the end) as img_dd() computes them."""
    if dd.count is not None and dd.count <= INT64_MAX // dd.bs and dd.count * dd.bs < size:
        size = dd.count * dd.bs
    skip = dd.skip or 0
    # "Overflow means the specified offset is beyond input image's size"
    if dd.skip is not None and (skip > INT64_MAX // dd.bs or size < skip * dd.bs):
        return 0, size, True
    return size - skip * dd.bs, skip * dd.bs, False


def image_opts_dict(text: str) -> dict[str, Any] | None:
    """``--image-opts``: keyval options; a ``file`` given by filename alone is a file node."""
    try:
        options = parse_keyval(text)
    except KeyvalError as e:
        error(str(e))
        return None
    child = options.get("file")
    if isinstance(child, dict) and "driver" not in child and "filename" in child:
        child["driver"] = "file"  # bdrv_find_protocol(): a plain path names the file driver
    return options


async def _open_input(name: str, fmt: str | None, image_opts: bool,
                      share: bool) -> api.AsyncDisk | None:
    """img_open() read-only, with the backing chain."""
    try:
        if image_opts:
            options = image_opts_dict(name)
            if options is None:
                return None
            if share:
                options["force-share"] = True
            return await api.open_async(options, read_only=True)
        if fmt is not None and fmt not in ("raw", "qcow2"):
            error(f"Could not open '{name}': Unknown driver '{fmt}'")
            return None
        return await api.open_async(name, driver=fmt, read_only=True, share=share)
    except OSError as e:
        error(f"Could not open '{name}': Could not open '{name}': "
              f"{os.strerror(e.errno or 0)}")
    except QBlockError as e:
        error(f"Could not open '{name}': {e}")
    return None


async def _create_output(name: str, fmt: str, size: int) -> bool:
    """bdrv_create(): the size rounded up to a sector as file-posix and qcow2 do."""
    size = -(-size // SECTOR) * SECTOR
    try:
        await api.create_async(name, size, fmt)
    except OSError as e:
        error(f"{name}: error while creating output image: Could not create '{name}': "
              f"{os.strerror(e.errno or 0)}")
        return False
    except QBlockError as e:
        error(f"{name}: error while creating output image: {e}")
        return False
    return True


async def _copy(src: api.AsyncDisk, dst: api.AsyncDisk, start: int, end: int, bs: int) -> int:
    """img_dd()'s loop, ``bs`` at a time, moved in requests of whole blocks."""
    chunk = max(bs, COPY_CHUNK - COPY_CHUNK % bs)
    buf = blockalign(chunk)
    in_pos, out_pos = start, 0
    while in_pos < end:
        n = min(chunk, end - in_pos)
        try:
            await src.readinto(in_pos, buf[:n])
        except QBlockError as e:
            error(f"error while reading from input image file: {os.strerror(e.errno)}")
            return 1
        in_pos += n
        try:
            await dst.write(out_pos, buf[:n])
        except QBlockError as e:
            error(f"error while writing to output image file: {os.strerror(e.errno)}")
            return 1
        out_pos += n
    return 0


async def cmd_dd(argv: list[str]) -> int:
    """Entry point of ``qblock img dd``; exit status 0 or 1 like qemu-img."""
    opts, operands = getopt_args(argv, "hf:O:U", ["help", "object=", "image-opts",
                                                   "force-share"])
    fmt, out_fmt, share, image_opts = None, "raw", False, False
    for o, v in opts:
        if o in ("-h", "--help"):
            print(f"usage: qblock img {USAGE}")
            return 0
        if o == "-f":
            fmt = v
        elif o == "-O":
            out_fmt = v
        elif o in ("-U", "--force-share"):
            share = True
        elif o == "--image-opts":
            image_opts = True
        elif o == "--object":
            raise object_unsupported()
    dd = parse_operands(operands)
    if dd is None:
        return 1
    assert dd.infile is not None and dd.outfile is not None
    src = await _open_input(dd.infile, fmt, image_opts, share)
    if src is None:
        return 1
    try:
        if out_fmt not in ("raw", "qcow2"):
            error("Unknown file format")
            return 1
        out_size, start, past_end = copy_range(dd, src.size)
        if not await _create_output(dd.outfile, out_fmt, out_size):
            return 1
        try:
            dst = await api.open_async(dd.outfile, driver=out_fmt)
        except QBlockError as e:
            error(f"Could not open '{dd.outfile}': {e}")
            return 1
        try:
            if past_end:
                # like dd(1): a warning, an empty output and success
                error(f"{dd.infile}: cannot skip to specified offset")
            return await _copy(src, dst, start, start + out_size, dd.bs)
        finally:
            await dst.close()
    finally:
        await src.close()
