"""qemu-img's human output: sizes, image info, snapshot tables, check reports, map lines.

Text layouts follow QEMU 7.2 (block/qapi.c bdrv_image_info_dump, qemu-img.c dump_* helpers);
QObject values nested in "Format specific information" are printed in QDict order like
block/qapi.c dump_qobject().
"""
from __future__ import annotations

import math
import time
from typing import Any

from qblock.qobject import qdict_order

_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_SIZE_UNITS = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def size_to_str(value: int) -> str:
    """util/cutils.c size_to_str(): 3 significant digits, switching unit at 1000."""
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = max(exp - 1, 0) // 10
    return "%0.3g %sB" % (value / (1 << (i * 10)), _SUFFIXES[i])


def parse_size(text: str) -> int:
    """util/cutils.c qemu_strtosz(): ``1.5M``, ``64k``, ``512`` (bytes by default).

    Raises ValueError for malformed input and OverflowError beyond 8 EiB.
    """
    body, shift = text, 0
    if text and text[-1].lower() in _SIZE_UNITS:
        body, shift = text[:-1], _SIZE_UNITS[text[-1].lower()]
    if not body or body.strip() != body or body[0] in "+-" or not all(
            c.isdigit() or c == "." for c in body) or body.count(".") > 1:
        raise ValueError(text)
    if "." in body:
        if shift == 0:
            raise ValueError(text)  # a fraction needs a unit
        whole, frac = body.split(".")
        value = int(whole or "0") << shift
        value += int(float("0." + (frac or "0")) * (1 << shift))
    else:
        value = int(body) << shift
    if value >= 1 << 63:
        raise OverflowError(text)
    return value


# -- info ----------------------------------------------------------------------------------------
def _dump_scalar(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


def dump_qobject(value: Any, indent: int, out: list[str]) -> None:
    """block/qapi.c dump_qdict()/dump_qlist(): nested values, dashes in keys as spaces."""
    if isinstance(value, dict):
        for key in qdict_order(list(value)):
            _dump_member(key.replace("-", " "), value[key], indent, out)
    else:
        for i, item in enumerate(value):
            _dump_member(f"[{i}]", item, indent, out)


def _dump_member(label: str, value: Any, indent: int, out: list[str]) -> None:
    pad = " " * (indent * 4)
    if isinstance(value, (dict, list)):
        out.append(f"{pad}{label}:\n")
        dump_qobject(value, indent + 1, out)
    else:
        out.append(f"{pad}{label}: {_dump_scalar(value)}\n")


def snapshot_header() -> str:
    return "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")


def snapshot_line(sn: dict[str, Any]) -> str:
    """block/qapi.c bdrv_snapshot_dump() for one SnapshotInfo."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    nsec = sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"]
    secs = nsec // 1_000_000_000
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60,
                                     (nsec // 1_000_000) % 1000)
    icount = str(sn["icount"]) if "icount" in sn else ""
    return "%-9s %-16s %8s%20s%13s%11s" % (sn["id"], sn["name"], size_to_str(sn["vm-state-size"]),
                                           date, clock, icount)


def image_info_human(info: dict[str, Any]) -> str:
    """block/qapi.c bdrv_image_info_dump() as QEMU 7.2 prints it."""
    out = [f"image: {info['filename']}\n", f"file format: {info['format']}\n",
           f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)\n"]
    disk = size_to_str(info["actual-size"]) if "actual-size" in info else "unavailable"
    out.append(f"disk size: {disk}\n")
    if "cluster-size" in info:
        out.append(f"cluster_size: {info['cluster-size']}\n")
    if info.get("encrypted"):
        out.append("encrypted: yes\n")
    if info.get("dirty-flag"):
        out.append("cleanly shut down: no\n")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        out.append(line + "\n")
    if "backing-filename-format" in info:
        out.append(f"backing file format: {info['backing-filename-format']}\n")
    if info.get("snapshots"):
        out.append("Snapshot list:\n" + snapshot_header() + "\n")
        out += [snapshot_line(sn) + "\n" for sn in info["snapshots"]]
    if "format-specific" in info:
        out.append("Format specific information:\n")
        dump_qobject(info["format-specific"]["data"], 1, out)
    return "".join(out)


# -- check ---------------------------------------------------------------------------------------
def image_check_human(check: dict[str, Any]) -> str:
    """qemu-img.c dump_human_image_check()."""
    out = []
    corruptions = check.get("corruptions", 0)
    leaks = check.get("leaks", 0)
    errors = check.get("check-errors", 0)
    if not (corruptions or leaks or errors):
        out.append("No errors were found on the image.\n")
    else:
        if corruptions:
            out.append(f"\n{corruptions} errors were found on the image.\nData may be "
                       "corrupted, or further writes to the image may corrupt it.\n")
        if leaks:
            out.append(f"\n{leaks} leaked clusters were found on the image.\nThis means waste "
                       "of disk space, but no harm to data.\n")
        if errors:
            out.append(f"\n{errors} internal errors have occurred during the check.\n")
    total = check.get("total-clusters", 0)
    allocated = check.get("allocated-clusters", 0)
    if total and allocated:
        out.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n"
                   % (allocated, total, allocated * 100.0 / total,
                      check.get("fragmented-clusters", 0) * 100.0 / allocated,
                      check.get("compressed-clusters", 0) * 100.0 / allocated))
    if check.get("image-end-offset"):
        out.append(f"Image end offset: {check['image-end-offset']}\n")
    return "".join(out)


def repaired_human(leaks_fixed: int, corruptions_fixed: int) -> str:
    return ("The following inconsistencies were found and repaired:\n\n"
            f"    {leaks_fixed} leaked clusters\n    {corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n")


# -- map -----------------------------------------------------------------------------------------
def _hex(value: int) -> str:
    """printf("%#x"): 0 prints as "0"."""
    return f"{value:#x}" if value else "0"


def map_human_header() -> str:
    return "%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File")


def map_human_line(e: dict[str, Any]) -> str:
    return "%-16s%-16s%-16s%s\n" % (_hex(e["start"]), _hex(e["length"]),
                                    _hex(e.get("offset", 0)), e.get("filename", ""))


def map_json_entry(e: dict[str, Any]) -> str:
    """qemu-img.c dump_map_entry() JSON form (QEMU 7.2: no "compressed" member)."""
    text = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, "data": %s'
            % (e["start"], e["length"], e["depth"], _b(e["present"]), _b(e["zero"]),
               _b(e["data"])))
    if "offset" in e:
        text += ', "offset": %d' % e["offset"]
    return text + "}"


def _b(value: bool) -> str:
    return "true" if value else "false"
