"""``tls-creds-x509`` objects for the NBD server (crypto/tlscredsx509.c, nbd/server.c).

A credentials directory holds QEMU's file names: ``ca-cert.pem`` and, for a server endpoint,
``server-cert.pem`` and ``server-key.pem``.  ``verify-peer`` (default on) makes clients
present a certificate signed by the CA.  The objects live in a per-process table looked up
by id, as QOM's /objects container does.
"""
from __future__ import annotations

import dataclasses
import os
import ssl
from typing import Any

from qblock.errors import InvalidArgument, QBlockError
from qblock.keyval import to_bool

PROPS = {"qom-type", "id", "dir", "endpoint", "verify-peer", "priority", "sanity-check",
         "loaded", "passwordid"}


@dataclasses.dataclass(frozen=True)
class TlsCreds:
    """One tls-creds-x509 object: its endpoint and the SSLContext built from its files."""

    endpoint: str
    context: ssl.SSLContext
    directory: str
    verify_peer: bool


CREDS: dict[str, TlsCreds] = {}


def _files(directory: str, names: tuple[str, ...], optional: tuple[str, ...] = ()
           ) -> dict[str, str | None]:
    """crypto/tlscredsx509.c: each required file must be readable; optional ones may lack."""
    out: dict[str, str | None] = {}
    for name in names + optional:
        path = os.path.join(directory, name)
        try:
            with open(path, "rb"):
                out[name] = path
        except OSError as exc:
            if name in optional and not os.path.exists(path):
                out[name] = None
                continue
            raise QBlockError(f"Unable to access credentials {path}: {exc.strerror}") from None
    return out


def server_context(directory: str, verify_peer: bool) -> ssl.SSLContext:
    """An SSLContext serving with ``directory``'s server certificate and key."""
    files = _files(directory, ("ca-cert.pem", "server-cert.pem", "server-key.pem"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load(ctx, directory, files["ca-cert.pem"], files["server-cert.pem"],
          files["server-key.pem"])
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    return ctx


def client_context(directory: str, verify_peer: bool,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """An SSLContext for connecting: the CA, and the client certificate if there is one;
    the server's name is checked only when the caller has one (QEMU: tls-hostname or the
    inet host)."""
    files = _files(directory, ("ca-cert.pem",), ("client-cert.pem", "client-key.pem"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _load(ctx, directory, files["ca-cert.pem"], files["client-cert.pem"],
          files["client-key.pem"])
    ctx.check_hostname = verify_peer and check_hostname
    if not verify_peer:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load(ctx: ssl.SSLContext, directory: str, ca: str | None, cert: str | None,
          key: str | None) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if cert is not None and key is not None:
            ctx.load_cert_chain(cert, key)
        if ca is not None:
            ctx.load_verify_locations(ca)
    except ssl.SSLError as exc:
        raise QBlockError(f"Unable to load TLS credentials from {directory}: "
                          f"{exc.reason or exc}") from None


def add_object(props: dict[str, Any]) -> None:
    """``--object tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]``."""
    for key in props:
        if key not in PROPS:
            raise InvalidArgument(f"Property 'tls-creds-x509.{key}' not found")
    if "id" not in props:
        raise InvalidArgument("Parameter 'id' is missing")
    endpoint = props.get("endpoint", "client")
    if endpoint not in ("client", "server"):
        raise InvalidArgument(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    if "dir" not in props:
        raise QBlockError("Missing 'dir' property value")
    verify = props.get("verify-peer", True)
    verify = to_bool(verify, "verify-peer") if isinstance(verify, str) else bool(verify)
    if props["id"] in CREDS:
        raise QBlockError(f"attempt to add duplicate property '{props['id']}' to object "
                          "(type 'container')")
    make = server_context if endpoint == "server" else client_context
    CREDS[props["id"]] = TlsCreds(endpoint, make(props["dir"], verify), props["dir"], verify)


def lookup(creds_id: str, endpoint: str = "server") -> ssl.SSLContext:
    """nbd_get_tls_creds() / block/nbd.c nbd_get_tls_creds(): the context of an object
    with the expected endpoint."""
    creds = CREDS.get(creds_id)
    if creds is None:
        raise QBlockError(f"No TLS credentials with id '{creds_id}'")
    if creds.endpoint != endpoint:
        raise QBlockError(f"Expected TLS credentials for a {endpoint} endpoint")
    return creds.context


def client(creds_id: str, hostname: str | None) -> ssl.SSLContext:
    """block/nbd.c: client-endpoint credentials, checking ``hostname`` when there is one."""
    lookup(creds_id, "client")
    creds = CREDS[creds_id]
    if hostname is None:
        return client_context(creds.directory, creds.verify_peer, check_hostname=False)
    return creds.context
