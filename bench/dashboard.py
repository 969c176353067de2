"""What the web dashboard costs, measured in a real browser (Debian's chromium, via Playwright).

    python bench/dashboard.py [--jobs 50] [--log-lines 100000] [--followers 10] [--rounds 5]

On a fresh server (its own MLJOBS_HOME, bound to 127.0.0.1):
- ``/`` with ``--jobs`` finished jobs (real ones, submitted and run first): the first load's time
  (navigation start to the load event, and to the first contentful paint) and bytes, the median
  of ``--rounds`` fresh browser contexts;
- the page of a finished job whose log has ``--log-lines`` lines: the time from navigation
  start until its last line is painted in the log view, the bytes of the log response at first
  (its tail) against the whole log's, and the HTML's bytes;
- ``--followers`` pages following a running job's log at once: the server process's RSS before
  and after they all stream (the added RSS), sampled with psutil.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import ServerProc  # noqa: E402 - the tests' real-server helper

import mljobs  # noqa: E402
from mljobs.client.session import Session  # noqa: E402


def _nav(page: Any) -> dict[str, float]:
    return page.evaluate("""() => {
        const n = performance.getEntriesByType('navigation')[0];
        const fcp = performance.getEntriesByName('first-contentful-paint')[0];
        return {load_ms: n.loadEventEnd - n.startTime, html_bytes: n.transferSize,
                fcp_ms: fcp ? fcp.startTime : null};
    }""")


def list_page(browser: Any, url: str, rounds: int) -> dict[str, Any]:
    loads, fcps, sizes = [], [], []
    for _ in range(rounds):
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(url + "/", wait_until="load")
        nav = _nav(page)
        loads.append(nav["load_ms"])
        fcps.append(nav["fcp_ms"])
        sizes.append(nav["html_bytes"])
        rows = page.locator("#jobs-body tr").count()
        ctx.close()
    return {"rows": rows, "load_ms_median": round(statistics.median(loads), 1),
            "first_contentful_paint_ms_median": round(statistics.median(f for f in fcps if f is not None), 1),
            "html_bytes": sizes[-1], "rounds": rounds}


def long_log_page(browser: Any, url: str, job_id: str, last_line: str, log_bytes: int) -> dict[str, Any]:
    ctx = browser.new_context()
    page = ctx.new_page()
    sizes: dict[str, int] = {}

    def on_response(resp: Any) -> None:
        if "/logs?" in resp.url:
            sizes.setdefault("log_first_response_bytes", len(resp.body()))
    page.on("response", on_response)
    page.goto(url + f"/jobs/{job_id}", wait_until="commit")
    page.wait_for_function("line => document.getElementById('log') && "
                           "document.getElementById('log').textContent.includes(line)", arg=last_line,
                           timeout=120_000)
    # the frame after the line arrived: when it is on screen
    tail_ms = page.evaluate("() => new Promise(r => requestAnimationFrame(() => r(performance.now())))")
    page.locator("#log-state").filter(has_text="end of the log").wait_for(timeout=60_000)
    shown = page.evaluate("document.getElementById('log').textContent.split('\\n').length - 1")
    html = _nav(page)["html_bytes"]
    ctx.close()
    return {"tail_painted_ms": round(tail_ms, 1), "lines_shown_at_first": shown, **sizes,
            "whole_log_bytes": log_bytes, "html_bytes": html}


def followers(browser: Any, url: str, session: Session, server_pid: int, n: int) -> dict[str, Any]:
    @mljobs.remote("DEFAULT_POOL", stage_name="bench_dash", session=session)
    def ticker(k):
        import time as t

        for i in range(k):
            print(f"tick {i}", flush=True)
            t.sleep(0.05)

    job = ticker(100_000)
    proc = psutil.Process(server_pid)
    deadline = time.monotonic() + 60
    while job.status.value != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(3)
    before = proc.memory_info().rss
    # one context each, as n people (or browsers): a browser opens at most 6 connections to a
    # host, and every followed log holds one
    contexts = [browser.new_context() for _ in range(n)]
    pages = []
    for ctx in contexts:
        p = ctx.new_page()
        p.goto(url + f"/jobs/{job.id}")
        pages.append(p)
    for p in pages:
        p.locator("#log").filter(has_text="tick").wait_for(timeout=60_000)
    samples = []
    for _ in range(10):  # 10 s of all of them streaming
        time.sleep(1)
        samples.append(proc.memory_info().rss)
    growing = all(p.evaluate("document.getElementById('log').textContent.length") > 0 for p in pages)
    for ctx in contexts:
        ctx.close()
    job.cancel()
    job.wait(60)
    return {"followers": n, "server_rss_before_mib": round(before / 2**20, 1),
            "server_rss_following_mib": round(max(samples) / 2**20, 1),
            "added_rss_mib": round((max(samples) - before) / 2**20, 1), "all_streaming": growing}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--log-lines", type=int, default=100_000)
    ap.add_argument("--followers", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("needs Debian's chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="mljobs-bench-dash-"))
    srv = ServerProc(home)
    out: dict[str, Any] = {}
    try:
        srv.start()
        s = Session(url=srv.url)

        @mljobs.remote("DEFAULT_POOL", stage_name="bench_dash", session=s)
        def small(i):
            return i

        @mljobs.remote("DEFAULT_POOL", stage_name="bench_dash", session=s)
        def chatty(n):
            import sys as _sys

            _sys.stdout.write("".join(f"line {i} of the long log, with some words to make it longer\n"
                                      for i in range(n)))

        jobs = [small(i) for i in range(a.jobs - 1)]
        long_job = chatty(a.log_lines)
        for j in [*jobs, long_job]:
            j.wait(600)
        log = httpx.get(srv.url + f"/api/v1/jobs/{long_job.id}/logs", timeout=120).content
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium)
            out["jobs_page"] = list_page(browser, srv.url, a.rounds)
            out["long_log_page"] = long_log_page(
                browser, srv.url, long_job.id, f"line {a.log_lines - 1} of the long log", len(log))
            out["log_followers"] = followers(browser, srv.url, s, srv.proc.pid, a.followers)
            browser.close()
        s.close()
    finally:
        srv.stop()
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
