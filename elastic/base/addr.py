"""This host's address: one value for the member record, the store, gloo and NCCL.

An explicit ``--host`` wins; otherwise the local address of the route to etcd
(the address other hosts that reach the same etcd most likely reach this one
at). Without it gloo binds whatever the host name resolves to, often
127.0.0.1, and a second host's connect is refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class HostAddress:
    """An IP address of this machine and the interface that owns it."""

    ip: str
    interface: str

    def __post_init__(self) -> None:
        try:
            canonical = str(ipaddress.ip_address(self.ip))
        except ValueError as exc:
            raise ConfigError(f"host address {self.ip!r} is not an IP address") from exc
        if canonical != self.ip:
            raise ConfigError(f"host address {self.ip!r} is not in canonical form ({canonical})")
        if not self.interface:
            raise ConfigError(f"host address {self.ip}: no interface given")

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.ip else socket.AF_INET

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.ip)

    def hostport(self, port: int) -> str:
        return join_hostport(self.ip, port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def join_hostport(host: str, port: int) -> str:
    """``host:port`` with an IPv6 address in brackets (``[::1]:29500``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_hostport(text: str) -> tuple[str, int]:
    """The inverse of :func:`join_hostport`; brackets are removed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"malformed address {text!r}; expected host:port or [v6]:port")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConfigError(f"malformed address {text!r}: unbalanced '['")
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"malformed address {text!r}: put an IPv6 address in brackets")
    return host, int(port)


# -- the machine's addresses (getifaddrs(3), so no `ip` binary is needed) --------


class _SockAddr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_ubyte * 26)]


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [
    ("next", ctypes.POINTER(_IfAddrs)),
    ("name", ctypes.c_char_p),
    ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_SockAddr)),
    ("netmask", ctypes.POINTER(_SockAddr)),
    ("ifu", ctypes.c_void_p),
    ("data", ctypes.c_void_p),
]


def local_addresses() -> list[tuple[str, str]]:
    """``(interface, ip)`` for every IPv4/IPv6 address of this machine."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs failed")
    found = []
    try:
        node = head
        while node:
            entry = node.contents
            if entry.addr:
                sa = entry.addr.contents
                raw = bytes(sa.data)
                # sockaddr_in: port(2) addr(4); sockaddr_in6: port(2) flow(4) addr(16)
                if sa.family == socket.AF_INET:
                    found.append((entry.name.decode(), socket.inet_ntop(sa.family, raw[2:6])))
                elif sa.family == socket.AF_INET6:
                    found.append((entry.name.decode(), socket.inet_ntop(sa.family, raw[6:22])))
            node = entry.next
    finally:
        libc.freeifaddrs(head)
    return found


def _describe(addresses: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{ip} ({name})" for name, ip in addresses) or "none"


def _resolve(host: str, what: str) -> str:
    """An IP address for ``host`` (a name is looked up; the first answer wins)."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # UnicodeError: not a host name at all
        why = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"{what} {host!r} does not resolve: {why}") from exc
    return str(ipaddress.ip_address(infos[0][4][0]))


def local_address(host: str, what: str = "--host") -> HostAddress:
    """``host`` (an address or a name) as an address of this machine, or a clear error."""
    ip = _resolve(host, what)
    addresses = local_addresses()
    owners = [name for name, addr in addresses if addr == ip]
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        # The bind test is the authority (an address may be local without being
        # on an interface listed here, e.g. a whole loopback /8).
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
    except OSError as exc:
        shown = host if ip == host else f"{host} ({ip})"
        raise ConfigError(
            f"{what} {shown} is not an address of this machine; its addresses: "
            f"{_describe(addresses)}"
        ) from exc
    if not owners and is_loopback(ip):
        owners = [name for name, addr in addresses if is_loopback(addr)]
    if not owners:
        raise ConfigError(
            f"{what} {ip} is not on any interface of this machine; its addresses: "
            f"{_describe(addresses)}"
        )
    return HostAddress(ip, owners[0])


def route_address(host: str, port: int, timeout: float = 5.0) -> str:
    """The local address this machine uses to reach ``host:port``.

    A UDP ``connect()`` only asks the kernel for a route: no packet is sent.
    """
    ip = _resolve(host, "etcd endpoint")
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((ip, port))
        except OSError as exc:
            raise ConfigError(
                f"no route from this machine to etcd at {join_hostport(ip, port)}: {exc.strerror}"
            ) from exc
        return str(ipaddress.ip_address(s.getsockname()[0].split("%")[0]))


def this_host(explicit: str | None, etcd_endpoints: Iterable[tuple[str, int]]) -> HostAddress:
    """``--host`` if given, else the local address of the route to the first etcd endpoint."""
    if explicit:
        return local_address(explicit)
    endpoints = list(etcd_endpoints)
    if not endpoints:
        raise ConfigError("cannot choose this host's address: no etcd endpoint and no --host")
    host, port = endpoints[0]
    return local_address(route_address(host, port), what="the address of the route to etcd")


def mixed_hosts(own: str, others: Iterable[tuple[str, str]]) -> str | None:
    """Why ``own`` and the other members cannot form one job, or None if they can.

    ``others``: ``(member id, address)``. A loopback address is reachable only
    from its own host, so a job mixing it with members elsewhere cannot form.
    """
    for member, address in others:
        if not address or is_loopback(address) == is_loopback(own):
            continue
        if is_loopback(own):
            return (
                f"this host's address {own} is loopback, but member {member} is on "
                f"another host ({address}) and cannot reach it; pass --host with an "
                "address the other hosts reach, or leave --host out to use the route "
                "to etcd"
            )
        return (
            f"member {member} advertises the loopback address {address}, which this "
            f"host ({own}) cannot reach; that member must be restarted with a --host "
            "the other hosts reach"
        )
    return None
