"""The text qemu-io prints: sizes, times, reports and hex dumps (qemu-io-cmds.c, util/)."""
from __future__ import annotations

from qblock.cli import imgfmt

_UNITS = ((1 << 60, " EiB"), (1 << 50, " PiB"), (1 << 40, " TiB"), (1 << 30, " GiB"),
          (1 << 20, " MiB"), (1 << 10, " KiB"))


def cvtstr(value: float) -> str:
    """qemu-io-cmds.c cvtstr(): ``%.3f`` in the largest binary unit, ``.000`` trimmed."""
    suffix = " bytes"
    for unit, name in _UNITS:
        if value >= unit:
            value, suffix = value / unit, name
            break
    text = "%.3f" % value
    return (text[:-4] if text.endswith(".000") else text) + suffix


def cvtnum(text: str) -> int:
    """qemu-io-cmds.c cvtnum(): a size with an optional k/M/G/T/P/E suffix (or 0x hex)."""
    if text.lower().startswith("0x"):
        return int(text, 16)
    return imgfmt.parse_size(text)


def cvtnum_error(text: str) -> str:
    """print_cvtnum_err() for a malformed or oversized number."""
    try:
        cvtnum(text)
    except OverflowError:
        return f"Parsing error: argument too large -- {text}"
    except ValueError:
        pass
    return f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}"


def timestr(seconds: float) -> str:
    """qemu-io-cmds.c timestr() with format 0: ``SS.ss sec`` below a second, else H:MM:SS.ss."""
    whole = int(seconds)
    if whole:
        frac = seconds - whole
        return "%u:%02u:%05.2f" % (whole // 3600, whole // 60 % 60, whole % 60 + frac)
    return "%05.2f sec" % seconds


def report(op: str, seconds: float, offset: int, count: int, total: int, cnt: int) -> str:
    """print_report(): the "wrote/read N/N bytes at offset O" line and the timing line."""
    seconds = max(seconds, 1e-9)
    return (f"{op} {total}/{count} bytes at offset {offset}\n"
            f"{cvtstr(total)}, {cnt} ops; {timestr(seconds)} "
            f"({cvtstr(total / seconds)}/sec and {cnt / seconds:.4f} ops/sec)\n")


def dump_buffer(buf: bytes | bytearray, offset: int) -> str:
    """dump_buffer(): 16 bytes a line, hex then isalnum() characters or '.'."""
    lines = []
    for i in range(0, len(buf), 16):
        row = buf[i:i + 16]
        hexes = "".join(f"{b:02x} " for b in row)
        text = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in row)
        lines.append(f"{offset + i:08x}:  {hexes} {text}\n")
    return "".join(lines)
