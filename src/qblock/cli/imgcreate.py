"""``qemu-img create -o`` for qcow2: option help text and typed conversion of the options.

The texts are qemu-img 7.2's (block/qcow2.c qcow2_create_opts, block/file-posix.c
raw_create_opts); conversions give QemuOpts' messages (util/qemu-option.c).
"""
from __future__ import annotations

from typing import Any

from qblock.cli import imgfmt

RAW_OPTION_HELP = """Supported raw options:
  size=<size>            - Virtual disk size"""

_QCOW2_OPTIONS = [
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("cluster_size", "size", "qcow2 cluster size"),
    ("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("compression_type", "str", "Compression method used for image cluster compression"),
    ("data_file", "str", "File name of an external data file"),
    ("data_file_raw", "bool (on/off)", "The external data file must stay valid as a raw image"),
    ("encrypt.cipher-alg", "str", "Name of encryption cipher algorithm"),
    ("encrypt.cipher-mode", "str", "Name of encryption cipher mode"),
    ("encrypt.format", "str", "Encrypt the image, format choices: 'aes', 'luks'"),
    ("encrypt.hash-alg", "str", "Name of encryption hash algorithm"),
    ("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    ("encrypt.ivgen-alg", "str", "Name of IV generator algorithm"),
    ("encrypt.ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    ("encrypt.key-secret", "str", "ID of secret providing qcow AES key or LUKS passphrase"),
    ("encryption", "bool (on/off)",
     "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    ("extended_l2", "bool (on/off)", "Extended L2 tables"),
    ("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
    ("preallocation", "str", "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    ("refcount_bits", "num", "Width of a reference count entry in bits"),
    ("size", "size", "Virtual disk size"),
]
# Added to the list when a target file name is given: the file protocol's own options.
_FILE_OPTIONS = [
    ("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
    ("nocow", "bool (on/off)", "Turn off copy-on-write (valid only on btrfs)"),
]
_PROTOCOL_NOTE = ("\n\nThe protocol level may support further options.\n"
                  "Specify the target filename to include those options.")


def _help_line(name: str, kind: str, text: str) -> str:
    return f"  {name + '=<' + kind + '>':<22} - {text}"


def option_help(fmt: str, with_filename: bool) -> str:
    """What ``qemu-img create -f FMT -o help [FILE]`` prints."""
    if fmt == "raw":
        options = [("size", "size", "Virtual disk size")]
        title = "Supported raw options:"
    else:
        options = list(_QCOW2_OPTIONS)
        title = "Supported qcow2 options:"
    if with_filename:  # the format's and the protocol's options merged, one title
        options = sorted(options + _FILE_OPTIONS)
        title = "Supported options:"
    text = "\n".join([title, *(_help_line(*o) for o in options)])
    return text if with_filename else text + _PROTOCOL_NOTE


_BOOL_WORDS = {"on": True, "off": False}
_QCOW2_KINDS = {"cluster_size": "size", "extended_l2": "bool", "lazy_refcounts": "bool",
                "refcount_bits": "num", "compat": "str", "compression_type": "str",
                "preallocation": "str", "backing_file": "str", "backing_fmt": "str",
                "data_file": "str", "data_file_raw": "bool", "encryption": "bool",
                "nocow": "bool", "extent_size_hint": "size"}
_UNSUPPORTED = {"data_file": "external data files are not supported",
                "data_file_raw": "external data files are not supported",
                "encryption": "encrypted images are not supported"}


class CreateOptionError(ValueError):
    """A bad ``-o`` value; the message is QemuOpts'."""


def qcow2_create_kwargs(options: dict[str, str]) -> dict[str, Any]:
    """Convert qemu-img's qcow2 ``-o`` strings to keyword arguments of qcow2 ``create``."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        kind = _QCOW2_KINDS.get(key)
        if kind is None and not key.startswith("encrypt."):
            raise CreateOptionError(f"Invalid parameter '{key}'")
        if kind == "bool":
            if value not in _BOOL_WORDS:
                raise CreateOptionError(f"Parameter '{key}' expects 'on' or 'off'")
            converted: Any = _BOOL_WORDS[value]
        elif kind == "num":
            if not value.isdigit():
                raise CreateOptionError(f"Parameter '{key}' expects a number")
            converted = int(value)
        elif kind == "size":
            try:
                converted = imgfmt.parse_size(value)
            except (ValueError, OverflowError):
                raise CreateOptionError(
                    f"Parameter '{key}' expects a non-negative number below 2^64\n"
                    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                    "peta-\nand exabytes, respectively.") from None
        else:
            converted = value
        out[key] = converted
    return out


def unsupported(kwargs: dict[str, Any]) -> str | None:
    """The reason qblock cannot create an image with these options, or None."""
    for key in kwargs:
        if key in _UNSUPPORTED or key.startswith("encrypt."):
            return _UNSUPPORTED.get(key, "encrypted images are not supported")
    return None
