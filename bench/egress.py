"""A download through a shared sandbox's egress proxy against the same download direct, in one run.

A local HTTP server on 127.0.0.1 stands in for the internet and serves --mb MB. Two servers, both
with shared sandboxes (MLJOBS_ISOLATION=shared): one filters egress (the default: the job's only
way out is its supervisor's proxy, which an integration naming the host lets through), one has
MLJOBS_EGRESS=open (the job connects directly). A job on each downloads the body with urllib,
timing it inside the job; the halves alternate (ABAB). Prints both medians and the ratio.

    .venv/bin/python bench/egress.py [--mb 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.server
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def origin(size: int) -> http.server.ThreadingHTTPServer:
    chunk = b"\0" * (1 << 20)

    class Body(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            left = size
            while left:
                n = min(left, len(chunk))
                self.wfile.write(chunk[:n])
                left -= n

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Body)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def download(url: str) -> tuple[float, int, str]:
    """Inside the job: seconds for the whole body, its size, and the proxy it went through."""
    import os
    import time
    import urllib.request

    t = time.perf_counter()
    n = 0
    with urllib.request.urlopen(url, timeout=300) as r:
        while data := r.read(1 << 20):
            n += len(data)
    return time.perf_counter() - t, n, os.environ.get("HTTP_PROXY", "direct")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from conftest import ServerProc

    import mljobs

    net = origin(a.mb << 20)
    url = f"http://127.0.0.1:{net.server_address[1]}/body"
    servers = {}
    for label, egress in (("through the proxy", "integrations"), ("direct (MLJOBS_EGRESS=open)", "open")):
        srv = ServerProc(Path(tempfile.mkdtemp(prefix="mljobs-bench-egress-")),
                         extra_env={"MLJOBS_ISOLATION": "shared", "MLJOBS_EGRESS": egress})
        srv.start()
        servers[label] = srv
    results: dict[str, list[float]] = {label: [] for label in servers}
    try:
        for label, srv in servers.items():
            s = mljobs.Session(url=srv.url)
            mljobs.create_external_access_integration("ORIGIN", allowed_hosts=[url.split("/")[2]], session=s)
        for r in range(a.rounds):
            for label, srv in servers.items():
                s = mljobs.Session(url=srv.url)
                job = mljobs.remote("DEFAULT_POOL", stage_name="bench", session=s,
                                    external_access_integrations=["ORIGIN"])(download)(url)
                seconds, n, via = job.result(timeout=600)
                assert n == a.mb << 20, (n, via)
                results[label].append(a.mb / seconds)
                print(f"round {r + 1}/{a.rounds}: {label}: {a.mb / seconds:.0f} MB/s (via {via})", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
            shutil.rmtree(srv.home, ignore_errors=True)
        net.shutdown()
    med = {label: statistics.median(v) for label, v in results.items()}
    print(f"\n{a.mb} MB from a local HTTP server, in a shared sandbox, median of {a.rounds}:")
    for label, v in med.items():
        print(f"  {label:30s} {v:8.0f} MB/s")
    proxy, direct = med["through the proxy"], med["direct (MLJOBS_EGRESS=open)"]
    print(f"through the proxy / direct: {proxy / direct:.2f}x")


if __name__ == "__main__":
    main()
