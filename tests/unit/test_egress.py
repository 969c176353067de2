"""The egress proxy (mljobs.runtime.egress) with real sockets: a Unix socket, a forwarder's tag, a
local HTTP server on 127.0.0.1 standing in for the internet."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import time

import pytest

from mljobs.runtime import egress
from tests.conftest import UpstreamProxy, http_origin


def test_allows_host_patterns_and_ports():
    pats = ["pypi.org", "*.example.com", "10.0.0.5:8080"]
    assert egress.allows(pats, "pypi.org", 443) and egress.allows(pats, "PyPI.org", 80)
    assert egress.allows(pats, "files.example.com", 443) and not egress.allows(pats, "example.com.evil", 443)
    assert egress.allows(pats, "10.0.0.5", 8080) and not egress.allows(pats, "10.0.0.5", 22)
    assert not egress.allows([], "pypi.org", 443)
    assert egress.allows(["[fd00::1]:443"], "fd00::1", 443) and not egress.allows(["[fd00::1]:443"], "f", 443)


@pytest.mark.parametrize("address, on_internet", [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("64:ff9b::808:808", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("169.254.169.254", False), ("::1", False), ("fd00::1", False),
    ("::ffff:127.0.0.1", False), ("64:ff9b::a9fe:a9fe", False), ("2002:7f00:1::1", False),  # IPv4 inside IPv6
    ("::a9fe:a9fe", False), ("64:ff9b:1::a9fe:a9fe", False),  # IPv4-compatible; local-use NAT64
])
def test_an_address_is_global_only_with_the_ipv4_address_it_carries(address, on_internet):
    assert egress._is_global(address) is on_internet


def test_job_env_points_at_the_proxy_and_the_control_plane_inside():
    env = egress.job_env("http://127.0.0.1:4567")
    assert env["HTTPS_PROXY"] == env["http_proxy"] == f"http://127.0.0.1:{egress.PROXY_PORT}"
    assert env["MLJOBS_URL"] == "http://127.0.0.1:4567"
    assert egress.job_env("http://server.example:8000/base")["MLJOBS_URL"] == "http://127.0.0.1:8000/base"
    # a port the forwarder cannot listen on, or TLS: the URL as it is, through the proxy (CONNECT)
    assert "MLJOBS_URL" not in egress.job_env("http://server.example/base")
    assert "MLJOBS_URL" not in egress.job_env("https://mljobs.example.com")


@pytest.fixture
def origin():
    srv = http_origin(lambda h: f"{h.path} {h.headers.get('Connection')}".encode()
                      + (b" posted " + h.posted if hasattr(h, "posted") else b""))
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@contextlib.contextmanager
def _serving(tmp_path, allowed: list[str], control: str, said: list[str], **kw):
    """A started proxy on the test's socket, closed after."""
    proxy = egress.Proxy(str(tmp_path / egress.SOCKET), allowed, control, said.append, **kw)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()


def _through(path: str, tag: bytes, request: bytes, later: bytes = b"") -> bytes:
    """As the forwarder does: hand the proxy one end of a connection (its socket, with the tag of
    the port it came in on), then speak on the other end (``later``: more of the request, sent
    once the proxy has had time to act on what came first)."""
    job, ours = socket.socketpair()
    handoff = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    handoff.connect(path)
    socket.send_fds(handoff, [tag], [job.fileno()])
    handoff.close()
    job.close()
    ours.settimeout(10)
    ours.sendall(request)
    if later:
        time.sleep(0.3)
        ours.sendall(later)
    out = b""
    while data := ours.recv(65536):
        out += data
    ours.close()
    return out


def test_proxy_allows_refuses_and_says_why(tmp_path, origin):
    said: list[str] = []
    control = f"http://127.0.0.1:{origin}"  # the control plane: always allowed, also by its own tag
    proxy = egress.Proxy(str(tmp_path / egress.SOCKET), [], control, said.append)
    proxy.start()
    try:
        # plain HTTP, absolute form: rewritten to origin form, one request a connection
        out = _through(proxy.path, egress.PROXY_TAG,
                       f"GET http://127.0.0.1:{origin}/a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
                       .encode())
        assert out.startswith(b"HTTP/1.0 200") and out.endswith(b"/a?b=1 close")
        out = _through(proxy.path, egress.SERVER_TAG, b"GET /direct HTTP/1.0\r\n\r\n")
        assert out.endswith(b"/direct None")
        out = _through(proxy.path, egress.PROXY_TAG, b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 403") and b"pypi.org:443 is not allowed" in out
        assert said and "create_external_access_integration('NAME', allowed_hosts=['pypi.org'])" in said[-1]
        out = _through(proxy.path, egress.PROXY_TAG, b"GET /relative HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400")
    finally:
        proxy.close()
    assert not (tmp_path / egress.SOCKET).exists()


def test_a_build_proxy_reaches_no_control_plane(tmp_path, origin):
    """An environment build's proxy (no control plane URL): a connection tagged for the control
    plane is read as a proxy request like any other, so the origin on this machine is refused
    (a proxy with a control plane would have piped it straight there)."""
    proxy = egress.Proxy(str(tmp_path / egress.SOCKET), [], "", lambda _: None)
    proxy.start()
    try:
        out = _through(proxy.path, egress.SERVER_TAG,
                       f"GET http://127.0.0.1:{origin}/x HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 403"), out
    finally:
        proxy.close()


def test_connect_tunnels_to_an_allowed_host(tmp_path, origin):
    other = f"127.0.0.1:{origin}"
    proxy = egress.Proxy(str(tmp_path / egress.SOCKET), [other], "http://127.0.0.1:1", lambda _: None)
    proxy.start()
    try:
        out = _through(proxy.path, egress.PROXY_TAG,
                       f"CONNECT {other} HTTP/1.1\r\n\r\nGET /tunnelled HTTP/1.0\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.0 200")
        assert out.endswith(b"/tunnelled None")
    finally:
        proxy.close()


def test_a_name_that_resolves_off_the_internet_needs_its_address_named(tmp_path, origin):
    """An integration allowing a name allows what that name is on the internet: a name resolving to
    a loopback or private address (the server's own network, a cloud's metadata service) is refused
    unless an entry names the address itself."""
    said: list[str] = []
    proxy = egress.Proxy(str(tmp_path / egress.SOCKET), ["localhost", "*"], "http://127.0.0.1:1", said.append)
    proxy.start()
    try:
        for request in (f"CONNECT localhost:{origin} HTTP/1.1\r\n\r\n", f"GET http://localhost:{origin}/x HTTP/1.1\r\n\r\n"):
            out = _through(proxy.path, egress.PROXY_TAG, request.encode())
            assert out.startswith(b"HTTP/1.1 403"), out
            assert re.search(rf"localhost:{origin} resolves to (127\.0\.0\.1|::1), ".encode(), out)
        assert re.search(rf"allowed_hosts=\['(127\.0\.0\.1|::1):{origin}'\]", said[-1]) and "(loopback)" in said[-1]
    finally:
        proxy.close()
    proxy = egress.Proxy(str(tmp_path / egress.SOCKET), [f"127.0.0.1:{origin}", "localhost"], "http://127.0.0.1:1",
                         said.append)
    proxy.start()
    try:  # the address named: the name that resolves to it is served
        out = _through(proxy.path, egress.PROXY_TAG, f"GET http://localhost:{origin}/ok HTTP/1.1\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.0 200") and out.endswith(b"/ok close")
    finally:
        proxy.close()
    assert [egress._names_address(p) for p in ("10.0.0.5", "10.0.*:8080", "[fd00::1]", "*", "pypi.org", "cafe.de")] \
        == [True, True, True, False, False, False]


def test_a_proxy_in_a_folder_too_deep_for_a_socket_address_still_serves(tmp_path, origin):
    """A Unix socket's address holds 108 bytes; a deep MLJOBS_HOME (a test's temporary folder under
    pytest-xdist, say) puts the instance's socket past that. The proxy binds it through a
    descriptor of its folder, and a client connects the same way (the forwarder does)."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / egress.SOCKET)
    assert len(path) > 108
    proxy = egress.Proxy(path, [], f"http://127.0.0.1:{origin}", lambda _: None)
    proxy.start()
    try:
        assert (deep / egress.SOCKET).exists()
        address, fd = egress.socket_address(path)
        try:
            assert len(address) < 100
            out = _through(address, egress.SERVER_TAG, b"GET /deep HTTP/1.0\r\n\r\n")
        finally:
            os.close(fd)
        assert out.endswith(b"/deep None")
    finally:
        proxy.close()
    assert not (deep / egress.SOCKET).exists()


def test_a_server_behind_a_proxy_reaches_allowed_hosts_through_it(tmp_path, origin):
    """The server's own outbound proxy (HTTPS_PROXY and the rest in its environment) carries what
    the integrations allow: a tunnel by CONNECT, plain HTTP in absolute form, with the proxy URL's
    credentials; the name goes to it unresolved (only it may know the name). What no integration
    allows, and an address off the internet that no entry names, never reach it; NO_PROXY's hosts
    are reached directly."""
    up = UpstreamProxy({"origin.test": origin, "127.0.0.1": origin})
    said: list[str] = []
    auth = "Basic " + base64.b64encode(b"svc:p@ss").decode()
    url = f"http://svc:p%40ss@127.0.0.1:{up.port}"
    proxy = egress.Proxy(str(tmp_path / egress.SOCKET), ["origin.test", "nowhere.test"], "http://127.0.0.1:1",
                         said.append, upstream={"http": url, "https": url})
    proxy.start()
    try:
        out = _through(proxy.path, egress.PROXY_TAG,
                       b"GET http://origin.test/a?b=1 HTTP/1.1\r\nHost: origin.test\r\nProxy-Authorization: job\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 200") and out.endswith(b"/a?b=1 close"), out
        out = _through(proxy.path, egress.PROXY_TAG,
                       b"CONNECT origin.test:80 HTTP/1.1\r\n\r\nGET /tunnelled HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.0 200"), out
        assert out.endswith(b"/tunnelled None")
        assert up.seen == [("GET http://origin.test/a?b=1 HTTP/1.1", auth), ("CONNECT origin.test:80 HTTP/1.1", auth)]
        # its refusal is the job's 502, naming it and what it said
        out = _through(proxy.path, egress.PROXY_TAG, b"CONNECT nowhere.test:443 HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 502"), out
        assert f"through the server's proxy 127.0.0.1:{up.port}: it answered 'HTTP/1.1 403 Forbidden'".encode() in out
        # a request whose body comes after its head goes on whole (the answer is not awaited first)
        out = _through(proxy.path, egress.PROXY_TAG,
                       b"POST http://origin.test/post HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 5\r\n\r\n",
                       later=b"hello")
        assert out.startswith(b"HTTP/1.0 200") and out.endswith(b"/post close posted hello"), out
        # plain HTTP: its refusal reaches the job as it answered, and the job's log says whose it was
        out = _through(proxy.path, egress.PROXY_TAG, b"GET http://nowhere.test/p HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 403 Forbidden"), out
        assert said[-1] == (f"egress: nowhere.test:80 through the server's proxy 127.0.0.1:{up.port}: it answered "
                            "'HTTP/1.1 403 Forbidden' (the server's proxy refuses this host)"), said
        # refused here: never sent on
        out = _through(proxy.path, egress.PROXY_TAG, b"CONNECT other.test:443 HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 403") and "other.test:443 is not allowed" in said[-1]
        out = _through(proxy.path, egress.PROXY_TAG, f"GET http://127.0.0.1:{origin}/x HTTP/1.1\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 403") and "not allowed" in said[-1]
        assert len(up.seen) == 5
    finally:
        proxy.close()
    # an address named by an entry, but off the internet, through a proxy: checked here all the same
    try:
        with _serving(tmp_path, ["127.0.0.*"], "", said, upstream={"http": url}) as proxy:
            out = _through(proxy.path, egress.PROXY_TAG, f"GET http://127.0.0.1:{origin}/n HTTP/1.1\r\n\r\n".encode())
            assert out.startswith(b"HTTP/1.0 200"), out  # "127.0.0.*" names addresses: allowed
            assert up.seen[-1][0] == f"GET http://127.0.0.1:{origin}/n HTTP/1.1"
        with _serving(tmp_path, ["*"], "", said, upstream={"http": url}) as proxy:
            out = _through(proxy.path, egress.PROXY_TAG, f"GET http://127.0.0.1:{origin}/m HTTP/1.1\r\n\r\n".encode())
            assert out.startswith(b"HTTP/1.1 403")
            assert f"127.0.0.1:{origin} is an address that is not on the internet (loopback)".encode() in out
        # NO_PROXY: direct; a proxy that is not http://: said so
        seen = len(up.seen)
        with _serving(tmp_path, [f"127.0.0.1:{origin}", "origin.test"], "", said,
                      upstream={"http": url, "https": "socks5://127.0.0.1:1", "no": "localhost,127.0.0.1"}) as proxy:
            out = _through(proxy.path, egress.PROXY_TAG, f"GET http://127.0.0.1:{origin}/d HTTP/1.1\r\n\r\n".encode())
            assert out.startswith(b"HTTP/1.0 200") and out.endswith(b"/d close") and len(up.seen) == seen
            out = _through(proxy.path, egress.PROXY_TAG, b"CONNECT origin.test:443 HTTP/1.1\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 502") and b"socks5://127.0.0.1 is not an http:// proxy" in out
    finally:
        up.close()


def test_the_servers_proxies_are_read_from_its_environment(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.lower().endswith("_proxy"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("NO_PROXY", "localhost")
    assert egress.upstream_proxies() == {}  # NO_PROXY alone: no proxy
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    assert egress.upstream_proxies() == {"https": "http://proxy.corp:3128", "no": "localhost"}
    proxy = egress.Proxy(str(tmp_path / egress.SOCKET), [], "", lambda _: None)  # no upstream given: the environment's
    try:
        assert proxy.upstream == {"https": "http://proxy.corp:3128", "no": "localhost"}
    finally:
        proxy.close()


def test_a_request_head_is_checked_whole_and_what_goes_on_is_rebuilt(tmp_path, origin):
    """A bare LF, a control character, a folded line or a second request in a head is refused
    (400) before anything is sent on: through the server's own proxy, such a head would carry a
    second request to a host no integration allows, with the server's credentials. Numeric forms
    of an address (127.1) are addresses, checked as such."""
    up = UpstreamProxy({"allowed.example": origin, "evil.example": origin})
    said: list[str] = []
    proxy = egress.Proxy(str(tmp_path / egress.SOCKET), ["allowed.example", "*.allowed.example", "*"], "",
                         said.append, upstream={"http": up.url, "https": up.url})
    proxy.start()
    try:
        for head in (b"GET http://allowed.example/ HTTP/1.1\nHost: a\n\nGET http://evil.example/ HTTP/1.1\r\n\r\n",
                     b"GET http://allowed.example/ HTTP/1.1\r\nX: a\nProxy-Authorization: Basic job\r\n\r\n",
                     b"GET http://allowed.example/ HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
                     b"GET http://allowed.example/ HTTP/1.1\rX\r\n\r\n",
                     b"GET\x00 http://allowed.example/ HTTP/1.1\r\n\r\n",
                     b"CONNECT evil.example/.allowed.example:443 HTTP/1.1\r\n\r\n",
                     b"GET http://evil.example\\@allowed.example/ HTTP/1.1\r\n\r\n"):
            out = _through(proxy.path, egress.PROXY_TAG, head)
            assert out.startswith(b"HTTP/1.1 400"), (head, out)
        assert up.seen == []  # nothing went on
        # the target is rebuilt from what was checked: the default port, the path and the query
        out = _through(proxy.path, egress.PROXY_TAG, b"GET http://allowed.example:80/p?q=1 HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 200") and up.seen[-1][0] == "GET http://allowed.example:80/p?q=1 HTTP/1.1"
        for numeric in ("127.1", "2130706433", "0x7f.0.0.1"):  # 127.0.0.1 to a resolver
            out = _through(proxy.path, egress.PROXY_TAG, f"CONNECT {numeric}:80 HTTP/1.1\r\n\r\n".encode())
            assert out.startswith(b"HTTP/1.1 403") and b"not on the internet (loopback)" in out, (numeric, out)
        assert len(up.seen) == 1
    finally:
        proxy.close()
    # a server proxy whose URL names no valid port: the job is told, not left hanging
    proxy = egress.Proxy(str(tmp_path / egress.SOCKET), ["*"], "", said.append, upstream={"https": "http://p:abc"})
    proxy.start()
    try:
        out = _through(proxy.path, egress.PROXY_TAG, b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 502") and b"names no valid port" in out, out
    finally:
        proxy.close()
        up.close()


def test_a_proxy_that_could_not_start_answers_every_connection_with_why(tmp_path):
    """A multi-node instance's proxy first leaves the job's network namespace; where it cannot,
    each of the job's connections is answered 502 with the reason (not left hanging), and the
    job's log says it once."""
    said: list[str] = []

    def fails() -> None:
        raise OSError(1, "setns: Operation not permitted")

    proxy = egress.Proxy(str(tmp_path / egress.SOCKET), ["*"], "", said.append, in_thread=fails)
    proxy.start()
    try:
        for _ in range(2):
            out = _through(proxy.path, egress.PROXY_TAG, b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 502") and b"Operation not permitted" in out, out
        assert said == ["the job's egress proxy could not start, so it reaches nothing outside: "
                        "[Errno 1] setns: Operation not permitted"]
    finally:
        proxy.close()
