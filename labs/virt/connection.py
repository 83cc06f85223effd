"""libvirt connections from the inventory's URIs.

libvirt prints every error to stderr through its default handler; the errors
reach us as exceptions anyway, so the handler is silenced once per process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import libvirt

from labs import retries
from labs.errors import InfraError

_quiet = threading.Lock()
_silenced = False


def silence_libvirt_stderr() -> None:
    global _silenced
    with _quiet:
        if not _silenced:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _silenced = True


def format_version(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


@dataclass(frozen=True)
class LibvirtInfo:
    uri: str
    driver: str
    lib_version: str
    hv_version: str
    hostname: str


# Errors of reaching the daemon (socket, RPC, ssh tunnel, keepalive): worth another attempt. Anything else
# (a bad URI, no such driver, refused authentication) fails the same way every time.
CONNECTION_ERRORS = frozenset(
    {
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_OPERATION_TIMEOUT,
        libvirt.VIR_ERR_INTERNAL_ERROR,
    }
)


def is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, libvirt.libvirtError) and exc.get_error_code() in CONNECTION_ERRORS


def open_connection(uri: str, host: str) -> libvirt.virConnect:
    """Open `uri`, retrying with backoff while the daemon cannot be reached (each retry is recorded)."""
    silence_libvirt_stderr()
    try:
        return retries.retrying(host, f"libvirt connect {uri}", lambda: libvirt.open(uri), is_connection_error)
    except libvirt.libvirtError as exc:
        tried = f" (tried {retries.ATTEMPTS} times)" if is_connection_error(exc) else ""
        raise InfraError(f"{host}: libvirt {uri}: {exc.get_error_message()}{tried}") from None


def probe(uri: str, host: str) -> LibvirtInfo:
    conn = open_connection(uri, host)
    try:
        return LibvirtInfo(
            uri=uri,
            driver=conn.getType(),
            lib_version=format_version(conn.getLibVersion()),
            hv_version=format_version(conn.getVersion()),
            hostname=conn.getHostname(),
        )
    except libvirt.libvirtError as exc:
        raise InfraError(f"{host}: libvirt {uri}: {exc.get_error_message()}") from None
    finally:
        conn.close()
