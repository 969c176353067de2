"""A Session says what the server answered: an error status is an error, never data."""

from __future__ import annotations

import http.server
import threading

import pytest

from mljobs import errors
from mljobs.client.session import Session


class _Failing(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = b'{"error": "ServerUnavailableError", "message": "the store is locked"}'
        self.send_response(503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_server_info_raises_on_an_error_status_and_on_no_answer():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        s = Session(url=url)
        with pytest.raises(errors.MLJobsError, match="the store is locked"):
            s.server_info()
        with pytest.raises(errors.MLJobsError, match="the store is locked"):
            s.features()  # not an empty set taken as an old server's
        s.close()
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(errors.ServerUnavailableError, match="no mljobs server answers"):
        Session(url=url).server_info()


class _Healthy(_Failing):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path != "/health":
            return super().do_GET()
        body = b'{"version": "x", "features": ["f"]}'
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_server_info_follows_an_embedded_server_started_again_on_another_port(monkeypatch, tmp_path):
    """The embedded server went away (its port answers nothing): the session starts it again and
    asks /health where it now answers, not at the old URL."""
    import socket

    from mljobs.client import session as session_module

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: a connect is refused
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    urls = iter([f"http://127.0.0.1:{dead.getsockname()[1]}", f"http://127.0.0.1:{srv.server_address[1]}"])
    monkeypatch.delenv("MLJOBS_URL", raising=False)
    monkeypatch.setattr(session_module, "ensure_server", lambda home: next(urls))
    try:
        s = Session(home=tmp_path)
        assert s.server_info() == {"version": "x", "features": ["f"]}
        assert s.url == f"http://127.0.0.1:{srv.server_address[1]}"
        s.close()
    finally:
        srv.shutdown()
        srv.server_close()
        dead.close()
