"""What a sandboxed job reaches on the network: only the hosts its external access integrations allow.

A shared sandbox has a network namespace of its own (bubblewrap's ``--unshare-net``: loopback
only). Its one way out is a Unix socket, bound read-only into the sandbox, on which the instance's
supervisor (outside) runs :class:`Proxy`. Inside, :func:`serve_forwarder` (a process the sandbox's
entry forks before the payload) listens on ``127.0.0.1:3128``, the HTTP proxy the job's
``HTTP_PROXY``/``HTTPS_PROXY`` name, and on the control plane's port, and hands each connection's
socket to the proxy (SCM_RIGHTS) with a tag saying which port it came in on; the proxy serves it
directly, copying each way with one buffer.

The proxy speaks HTTP CONNECT (``https://``, and any TCP a client tunnels) and plain HTTP
(absolute-form requests, one a connection). It allows a ``host:port`` when one of the job's
integrations names it: ``pypi.org`` (any port), ``*.example.com`` (wildcards, as for installs),
``10.0.0.5:8080`` (that port only); the control plane is always allowed. A name reaches only
addresses on the internet: one that resolves to a loopback, private or link-local address needs an
entry naming that address. A refusal answers 403 and writes a system line into the job's log
naming the host and how to allow it.

Where the server itself reaches the internet through a proxy (``HTTPS_PROXY``, ``HTTP_PROXY``,
``ALL_PROXY`` and ``NO_PROXY`` in its environment, as urllib reads them), an allowed connection
goes on through that proxy (:func:`upstream_proxies`): CONNECT for a tunnel, the absolute-form
request for plain HTTP, with the proxy URL's credentials, which stay outside the sandbox. The name
is then resolved by that proxy, not here (networks behind one often resolve no outside name); an
address a job names is still checked as above. The control plane is always reached directly.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import os
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

__all__ = ["PROXY_PORT", "allows", "with_addresses", "Proxy", "listeners", "serve_forwarder", "job_env",
           "upstream_proxies"]

PROXY_PORT = 3128  # inside the sandbox: the job's HTTP(S) proxy
SOCKET = "egress.sock"  # in the folder bound at the sandbox's job/net
SERVER_TAG, PROXY_TAG = b"server\n", b"proxy\n"
_HEAD_LIMIT = 64 * 1024
_CHUNK = 1 << 18  # what one copy moves at most (256 KiB)
_SEND_BUFFER = 4 << 20  # SO_SNDBUF of the job's side
_MAX_CONNECTIONS = 256  # open at once through one instance's proxy
_HOST_PORT = re.compile(r"^(?P<host>.+):(?P<port>\d+)$")
# what a request head may hold (RFC 9110/9112): anything else is refused, so what goes on (to a host,
# or to the server's own proxy) is exactly what was checked, and no second request rides along
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_VERSION = re.compile(r"^HTTP/1\.[01]$")
_FIELD_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\xff]*$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?)*\.?$")


def allows(patterns: list[str], host: str, port: int) -> bool:
    """Whether an integration's ``allowed_hosts`` entry admits ``host:port``."""
    host = host.lower().strip("[]")
    for pat in patterns:
        m = _HOST_PORT.match(pat)
        name, want = (m["host"], int(m["port"])) if m else (pat, None)
        name = name.lower().strip("[]")  # "[fd00::1]:443": an address, not an fnmatch character class
        if fnmatch.fnmatch(host, name) and (want is None or want == port):
            return True
    return False


class _Internal(Exception):
    """An allowed name that resolves to an address off the internet."""


def _names_address(pattern: str) -> bool:
    """Whether an ``allowed_hosts`` entry names addresses (``10.0.0.5``, ``10.0.*:8080``, ``[fd00::1]``)
    rather than names: only such an entry admits an address that is not global."""
    m = _HOST_PORT.match(pattern)
    host = (m["host"] if m else pattern).strip("[]")
    return any(c.isdigit() for c in host) and all(c in "0123456789abcdefABCDEF.:*" for c in host)


def with_addresses(entries: list[str]) -> list[str]:
    """``host:port`` entries and, for each that names a host, entries naming the addresses it
    resolves to now: an admin's own index (a mirror on ``localhost`` or ``10.0.0.5``) is reached
    even where its name resolves off the internet, which a name alone never allows."""
    out = list(entries)
    for entry in entries:
        m = _HOST_PORT.match(entry)
        if not m or _names_address(entry):
            continue
        try:
            infos = socket.getaddrinfo(m["host"], int(m["port"]), type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            continue
        for *_, sockaddr in infos:
            address = str(sockaddr[0])
            named = f"[{address}]:{m['port']}" if ":" in address else f"{address}:{m['port']}"
            if named not in out:
                out.append(named)
    return out


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a site's own translator


def _is_global(address: str) -> bool:
    """Whether an address is on the internet, the IPv4 address inside an IPv6 one included
    (``::ffff:127.0.0.1``, IPv4-compatible ``::7f00:1``, 6to4, Teredo, NAT64: each reaches an IPv4
    address that must be global too; a local-use NAT64 address never is)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return False
        inner = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if ip in _NAT64 or int(ip) >> 32 == 0:
            inner.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return all(v is None or v.is_global for v in inner)
    return True


def _bad_head(method: str, target: str, version: str, fields: list[str]) -> str | None:
    """Why a request head is refused (None: it is well formed): a method that is not a token, a
    version other than HTTP/1.0 or 1.1, a control character (a bare CR or LF among them) in the
    target or a field, a folded line, or a field name that is not a token."""
    if not _TOKEN.match(method):
        return f"the request's method {method!r} is not an HTTP method"
    if not _VERSION.match(version):
        return f"the request's version {version!r} is not HTTP/1.0 or HTTP/1.1"
    if not target or any(c <= " " or c == "\x7f" for c in target):
        return "the request's target holds a space or a control character"
    for field in fields:
        name, colon, value = field.partition(":")
        if not colon or not _TOKEN.match(name):
            return f"a request header is not 'name: value': {field[:80]!r}"
        if not _FIELD_VALUE.match(value):
            return f"the request header {name} holds a control character"
    return None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an address, or None for a name; the IPv4 forms the C library reads too
    (``127.1``, ``2130706433``, ``0x7f.0.0.1``), which a resolver would turn into the address."""
    try:
        return ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def _internal_why(host: str, port: int, address: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Why a connection to ``host`` (at ``address``, not on the internet) is refused, and how to allow it."""
    what = f"{host}:{port} resolves to {address}, an address" if host != address else f"{host}:{port} is an address"
    named = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return (f"egress refused: {what} that is not on the internet ({_kind(ip)}); an integration reaches "
            f"it only by naming the address: create_external_access_integration('NAME', allowed_hosts=['{named}']) "
            "(an admin) and submit with external_access_integrations=['NAME']")


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    for attr in ("is_loopback", "is_link_local", "is_private", "is_multicast", "is_unspecified", "is_reserved"):
        if getattr(ip, attr):
            return attr[3:].replace("_", "-")
    return "not global"


def job_env(control_url: str) -> dict[str, str]:
    """The variables that send the job's traffic through its proxy, and its control plane URL as
    seen inside: for ``http://`` on a port the forwarder can listen on, that port of the sandbox's
    own loopback; else the URL as it is, which the job reaches through the proxy (CONNECT for
    ``https://``: TLS end to end)."""
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    env = {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
           "ALL_PROXY": proxy, "all_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
    port = _forwarded_port(control_url)
    if port is not None:
        parts = urlsplit(control_url)
        env["MLJOBS_URL"] = f"http://127.0.0.1:{port}{parts.path}"
    return env


def upstream_proxies() -> dict[str, str]:
    """This process's own outbound proxies (``{"https": URL, "http": URL, "all": URL, "no": LIST}``,
    from its environment, as urllib reads them); {} where none is set (urllib is imported only then:
    it costs a supervisor ~15 ms)."""
    if not any(v and k.lower().endswith("_proxy") and k.lower() != "no_proxy" for k, v in os.environ.items()):
        return {}
    from urllib.request import getproxies_environment

    return getproxies_environment()


class _Refused(Exception):
    """The server's own proxy would not (or could not) take a connection: answered 502 with this text."""


def _forwarded_port(control_url: str) -> int | None:
    """The control plane's port the forwarder listens on inside (plain HTTP, unprivileged ports)."""
    parts = urlsplit(control_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return port if parts.scheme == "http" and 1024 <= port != PROXY_PORT else None


def _copy(src: socket.socket, dst: socket.socket, first: Callable[[bytes], None] | None = None) -> None:
    """One way until EOF, then half-close ``dst``: ``recv_into`` one buffer and ``sendall`` it
    (``first`` sees the first chunk as it goes by). Measured against ``splice`` through a pipe
    (bench/egress.py, docs/isolation.md): 0.69-0.71x of a direct download against 0.49x at
    loopback speed, where each byte crosses two TCP connections instead of one."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    try:
        if first is not None and (n := src.recv_into(buf)):
            try:
                first(bytes(view[:n]))
            except Exception:  # noqa: BLE001 - a note about the bytes must never stop them
                pass
            dst.sendall(view[:n])
        while n := src.recv_into(buf):
            dst.sendall(view[:n])
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _pump(a: socket.socket, b: socket.socket, answer: Callable[[bytes], None] | None = None) -> None:
    """Copy both ways until both sides are done, then close both. ``a`` is the job's socket, on
    its sandbox's loopback: a send buffer of :data:`_SEND_BUFFER` there means fewer wake-ups (the
    upstream socket keeps the kernel's autotuning, which a fixed size would turn off).
    ``answer`` sees the first bytes from ``b``."""
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
    except OSError:
        pass
    t = threading.Thread(target=_copy, args=(b, a, answer), daemon=True)
    t.start()
    _copy(a, b)
    t.join()
    a.close()
    b.close()


def socket_address(path: str) -> tuple[str, int | None]:
    """An address for the Unix socket at ``path`` that fits ``sun_path`` (108 bytes): the path
    itself, or, when its folder's path is longer (a deep MLJOBS_HOME, a test's temporary folder),
    the same file through an open descriptor of that folder (``/proc/self/fd/N/name``). Returns
    the address and the descriptor to close once bound or no longer needed (None: nothing)."""
    if len(os.fsencode(path)) < 100:
        return path, None
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{os.path.basename(path)}", fd


class Proxy:
    """The supervisor's end: a Unix socket whose connections go where the job may go."""

    def __init__(self, path: str, allowed: list[str], control_url: str, log: Callable[[str], None],
                 upstream: dict[str, str] | None = None, in_thread: Callable[[], None] | None = None) -> None:
        self.path, self.allowed, self.log = path, list(allowed), log
        # called first in the serving thread, whose connections' threads inherit what it does: a
        # multi-node instance's supervisor, inside the job's network namespace, moves it back to the
        # machine's there, so that what the job may reach is reached from outside its namespace
        self.in_thread = in_thread
        self.broken: str | None = None  # why it serves nothing (each connection is answered 502 with it)
        # the server's own outbound proxies (None: read from this process's environment)
        self.upstream = upstream_proxies() if upstream is None else dict(upstream)
        parts = urlsplit(control_url)  # "": none (an environment build's proxy reaches no control plane)
        self.control: tuple[str, int] | None = (
            (parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)) if control_url
            else None)
        self.refused: list[str] = []
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address, fd = socket_address(path)
        try:
            self.sock.bind(address)
        finally:
            if fd is not None:
                os.close(fd)
        os.chmod(path, 0o666)  # the job's uid connects
        self.sock.listen(64)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()  # the sockets of connections being served
        self._threads: list[threading.Thread] = []
        self.closed = False
        self._slots = threading.BoundedSemaphore(_MAX_CONNECTIONS)

    def start(self) -> None:
        """Serve in a thread (after the supervisor's fork: the payload process gets no thread)."""
        self._thread = threading.Thread(target=self._serve, name="egress-proxy", daemon=True)
        self._thread.start()

    def close(self, wait_s: float = 0.0) -> None:
        """Stop serving; end the connections still open; wait up to ``wait_s`` for the threads
        (before a fork: an environment build's proxy, whose supervisor forks the payload next)."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        with self._lock:
            live, threads = list(self._live), list(self._threads)
        for s in live:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        for t in [*threads, *([self._thread] if self._thread is not None else [])]:
            if wait_s > 0:
                t.join(max(0.0, deadline - time.monotonic()))

    def _pump(self, job: socket.socket, up: socket.socket, answer: Callable[[bytes], None] | None = None) -> None:
        """:func:`_pump`, with both sockets known to :meth:`close` meanwhile."""
        with self._lock:
            if self.closed:
                job.close()
                up.close()
                return
            self._live.update((job, up))
        try:
            _pump(job, up, answer)
        finally:
            with self._lock:
                self._live.difference_update((job, up))

    def _serve(self) -> None:
        if self.in_thread is not None:
            try:
                self.in_thread()
            except Exception as e:  # noqa: BLE001 - each of the job's connections is then told why
                self.broken = f"the job's egress proxy could not start, so it reaches nothing outside: {e}"
                self.log(self.broken)
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self.closed:
                    return
                time.sleep(0.05)  # out of descriptors, say: a moment, then on
                continue
            if not self._slots.acquire(blocking=False):  # a job's own connections, not the supervisor's
                conn.close()
                continue
            t = threading.Thread(target=self._handle_slot, args=(conn,), daemon=True)
            with self._lock:
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _handle_slot(self, conn: socket.socket) -> None:
        try:
            self._handle(conn)
        finally:
            self._slots.release()

    def _handle(self, conn: socket.socket) -> None:
        """One connection of the job's: the forwarder passes its socket (SCM_RIGHTS) with the tag
        of the port it came in on, so the bytes go job <-> proxy <-> host with no hop between."""
        try:
            conn.settimeout(10)
            tag, fds, _, _ = socket.recv_fds(conn, 64, 1)
        except OSError:
            conn.close()
            return
        conn.close()
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            return
        try:  # whatever the job passed must be a stream socket
            job = socket.socket(fileno=fds[0])
        except OSError:
            os.close(fds[0])
            return
        if job.type != socket.SOCK_STREAM:
            job.close()
            return
        if self.broken is not None:  # its request read first (an answer to an unread one is a reset)
            try:
                job.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < _HEAD_LIMIT and (data := job.recv(65536)):
                    head += data
            except OSError:
                pass
            return self._answer(job, 502, self.broken)
        try:
            job.settimeout(30)  # for its request head; the copy after it waits as long as it takes
            if tag == SERVER_TAG and self.control is not None:
                job.settimeout(None)
                self._pump(job, self._connect(*self.control))
            else:
                self._proxy(job, b"")
        except Exception:  # noqa: BLE001 - a bad request ends its connection, never the proxy
            job.close()

    @staticmethod
    def _connect(host: str, port: int) -> socket.socket:
        up = socket.create_connection((host, port), timeout=30)
        up.settimeout(None)
        return up

    def _proxy(self, conn: socket.socket, buf: bytes) -> None:
        while b"\r\n\r\n" not in buf:
            if len(buf) > _HEAD_LIMIT:
                return self._answer(conn, 431, "request head too large")
            data = conn.recv(65536)
            if not data:
                conn.close()
                return None
            buf += data
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            return self._answer(conn, 400, "not an HTTP proxy request")
        bad = _bad_head(method, target, version, lines[1:])
        if bad:
            return self._answer(conn, 400, bad)
        if method.upper() == "CONNECT":
            m = _HOST_PORT.match(target)
            if not m:
                return self._answer(conn, 400, f"CONNECT needs host:port, got {target!r}")
            host, port = m["host"].strip("[]"), int(m["port"])
        else:
            try:
                parts = urlsplit(target)
                host, port = parts.hostname or "", parts.port or 80
            except ValueError:
                host, port, parts = "", 0, None
            if parts is None or parts.scheme != "http" or not host or parts.username is not None:
                return self._answer(conn, 400, f"a proxy request names an absolute http:// URL, got {target!r}")
            # what goes on is built from what was checked (never the target as the job wrote it)
            name = f"[{host}]" if ":" in host else host
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            target = f"http://{name}:{port}{path}" if parts.port else f"http://{name}{path}"
        if not (_HOSTNAME.match(host) or _address(host) is not None):
            return self._answer(conn, 400, f"{host!r} is neither a host name nor an address")
        if not self._may(host, port):
            return self._refuse(conn, host, port)
        connect = method.upper() == "CONNECT"
        try:
            via = None if self._is_control(host, port) else self._upstream(host, connect)
        except _Refused as e:
            return self._answer(conn, 502, f"{host}:{port} could not be reached: {e}")
        if self.control is not None and self._is_control(host, port):
            dest: tuple[str, int] = self.control
        elif via is not None:  # the server's proxy resolves a name; an address is checked here
            dest = via[0]
            ip = _address(host)
            if ip is not None and not self._reaches(str(ip), port):
                return self._refuse(conn, host, port, _internal_why(host, port, str(ip), ip))
        else:
            try:
                dest = (self._resolve(host, port), port)
            except _Internal as e:
                return self._refuse(conn, host, port, str(e))
            except (OSError, UnicodeError) as e:
                return self._answer(conn, 502, f"{host}:{port} could not be reached: {e}")
        try:
            up = self._connect(*dest)
        except (OSError, UnicodeError) as e:
            where = f" through the server's proxy {dest[0]}:{dest[1]}" if via is not None else ""
            return self._answer(conn, 502, f"{host}:{port} could not be reached{where}: {e}")
        try:
            conn.settimeout(None)
            if connect:
                extra = b""
                if via is not None:
                    try:
                        extra = self._tunnel(up, host, port, via[1])
                    except (OSError, _Refused) as e:
                        why = (f"egress: {host}:{port} could not be reached through the server's proxy "
                               f"{dest[0]}:{dest[1]}: {e}")
                        self.log(why)
                        up.close()
                        return self._answer(conn, 502, why)
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if extra:
                    conn.sendall(extra)
                if body:
                    up.sendall(body)
            else:  # one request a connection (a kept-alive proxy connection could change host)
                kept = [ln for ln in lines[1:] if not ln.lower().startswith(("proxy-", "connection:", "keep-alive:"))]
                if via is not None:  # the server's proxy takes the absolute form, with its credentials
                    first, kept = f"{method} {target} {version}", kept + via[1]
                else:  # origin form, to the host itself
                    first = f"{method} {path} {version}"
                up.sendall("\r\n".join([first, *kept, "Connection: close", "", ""]).encode("latin-1") + body)
        except OSError:
            up.close()
            conn.close()
            return None
        refused = None
        if via is not None and not connect:  # a refusal of the server's proxy is said in the job's log, as ours are
            refused = functools.partial(self._said_no, host=host, port=port, proxy=dest)
        self._pump(conn, up, refused)
        return None

    def _said_no(self, data: bytes, host: str, port: int, proxy: tuple[str, int]) -> None:
        """Log the server's proxy's refusal (403, 407) of plain HTTP, from its answer's first
        bytes as they pass to the job, with what to change (a refused tunnel: :meth:`_tunnel`)."""
        status = data.split(b"\r\n", 1)[0].decode("latin-1")
        code = status.split(" ")[1:2]
        if code in (["403"], ["407"]):
            fix = ("the server's proxy wants credentials: put them in the server's HTTP_PROXY URL"
                   if code == ["407"] else "the server's proxy refuses this host")
            self.log(f"egress: {host}:{port} through the server's proxy {proxy[0]}:{proxy[1]}: it answered "
                     f"{status!r} ({fix})")

    def _upstream(self, host: str, connect: bool) -> tuple[tuple[str, int], list[str]] | None:
        """The server's own proxy for ``host`` (its address, and the headers that carry its
        credentials), or None: no proxy set, or ``host`` is in its NO_PROXY. Raises _Refused for a
        proxy that is not ``http://``."""
        url = self.upstream.get("https" if connect else "http") or self.upstream.get("all")
        if not url:
            return None
        from urllib.request import proxy_bypass_environment

        if proxy_bypass_environment(host, self.upstream):
            return None
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise _Refused(f"the server's proxy {parts.scheme}://{parts.hostname or ''} is not an http:// proxy, the "
                           "only kind mljobs' egress proxy goes through; set HTTPS_PROXY to an http:// URL")
        try:
            port = parts.port or 80
        except ValueError:
            raise _Refused(f"the server's proxy URL names no valid port ({parts.hostname}:{parts.netloc.rpartition(':')[2]}"
                           "); fix HTTPS_PROXY/HTTP_PROXY in the server's environment") from None
        auth = []
        if parts.username is not None:
            import base64

            cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            auth.append(f"Proxy-Authorization: Basic {base64.b64encode(cred).decode()}")
        return (parts.hostname, port), auth

    @staticmethod
    def _tunnel(up: socket.socket, host: str, port: int, headers: list[str]) -> bytes:
        """Ask the server's proxy (connected as ``up``) for a tunnel to ``host:port``; returns
        what it sent after its answer's head (the host's first bytes). Raises _Refused with its
        answer when it says no."""
        name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        up.settimeout(30)
        up.sendall("\r\n".join([f"CONNECT {name} HTTP/1.1", f"Host: {name}", *headers, "", ""]).encode("latin-1"))
        buf = b""
        while b"\r\n\r\n" not in buf:
            if len(buf) > _HEAD_LIMIT:
                raise _Refused("its answer's head is too large")
            data = up.recv(65536)
            if not data:
                raise _Refused("it closed the connection without an answer")
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if status.split(" ")[1:2] != ["200"]:
            raise _Refused(f"it answered {status!r}")
        up.settimeout(None)
        return rest

    def _is_control(self, host: str, port: int) -> bool:
        return self.control is not None and port == self.control[1] and host in (
            self.control[0], "127.0.0.1", "localhost")

    def _may(self, host: str, port: int) -> bool:
        return self._is_control(host, port) or allows(self.allowed, host, port)

    def _resolve(self, host: str, port: int) -> str:
        """The address to connect to for an allowed ``host``: resolved here, once (the connection
        goes to the address that was checked, so a name cannot change its answer in between). A
        name that resolves to an address that is not global (loopback, private, link-local: the
        server's own network, a cloud's metadata service) is refused unless an integration names
        that address itself: allowing a name allows what it is on the internet, not whatever the
        name's owner points it at."""
        addresses = list(dict.fromkeys(str(i[4][0]) for i in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
        if not addresses:
            raise OSError(f"{host} has no address")
        for address in addresses:
            if self._reaches(address, port):
                return address
        address = addresses[0]
        raise _Internal(_internal_why(host, port, address, ipaddress.ip_address(address.split("%")[0])))

    def _reaches(self, address: str, port: int) -> bool:
        """Whether a connection may go to ``address``: one on the internet, or one an entry names."""
        return _is_global(address) or allows([p for p in self.allowed if _names_address(p)], address, port)

    def _refuse(self, conn: socket.socket, host: str, port: int, why: str | None = None) -> None:
        why = why or (f"egress refused: {host}:{port} is not allowed by the job's external access integrations; "
                      f"to allow it, create_external_access_integration('NAME', allowed_hosts=['{host}']) "
                      "(an admin) and submit with external_access_integrations=['NAME']")
        self.refused.append(f"{host}:{port}")
        self.log(why)
        self._answer(conn, 403, why)

    @staticmethod
    def _answer(conn: socket.socket, code: int, text: str) -> None:
        body = (text + "\n").encode()
        reason = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large",
                  502: "Bad Gateway"}[code]
        try:
            conn.sendall(f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
        except OSError:
            pass
        conn.close()


def listeners(control_url: str) -> list[tuple[socket.socket, bytes]]:
    """Inside the sandbox, before the payload starts: the proxy port and the control plane's port
    on the sandbox's loopback, each with the tag its connections carry."""
    out = []
    control = _forwarded_port(control_url)
    for port, tag in ((PROXY_PORT, PROXY_TAG), *(((control, SERVER_TAG),) if control is not None else ())):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        out.append((s, tag))
    return out


def serve_forwarder(socks: list[tuple[socket.socket, bytes]], path: str) -> None:
    """Inside the sandbox (a process of its own): hand each connection's socket to the
    supervisor's proxy (SCM_RIGHTS over its Unix socket), with the tag of the port it came in on."""
    sel = selectors.DefaultSelector()
    for s, tag in socks:
        sel.register(s, selectors.EVENT_READ, tag)
    path, _ = socket_address(path)  # its folder stays open for the forwarder's life
    while True:
        for key, _ in sel.select():
            try:
                conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
            except OSError:
                continue
            out = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                out.connect(path)
                socket.send_fds(out, [key.data], [conn.fileno()])
            except OSError:
                pass  # the supervisor is gone: the job's connection just closes
            finally:
                out.close()
                conn.close()
