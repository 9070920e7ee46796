"""``qblock daemon``: qemu-storage-daemon's command line and life cycle (REFERENCE §8).

Options are processed in the order given, so a chardev or node must come before the option
that uses it; ``--export`` needs ``--nbd-server`` first.  SIGTERM, SIGINT, SIGHUP and QMP
``quit`` shut down cleanly: NBD and QMP clients are disconnected, BlockBackends and nodes
flushed and closed (qcow2 clears its dirty bit), socket files and the pid file removed.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import sys
from collections.abc import Awaitable, Iterator
from typing import Any

from qblock import __version__, trace
from qblock.block import io
from qblock.block.node import close_node, registry
from qblock.block.open import open_node
from qblock.errors import QBlockError
from qblock.keyval import KeyvalError, parse_keyval, parse_option_arg, parse_qemu_opts, to_bool
from qblock.exports.nbd import tls as nbd_tls
from qblock.monitor.commands import nbd as nbd_commands
from qblock.monitor.commands.control import VERSION
from qblock.monitor.context import BlockState
from qblock.monitor.server import Listener, QmpServer, listen_tcp, listen_unix

PROG = "qblock daemon"

HELP = f"""\
Usage: {PROG} [options]
QEMU storage daemon (qblock {__version__})

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev socket,id=<id>,path=<path>,server=on[,wait=on|off]
  --chardev socket,id=<id>,host=<host>,port=<port>,server=on[,wait=on|off]
                         configure a QMP listening socket (unix sockets are
                         created with mode 0600)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,description=<description>][,allocation-depth=on|off]
                         export the specified block node over NBD

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --object iothread,id=<id>
                         accepted (qblock runs every node in one event loop)
  --object tls-creds-x509,id=<id>,dir=<dir>,endpoint=server|client[,verify-peer=on|off]
                         TLS credentials for the NBD server or an nbd node

  --pidfile <path>       write process ID to a file after startup
"""

# getopt_long(argc, argv, "hT:V", long_options): name -> takes an argument
_LONG = {"blockdev": True, "chardev": True, "daemonize": False, "export": True, "help": False,
         "monitor": True, "nbd-server": True, "object": True, "pidfile": True, "trace": True,
         "version": False}
_SHORT = {"h": "help", "T": "trace", "V": "version"}
_IOTHREAD_PROPS = {"id", "qom-type", "poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch",
                   "thread-pool-min", "thread-pool-max"}


class UsageError(Exception):
    """A command-line error; the message is printed after the program name."""


def parse_args(argv: list[str]) -> list[tuple[str, str | None]]:
    """Split ``argv`` like getopt_long: [(long option name, argument or None)]."""
    out: list[tuple[str, str | None]] = []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            matches = [n for n in _LONG if n == name] or [n for n in _LONG if n.startswith(name)]
            if len(matches) != 1 or not name:
                raise UsageError(f"unrecognized option '{arg}'")
            name = matches[0]
            if _LONG[name] and not eq:
                value = next(args, None)
                if value is None:
                    raise UsageError(f"option '--{name}' requires an argument")
            elif not _LONG[name] and eq:
                raise UsageError(f"option '--{name}' doesn't allow an argument")
            out.append((name, value if _LONG[name] else None))
        elif arg.startswith("-") and len(arg) > 1:
            letter, rest = arg[1], arg[2:]
            if letter not in _SHORT:
                raise UsageError(f"invalid option -- '{letter}'")
            name = _SHORT[letter]
            if _LONG[name]:
                value = rest or next(args, None)
                if value is None:
                    raise UsageError(f"option requires an argument -- '{letter}'")
                out.append((name, value))
            else:
                out.append((name, None))
        else:
            raise UsageError(f"{arg}: Unexpected argument")
    return out


class StartupError(Exception):
    """An option failed; reported as ``qblock daemon: --opt value: message``."""


class Daemon:
    """The running daemon: block state, QMP server, chardevs, pid file."""

    def __init__(self, options: list[tuple[str, str | None]]) -> None:
        self.options = options
        self.state = BlockState()
        self.server = QmpServer(self.state, VERSION)
        self.chardevs: dict[str, Listener] = {}
        self.monitored: set[str] = set()
        self.objects: dict[str, dict[str, Any]] = {}
        self.pidfile: tuple[str, int] | None = None
        self.stop = asyncio.Event()

    async def run(self, ready_fd: int | None = None) -> int:
        """Process the options, serve until quit or a signal, shut down; the exit status."""
        io.event_hook = self.state.events.emit
        try:
            status = await self._serve(ready_fd)
        finally:
            if not await self.shutdown():
                status = 1
            io.event_hook = None
        return status

    async def _serve(self, ready_fd: int | None) -> int:
        self._install_signals()  # before any socket exists: a signal then stops us cleanly
        for name, value in self.options:
            try:
                if await self.apply(name, value):
                    return 0
            except (QBlockError, ValueError, OSError) as exc:
                where = f"--{name} {value}" if value is not None else f"--{name}"
                print(f"{PROG}: {where}: {_message(exc)}", file=sys.stderr)
                return 1
        if ready_fd is not None:
            _notify_parent(ready_fd)
        waits = {asyncio.create_task(self.server.quit_event.wait()),
                 asyncio.create_task(self.stop.wait())}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        return 0

    async def apply(self, name: str, value: str | None) -> bool:
        """Process one option; True means stop successfully now (help, version)."""
        if name == "help":
            print(HELP, end="")
            return True
        if name == "version":
            print(f"{PROG} version {VERSION.major}.{VERSION.minor}.{VERSION.micro} "
                  f"({VERSION.package})")
            return True
        assert value is not None or name == "daemonize"
        if name == "trace":
            trace.configure(value)
        elif name == "blockdev":
            node = await open_node(parse_option_arg(value, "driver"))
            node.monitor_owned = True
        elif name == "chardev":
            await self.add_chardev(value)
        elif name == "monitor":
            await self.add_monitor(value)
        elif name == "object":
            self.add_object(value)
        elif name == "pidfile":
            self.write_pidfile(value)
        elif name == "nbd-server":
            await nbd_commands.server_start_option(value)
        elif name == "export":
            await nbd_commands.export_option(self.state, value)
        return False

    async def add_chardev(self, text: str) -> None:
        """``--chardev socket,id=ID,path=P|host=H,port=N,server=on[,wait=off]``."""
        opts = parse_qemu_opts(text, "backend")
        backend = opts.pop("backend", None)
        chardev_id = opts.pop("id", None)
        if chardev_id is None:
            raise QBlockError("chardev: no id specified")
        if backend != "socket":
            raise QBlockError(f"'{backend}' is not a valid char driver name"
                              if backend else "chardev: \"backend\" not specified")
        if chardev_id in self.chardevs:
            raise QBlockError(f"attempt to add duplicate property '{chardev_id}' to object "
                              "(type 'container')")
        server = to_bool(opts.pop("server", "off"), "server")
        wait = to_bool(opts.pop("wait", "on"), "wait")
        path, host, port = opts.pop("path", None), opts.pop("host", None), opts.pop("port", None)
        for key in ("ipv4", "ipv6", "nodelay"):
            to_bool(opts.pop(key, "off"), key)
        if opts:
            raise QBlockError(f"Invalid parameter '{next(iter(opts))}'")
        if not server:
            raise QBlockError("only listening sockets (server=on) are supported for QMP")
        if path is not None:
            listener = listen_unix(chardev_id, path)
        elif port is not None:
            listener = listen_tcp(chardev_id, host or "", int(port))
        else:
            raise QBlockError("chardev: socket: no host given")
        self.chardevs[chardev_id] = listener
        self.server.own(listener)
        if wait:
            # qemu-char.c: a server socket with wait=on blocks until a client connects.
            print(f"{PROG}: --chardev {text}: info: QEMU waiting for connection on: "
                  f"disconnected:{listener.description}", file=sys.stderr)
            conn, _ = await asyncio.get_running_loop().sock_accept(listener.sock)
            listener.pending.append(conn)

    async def add_monitor(self, text: str) -> None:
        """``--monitor [chardev=]ID[,mode=control][,pretty=on|off][,id=ID]`` (MonitorOptions)."""
        opts = parse_option_arg(text, "chardev")
        for key in opts:
            if key not in ("chardev", "mode", "pretty", "id"):
                raise KeyvalError(f"Parameter '{key}' is unexpected")
        if "chardev" not in opts:
            raise KeyvalError("Parameter 'chardev' is missing")
        mode = opts.get("mode", "control")
        if mode not in ("control", "readline"):
            raise KeyvalError(f"Parameter 'mode' does not accept value '{mode}'")
        pretty = opts.get("pretty", False)
        pretty = to_bool(pretty, "pretty") if isinstance(pretty, str) else bool(pretty)
        listener = self.chardevs.get(opts["chardev"])
        if listener is None:
            raise QBlockError(f"chardev \"{opts['chardev']}\" not found")
        if mode != "control":
            raise QBlockError("Only QMP is supported")
        if listener.chardev_id in self.monitored:
            raise QBlockError(f"Device '{listener.chardev_id}' is in use")
        self.monitored.add(listener.chardev_id)
        await self.server.add_monitor(listener, pretty=pretty)

    def add_object(self, text: str) -> None:
        """``--object iothread,id=ID`` (accepted) or ``tls-creds-x509`` (NBD TLS);
        other QOM types are unknown to qblock."""
        if text == "help":
            print("List of user creatable objects:\n  iothread\n  tls-creds-x509")
            return
        props = parse_keyval(text, "qom-type")
        qom_type = props.get("qom-type")
        if qom_type is None:
            raise KeyvalError("Parameter 'qom-type' is missing")
        if qom_type == "tls-creds-x509":
            nbd_tls.add_object(props)
            return
        if qom_type != "iothread":
            raise KeyvalError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        if "id" not in props:
            raise KeyvalError("Parameter 'id' is missing")
        for key in props:
            if key not in _IOTHREAD_PROPS:
                raise KeyvalError(f"Property '{qom_type}.{key}' not found")
        if props["id"] in self.objects:
            raise QBlockError(f"attempt to add duplicate property '{props['id']}' to object "
                              "(type 'container')")
        self.objects[props["id"]] = props

    def write_pidfile(self, path: str) -> None:
        """util/oslib-posix.c qemu_write_pidfile(): locked, truncated, "PID\\n"."""
        path = os.path.abspath(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise QBlockError(f"cannot create PID file: Cannot lock pid file: "
                              f"{os.strerror(exc.errno)}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.pidfile = (path, fd)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.stop.set)

    async def shutdown(self) -> bool:
        """Disconnect clients, close backends and every node, remove socket and pid files.

        Returns False if a backend or node could not be closed cleanly.
        """
        ok = True
        await self.server.close()
        ok &= await _reported(nbd_commands.shutdown(self.state))
        for backend in list(self.state.backends):
            ok &= await _reported(backend.close())
        self.state.backends.clear()
        for node in _close_order():
            node.monitor_owned = False
            ok &= await _reported(close_node(node))
        if self.pidfile is not None:
            path, fd = self.pidfile
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)
        return ok


def _close_order() -> Iterator[Any]:
    """Nodes parents first, so each is closed once nobody above it uses it."""
    while True:
        roots = [n for n in registry.nodes.values() if not n.parents and not n.closed]
        if not roots:
            return
        yield from roots
        if all(not n.closed for n in roots):
            return  # a close failed; stop rather than loop


async def _reported(step: Awaitable[Any]) -> bool:
    """Await one shutdown step; report its failure and go on with the others."""
    try:
        await step
    except Exception as exc:
        print(f"{PROG}: {_message(exc)}", file=sys.stderr)
        return False
    return True


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


def _daemonize() -> int:
    """Fork; the parent waits for the child's startup and exits with its status.

    Returns the pipe's write end in the child (os-posix.c os_daemonize / os_setup_post).
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        status = os.read(rfd, 1)
        os._exit(0 if status == b"\0" else 1)
    os.close(rfd)
    os.setsid()
    return wfd


def _notify_parent(fd: int) -> None:
    """Startup succeeded: release the parent, detach from the terminal (os_setup_post)."""
    os.write(fd, b"\0")
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(devnull, std)
    os.close(devnull)
    os.chdir("/")


def main(argv: list[str]) -> int:
    try:
        options = parse_args(argv)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    ready_fd = _daemonize() if any(name == "daemonize" for name, _ in options) else None
    return asyncio.run(Daemon(options).run(ready_fd))
