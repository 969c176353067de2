"""Time from a supervisor's death to the last process of its job gone, per containment mechanism.

A job starts a child and a `setsid` grandchild and records their pids; the bench SIGKILLs the
instance's supervisor and polls /proc until none of the three is left (median of --runs).
Also prints the metrics storage of one job-hour, computed from the stored format.

    PYTHONPATH=src python bench/containment.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from conftest import ServerProc  # noqa: E402 - the tests' real-server helper

import mljobs  # noqa: E402
from mljobs.runtime.metrics import row_interval  # noqa: E402
from mljobs.server import metrics  # noqa: E402


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def one(s: mljobs.Session, tmp: Path, i: int) -> tuple[float, float]:
    """Seconds from SIGKILL of the supervisor to (the job's terminal status, the last process gone)."""
    path = tmp / f"pids{i}"

    @mljobs.remote("DEFAULT_POOL", stage_name="bench", session=s)
    def forker(path: str):
        import os
        import subprocess
        import time

        child = subprocess.Popen(["sleep", "300"])
        gc = subprocess.Popen(["setsid", "sleep", "300"])
        with open(path + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {child.pid} {gc.pid}")
        os.rename(path + ".tmp", path)
        time.sleep(300)

    job = forker(str(path))
    while not path.exists():
        time.sleep(0.01)
    pids = [int(p) for p in path.read_text().split()]
    sup = next(p for p in psutil.process_iter(["cmdline"])
               if " ".join(p.info["cmdline"] or []).startswith("mljobs-supervisor") and job.id in
               " ".join(p.info["cmdline"]))
    t0 = time.perf_counter()
    sup.send_signal(signal.SIGKILL)
    terminal = gone = None
    while terminal is None or gone is None:
        now = time.perf_counter()
        if gone is None and not any(_alive(p) for p in pids):
            gone = now - t0
        if terminal is None and job.status.value == "INTERNAL_ERROR":
            terminal = now - t0
        if now - t0 > 30:
            raise AssertionError(f"still alive after 30 s: {[p for p in pids if _alive(p)]}")
        time.sleep(0.002)
    return terminal, gone


def storage_per_job_hour() -> int:
    """Bytes the store keeps for one instance that ran an hour (JSON of the bounded columns)."""
    rows, t = [], 0.0
    while t < 3600:
        rows.append({"t": round(1.7e9 + t, 2), "cpu": round(t * 0.987654, 3), "rss": 312_345_678 + len(rows),
                     "peak": 412_345_678})
        t += row_interval(len(rows))
    vals = metrics.instance_values(rows, {"cpu_seconds": 3555.5, "peak_rss_bytes": 412_345_678}, 1.7e9 + 3600)
    return len(json.dumps(vals["metrics"], separators=(",", ":"))), len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    for mech in ("auto", "fallback"):
        home = Path(tempfile.mkdtemp(prefix="mljobs-bench-"))
        srv = ServerProc(home, extra_env={"MLJOBS_CONTAINMENT": mech})
        srv.start()
        try:
            s = mljobs.Session(url=srv.url)
            how = s.server_info()["containment"]["local"]
            res = [one(s, home, i) for i in range(a.runs)]
        finally:
            srv.stop()
            shutil.rmtree(home, ignore_errors=True)
        print(f"{mech}: {how}")
        print(f"  supervisor SIGKILL -> job terminal: median {statistics.median(r[0] for r in res) * 1e3:.0f} ms; "
              f"-> last process gone: median {statistics.median(r[1] for r in res) * 1e3:.0f} ms, "
              f"max {max(r[1] for r in res) * 1e3:.0f} ms ({a.runs} runs)")
    size, rows = storage_per_job_hour()
    print(f"metrics storage: {size} bytes per instance-hour ({rows} samples written, "
          f"{min(rows, metrics.MAX_STORED_ROWS)} kept)")


if __name__ == "__main__":
    main()
