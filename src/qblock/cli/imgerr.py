"""What every ``qblock img`` subcommand shares: the program name, error lines, getopt complaints.

qemu-img reports through error_report() (``qemu-img: MESSAGE``) and, for command-line
mistakes, error_exit() (the message, then ``Try 'qemu-img --help' for more information``);
both end the command with status 1.  Our lines say ``qblock-img`` (README: deliberate
differences).
"""
from __future__ import annotations

import getopt
import sys

PROG = "qblock-img"
RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{0}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.")


class CommandFailed(Exception):
    """Leave a subcommand with an exit status (1 unless given); the message was printed."""

    def __init__(self, code: int = 1) -> None:
        super().__init__(code)
        self.code = code


def error(msg: str) -> None:
    """util/error-report.c error_report() with our program name."""
    print(f"{PROG}: {msg}", file=sys.stderr)


def print_usage_error(msg: str) -> None:
    """What qemu-img.c error_exit() prints: the message and the help hint."""
    print(f"{PROG}: {msg}\nTry '{PROG} --help' for more information", file=sys.stderr)


def error_exit(msg: str) -> CommandFailed:
    """qemu-img.c error_exit(): print, and return the exception that ends the command."""
    print_usage_error(msg)
    return CommandFailed()


def object_unsupported() -> CommandFailed:
    """``--object``: qblock has no QOM objects (secrets, TLS credentials...); README,
    deliberate differences.  Returns the exception that ends the command."""
    error("--object is not supported by qblock")
    return CommandFailed()


def getopt_complaint(e: getopt.GetoptError) -> str:
    """qemu-img.c missing_argument() / unrecognized_option() for a getopt failure."""
    name = f"-{e.opt}" if len(e.opt) == 1 else f"--{e.opt}"
    if "requires argument" in e.msg:
        return f"missing argument for option '{name}'"
    return f"unrecognized option '{name}'"


def getopt_args(argv: list[str], short: str,
                long: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """getopt_long() as qemu-img uses it: options may follow operands; bad ones end the
    command with qemu-img's words."""
    try:
        return getopt.gnu_getopt(argv, short, long)
    except getopt.GetoptError as e:
        raise error_exit(getopt_complaint(e)) from None
