"""``qblock img``: qemu-img's create, info, map, check and compare.

Command lines, output text, JSON and exit codes follow qemu-img 7.2.  The one deliberate
difference: error messages start with "qblock-img: " instead of "qemu-img: ".
"""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np

from qblock import api
from qblock.block.backend import BlockBackend
from qblock.block.node import close_node
from qblock.block.open import open_node
from qblock.block.perm import PERM_ALL, Perm
from qblock.cli import imgamend, imgbitmap, imgconvert, imgcreate, imgfmt, imgmeasure, imgresize
from qblock.cli import imgbench, imgdd
from qblock.cli.imginfo import image_info, path_combine, read_header
from qblock.cli.imgerr import PROG, CommandFailed, error, error_exit, getopt_args
from qblock.cli.imgprogress import Progress
from qblock.drivers.base import Status
from qblock.errors import NotSupported, QBlockError
from qblock.qobject import to_json

IO_BUF_SIZE = 2 * 1024 * 1024  # qemu-img.c IO_BUF_SIZE


def _output_format(value: str) -> str:
    if value not in ("human", "json"):
        raise error_exit("--output must be used with human or json as argument.")
    return value


# -- opening ---------------------------------------------------------------------------------
def _probe(filename: str, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("raw", "qcow2"):
            error(f"Unknown file format '{fmt}'")
            raise CommandFailed()
        return fmt
    try:
        return api.probe_format(filename)
    except OSError as e:
        error(f"Could not open '{filename}': Could not open '{filename}': "
              f"{os.strerror(e.errno or 0)}")
        raise CommandFailed() from None


async def _open_file(filename: str, *, writable: bool, share: bool) -> BlockBackend:
    """The file node of an image, for tools that read its metadata directly (info, check)."""
    # qemu-img check's repairs discard freed clusters, as QEMU's do (BDRV_O_UNMAP).
    node = await open_node({"driver": "file", "filename": filename, "discard": "unmap"},
                           read_only=not writable, implicit=True)
    perm = Perm.CONSISTENT_READ | (Perm.WRITE if writable else Perm(0))
    shared = PERM_ALL if share else Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
    try:
        return BlockBackend(node, perm, shared)
    except BaseException:
        await close_node(node)
        raise


async def _open_image(filename: str, fmt: str | None, share: bool) -> api.AsyncDisk:
    """img_open(): the whole graph read-only, with backing files (map, compare)."""
    fmt = _probe(filename, fmt)
    try:
        return await api.open_async(filename, driver=fmt, read_only=True, share=share)
    except QBlockError as e:
        error(f"Could not open '{filename}': {e}")
        raise CommandFailed() from None


# -- create ----------------------------------------------------------------------------------
def _create_options(text: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        opts[key] = value
    return opts


async def _backing_size(base: str, base_fmt: str | None, filename: str) -> int:
    name = path_combine(filename, base)
    try:
        fmt = base_fmt or api.probe_format(name)
        disk = await api.open_async(name, driver=fmt, read_only=True, share=True)
    except (OSError, QBlockError) as e:
        msg = f"Could not open '{name}': {os.strerror(e.errno or 0)}" if isinstance(
            e, OSError) else str(e)
        error(f"{filename}: {msg}\nCould not open backing image.")
        raise CommandFailed() from None
    size = disk.size
    await disk.close()
    return size


async def cmd_create(argv: list[str]) -> int:
    opts, args = getopt_args(argv, "F:b:f:ho:qu", ["help"])
    fmt, base, base_fmt, unsafe, quiet = "raw", None, None, False, False
    options: dict[str, str] = {}
    help_opts = False
    for o, v in opts:
        if o == "-f":
            fmt = v
        elif o == "-b":
            base = v
        elif o == "-F":
            base_fmt = v
        elif o == "-u":
            unsafe = True
        elif o == "-q":
            quiet = True
        elif o == "-o":
            parsed = _create_options(v)
            help_opts |= "help" in parsed or "?" in parsed
            options.update({k: x for k, x in parsed.items() if k not in ("help", "?")})
        elif o in ("-h", "--help"):
            print(__doc__)
            return 0
    if help_opts:
        print(imgcreate.option_help(fmt, bool(args)))
        return 0
    if not args:
        raise error_exit("Expecting image file name")
    filename = args[0]
    size: int | None = None
    if len(args) > 1:
        try:
            size = imgfmt.parse_size(args[1])
        except OverflowError:
            error("Image size must be less than 8 EiB!")
            return 1
        except ValueError:
            _size_suffix_error("Invalid image size specified.")
            return 1
    if len(args) > 2:
        raise error_exit(f"Unexpected argument: {args[2]}")
    if fmt not in ("raw", "qcow2"):
        error(f"{filename}: Unknown file format '{fmt}'")
        return 1
    base = base or options.pop("backing_file", None)
    base_fmt = base_fmt or options.pop("backing_fmt", None)
    if "size" in options and size is None:
        size = imgfmt.parse_size(options.pop("size"))
    if base is not None and fmt == "raw":
        error(f"{filename}: Backing file not supported for file format 'raw'")
        return 1
    if base is not None and base_fmt is None:
        # QEMU 7.2 refuses to guess; the hint names the probed format.
        try:
            probed = api.probe_format(path_combine(filename, base))
            hint = f"\nDetected format of {probed}."
        except OSError:
            hint = ""
        sys.stderr.write(f"{PROG}: {filename}: Backing file specified without backing "
                         f"format{hint}")
        sys.stderr.flush()
        return 1
    if size is None and base is not None and not unsafe:
        size = await _backing_size(base, base_fmt, filename)
    if size is None:
        error(f"{filename}: Image creation needs a size parameter")
        return 1
    try:
        if fmt == "raw":
            if not quiet:
                print(f"Formatting '{filename}', fmt=raw size={size}", flush=True)
            with open(filename, "wb") as f:
                f.truncate(size)
        else:
            await _create_qcow2(filename, size, options, base, base_fmt, quiet)
    except (QBlockError, OSError) as e:
        msg = os.strerror(e.errno or 0) if isinstance(e, OSError) else str(e)
        error(f"{filename}: {msg}")
        return 1
    return 0


async def _create_qcow2(filename: str, size: int, options: dict[str, str], base: str | None,
                        base_fmt: str | None, quiet: bool) -> None:
    """Validate, print QEMU's "Formatting ..." line, then format the file."""
    from qblock.drivers.qcow2.create import create, formatting_line, validate

    try:
        kwargs = imgcreate.qcow2_create_kwargs(options)
    except imgcreate.CreateOptionError as e:
        raise QBlockError(str(e)) from None
    if base is not None:
        kwargs["backing_file"], kwargs["backing_fmt"] = base, base_fmt
    if not quiet:
        print(formatting_line(filename, size, kwargs), flush=True)
    reason = imgcreate.unsupported(kwargs)
    if reason is not None:
        raise NotSupported(reason)
    for key in ("nocow", "extent_size_hint"):
        kwargs.pop(key, None)
    validate(size, **kwargs)
    await create(filename, size, **kwargs)


def _size_suffix_error(what: str) -> None:
    """qemu-img's two-line complaint about a size it could not parse."""
    error(f"{what} You may use k, M, G, T, P or E suffixes for")
    error("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")


# -- info ------------------------------------------------------------------------------------
async def cmd_info(argv: list[str]) -> int:
    opts, args = getopt_args(argv, "f:hU", ["output=", "backing-chain", "force-share", "help"])
    fmt, output, chain, share = None, "human", False, False
    for o, v in opts:
        if o == "-f":
            fmt = v
        elif o == "--output":
            output = _output_format(v)
        elif o == "--backing-chain":
            chain = True
        elif o in ("-U", "--force-share"):
            share = True
    if len(args) != 1:
        raise error_exit("Expecting one image file name")
    infos: list[dict[str, Any]] = []
    filename: str | None = args[0]
    seen: set[str] = set()
    while filename is not None:
        if filename in seen:
            error(f"Backing file '{filename}' creates an infinite loop.")
            return 1
        seen.add(filename)
        image_fmt = _probe(filename, fmt)
        try:
            blk = await _open_file(filename, writable=False, share=share)
        except QBlockError as e:
            error(f"Could not open '{filename}': {e}")
            return 1
        try:
            info = await image_info(filename, image_fmt, blk.edge)
        except QBlockError as e:
            error(f"Could not open '{filename}': {e}")
            return 1
        finally:
            await blk.close()
        infos.append(info)
        filename = fmt = None
        if chain:
            filename = info.get("full-backing-filename")
            fmt = info.get("backing-filename-format")
    if output == "json":
        print(to_json(infos if chain else infos[0], pretty=True))
    else:
        print("\n".join(imgfmt.image_info_human(i) for i in infos), end="")
    return 0


# -- check -----------------------------------------------------------------------------------
def _image_check(filename: str, fmt: str, res: Any) -> dict[str, Any]:
    """qemu-img.c collect_image_check(): ImageCheck, optional members only when non-zero."""
    check: dict[str, Any] = {"filename": filename, "format": fmt,
                             "check-errors": res.check_errors}
    for key, value in (("image-end-offset", res.image_end_offset),
                       ("corruptions", res.corruptions), ("leaks", res.leaks),
                       ("corruptions-fixed", res.corruptions_fixed),
                       ("leaks-fixed", res.leaks_fixed),
                       ("total-clusters", res.total_clusters),
                       ("allocated-clusters", res.allocated_clusters),
                       ("fragmented-clusters", res.fragmented_clusters),
                       ("compressed-clusters", res.compressed_clusters)):
        if value:
            check[key] = value
    return check


async def cmd_check(argv: list[str]) -> int:
    from qblock.drivers.qcow2.check import FIX_ERRORS, FIX_LEAKS, check_image

    opts, args = getopt_args(argv, "f:hpr:qU", ["output=", "repair=", "force-share", "help"])
    fmt, output, fix, quiet, share, progress = None, "human", 0, False, False, False
    for o, v in opts:
        if o == "-f":
            fmt = v
        elif o == "--output":
            output = _output_format(v)
        elif o in ("-r", "--repair"):
            if v == "leaks":
                fix = FIX_LEAKS
            elif v == "all":
                fix = FIX_LEAKS | FIX_ERRORS
            else:
                raise error_exit("Unknown option value for -r (expecting 'leaks' or 'all'): "
                                 f"{v}")
        elif o == "-q":
            quiet = True
        elif o == "-p":  # a qblock extension: qemu-img check has no progress
            progress = True
        elif o in ("-U", "--force-share"):
            share = True
    if len(args) != 1:
        raise error_exit("Expecting one image file name")
    filename = args[0]
    image_fmt = _probe(filename, fmt)
    try:
        blk = await _open_file(filename, writable=bool(fix), share=share)
    except QBlockError as e:
        error(f"Could not open '{filename}': {e}")
        return 1
    try:
        if image_fmt != "qcow2":
            error("This image format does not support checks")
            return 63
        try:
            target = SimpleNamespace(file=blk.edge, header=await read_header(blk.edge))
        except QBlockError as e:
            error(f"Could not open '{filename}': {e}")
            return 1
        bar = Progress(Progress.wanted(progress, quiet))
        bar.start()
        res = await check_image(target, fix, progress=bar.fraction)
        bar.end()
        if res.ret < 0:
            error(f"Check failed: {os.strerror(-res.ret)}")
            return 1
        check = _image_check(filename, image_fmt, res)
        if res.corruptions_fixed or res.leaks_fixed:
            if output == "human" and not quiet:
                print(imgfmt.repaired_human(res.leaks_fixed, res.corruptions_fixed), end="")
            target.header = await read_header(blk.edge)
            again = await check_image(target, 0)
            again.leaks_fixed, again.corruptions_fixed = res.leaks_fixed, res.corruptions_fixed
            check = _image_check(filename, image_fmt, again)
        if not quiet:
            if output == "json":
                print(to_json(check, pretty=True))
            else:
                print(imgfmt.image_check_human(check), end="")
    finally:
        await blk.close()
    if check["check-errors"]:
        error("Check failed")
        return 1
    if check.get("corruptions"):
        return 2
    if check.get("leaks"):
        return 3
    return 0


# -- map -------------------------------------------------------------------------------------
async def _map_entry(disk: api.AsyncDisk, offset: int, length: int) -> dict[str, Any]:
    """qemu-img.c get_block_status(): the first layer that has data or zeroes decides."""
    from qblock.block import io

    node = disk.node
    depth = 0
    while True:
        st = await io.block_status(node, offset, length)
        length = st.pnum
        if st.status & (Status.ZERO | Status.DATA):
            break
        cow = node.cow_child()
        if cow is None:
            break
        node = cow.node
        depth += 1
    entry: dict[str, Any] = {"start": offset, "length": length, "depth": depth,
                             "present": bool(st.status & Status.ALLOCATED),
                             "zero": bool(st.status & Status.ZERO),
                             "data": bool(st.status & Status.DATA)}
    if st.status & Status.OFFSET_VALID:
        entry["offset"] = st.map
        if st.file is not None:
            entry["filename"] = st.file.filename
    return entry


def _mergeable(curr: dict[str, Any], nxt: dict[str, Any]) -> bool:
    """qemu-img.c entry_mergeable()."""
    if curr["length"] == 0:
        return False
    for key in ("zero", "data", "depth", "present"):
        if curr[key] != nxt[key]:
            return False
    if ("filename" in curr) != ("filename" in nxt) or ("offset" in curr) != ("offset" in nxt):
        return False
    if curr.get("filename") != nxt.get("filename"):
        return False
    return "offset" not in curr or curr["offset"] + curr["length"] == nxt["offset"]


async def cmd_map(argv: list[str]) -> int:
    opts, args = getopt_args(argv, "f:hU", ["output=", "start-offset=", "max-length=",
                                        "force-share", "help"])
    fmt, output, share, start, max_length = None, "human", False, 0, None
    for o, v in opts:
        if o == "-f":
            fmt = v
        elif o == "--output":
            output = _output_format(v)
        elif o in ("-U", "--force-share"):
            share = True
        elif o == "--start-offset":
            try:
                start = imgfmt.parse_size(v)
            except (ValueError, OverflowError):
                _size_suffix_error("Invalid start offset specified.")
                return 1
        elif o == "--max-length":
            try:
                max_length = imgfmt.parse_size(v)
            except (ValueError, OverflowError):
                _size_suffix_error("Invalid max length specified.")
                return 1
    if len(args) != 1:
        raise error_exit("Expecting one image file name")
    disk = await _open_image(args[0], fmt, share)
    try:
        return await _map(disk, output, start, max_length)
    finally:
        await disk.close()


async def _map(disk: api.AsyncDisk, output: str, start: int, max_length: int | None) -> int:
    length = disk.size
    if max_length is not None:
        length = min(start + max_length, length)
    out = sys.stdout
    out.write("[" if output == "json" else imgfmt.map_human_header())
    curr: dict[str, Any] = {"start": start, "length": 0}

    def dump(e: dict[str, Any], nxt: dict[str, Any] | None) -> bool:
        if output == "json":
            out.write(imgfmt.map_json_entry(e) + (",\n" if nxt is not None else ""))
            return True
        if e["data"] and "offset" not in e:
            out.flush()
            error("File contains external, encrypted or compressed clusters.")
            return False
        if e["data"] and not e["zero"]:
            out.write(imgfmt.map_human_line(e))
        if nxt is not None and (not nxt["data"] or nxt["zero"]):
            # qemu-img: the human format does not tell 0, ZERO and ZERO|DATA apart.
            nxt["data"], nxt["zero"] = False, True
        return True

    while curr["start"] + curr["length"] < length:
        offset = curr["start"] + curr["length"]
        nxt = await _map_entry(disk, offset, length - offset)
        if _mergeable(curr, nxt):
            curr["length"] += nxt["length"]
            continue
        if curr["length"] > 0 and not dump(curr, nxt):
            return 1
        curr = nxt
    if "data" in curr and not dump(curr, None):
        return 1
    if output == "json":
        out.write("]\n")
    out.flush()
    return 0


# -- compare ---------------------------------------------------------------------------------
def _first_nonzero(buf: bytes | bytearray) -> int:
    arr = np.frombuffer(buf, dtype=np.uint8)
    nz = np.flatnonzero(arr)
    return int(nz[0]) if len(nz) else -1


async def _check_empty(disk: api.AsyncDisk, offset: int, length: int, quiet: bool) -> int:
    """qemu-img.c check_empty_sectors()."""
    buf = await disk.read(offset, length)
    idx = _first_nonzero(buf)
    if idx >= 0:
        if not quiet:
            print(f"Content mismatch at offset {offset + idx}!")
        return 1
    return 0


async def _status(disk: api.AsyncDisk, offset: int, length: int) -> tuple[Status, int]:
    from qblock.block import io

    st, _depth = await io.block_status_above(disk.node, None, offset, length)
    return st.status, st.pnum


async def cmd_compare(argv: list[str]) -> int:
    opts, args = getopt_args(argv, "f:F:hqsU", ["force-share", "help"])
    fmt1 = fmt2 = None
    quiet = strict = share = False
    for o, v in opts:
        if o == "-f":
            fmt1 = v
        elif o == "-F":
            fmt2 = v
        elif o == "-q":
            quiet = True
        elif o == "-s":
            strict = True
        elif o in ("-U", "--force-share"):
            share = True
    if len(args) != 2:
        raise error_exit("Expecting two image file names")
    try:
        disk1 = await _open_image(args[0], fmt1, share)
    except CommandFailed:
        return 2
    try:
        try:
            disk2 = await _open_image(args[1], fmt2, share)
        except CommandFailed:
            return 2
        try:
            return await _compare(disk1, disk2, strict, quiet)
        finally:
            await disk2.close()
    finally:
        await disk1.close()


async def _compare(disk1: api.AsyncDisk, disk2: api.AsyncDisk, strict: bool, quiet: bool) -> int:
    size1, size2 = disk1.size, disk2.size
    total = min(size1, size2)

    def say(text: str) -> None:
        if not quiet:
            print(text)

    if strict and size1 != size2:
        say("Strict mode: Image size mismatch!")
        return 1
    offset = 0
    while offset < total:
        st1, n1 = await _status(disk1, offset, size1 - offset)
        st2, n2 = await _status(disk2, offset, size2 - offset)
        alloc1, alloc2 = bool(st1 & Status.ALLOCATED), bool(st2 & Status.ALLOCATED)
        chunk = min(n1, n2, total - offset)
        if strict and st1 != st2:
            say(f"Strict mode: Offset {offset} block status mismatch!")
            return 1
        if st1 & Status.ZERO and st2 & Status.ZERO:
            pass
        elif alloc1 == alloc2:
            if alloc1:
                chunk = min(chunk, IO_BUF_SIZE)
                buf1 = await disk1.read(offset, chunk)
                buf2 = await disk2.read(offset, chunk)
                if buf1 != buf2:
                    a = np.frombuffer(buf1, dtype=np.uint8)
                    b = np.frombuffer(buf2, dtype=np.uint8)
                    diff = int(np.flatnonzero(a != b)[0])
                    # compare_buffers(): mismatches are reported per 512-byte sector.
                    say(f"Content mismatch at offset {offset + diff - diff % 512}!")
                    return 1
        else:
            chunk = min(chunk, IO_BUF_SIZE)
            if await _check_empty(disk1 if alloc1 else disk2, offset, chunk, quiet):
                return 1
        offset += chunk
    if size1 != size2:
        over, over_size = (disk1, size1) if size1 > size2 else (disk2, size2)
        say("Warning: Image size mismatch!")
        offset = total
        while offset < over_size:
            st, chunk = await _status(over, offset, over_size - offset)
            if st & Status.ALLOCATED:
                chunk = min(chunk, IO_BUF_SIZE)
                if await _check_empty(over, offset, chunk, quiet):
                    return 1
            offset += chunk
    say("Images are identical.")
    return 0


async def _commit(argv: list[str]) -> int:
    """qemu-img commit (imgcommit imports this module, so it is loaded on use)."""
    from qblock.cli.imgcommit import cmd_commit

    return await cmd_commit(argv)


async def _rebase(argv: list[str]) -> int:
    """qemu-img rebase (loaded on use, like commit)."""
    from qblock.cli.imgrebase import cmd_rebase

    return await cmd_rebase(argv)


async def _snapshot(argv: list[str]) -> int:
    """qemu-img snapshot (loaded on use, like commit)."""
    from qblock.cli.imgsnapshot import main as cmd_snapshot

    return await cmd_snapshot(argv)


COMMANDS = {"create": cmd_create, "info": cmd_info, "map": cmd_map, "check": cmd_check,
            "compare": cmd_compare, "bitmap": imgbitmap.main,
            "convert": imgconvert.cmd_convert, "commit": _commit, "rebase": _rebase,
            "snapshot": _snapshot, "resize": imgresize.cmd_resize,
            "amend": imgamend.cmd_amend, "measure": imgmeasure.cmd_measure,
            "dd": imgdd.cmd_dd, "bench": imgbench.cmd_bench}


def main(argv: list[str]) -> int:
    """Entry point of ``qblock img COMMAND ...``."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: qblock img {{{'|'.join(COMMANDS)}}} [options]\n\n{__doc__}")
        return 0 if argv else 1
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        error(f"Command not found: {argv[0]}")
        return 1
    try:
        return api.run(cmd(argv[1:]))
    except CommandFailed as e:
        return e.code
