"""Submit -> result latency and throughput of mljobs on a warm local server, beside Ray Jobs.

    python bench/latency.py [--runs 50] [--jobs 200] [--ray]

mljobs: hello-world `remote` submit -> result, median and p90 over --runs, beside the bare cost of
starting `python -c "import cloudpickle"`; then --jobs trivial jobs on a pool of max_nodes 2.
--ray: the same hello world through Ray Jobs (JobSubmissionClient on a local `ray start --head`),
run inside a network namespace this script creates (loopback only; needs root and iproute2),
since Ray binds all interfaces and probes outside addresses otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _netns import run_ray_half  # noqa: E402 - the benchmarks' shared Ray-in-a-namespace runner


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def bare_start(n: int = 20) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import cloudpickle"], check=True)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_mljobs(runs: int, jobs: int, env: dict[str, str] | None = None) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import ServerProc  # the tests' real-server helper

    import mljobs

    home = Path(tempfile.mkdtemp(prefix="mljobs-bench-"))
    srv = ServerProc(home, extra_env=env)
    srv.start()
    try:
        s = mljobs.Session(url=srv.url)

        @mljobs.remote("DEFAULT_POOL", stage_name="bench", session=s)
        def hello(name: str = "world"):
            print(f"Hello {name}!")
            return name

        hello("warm-up").result()
        lat = []
        for i in range(runs):
            t = time.perf_counter()
            assert hello(str(i)).result() == str(i)
            lat.append(time.perf_counter() - t)
        mljobs.create_compute_pool("BENCH2", instance_family="CPU_X64_XS", max_nodes=2, session=s)

        @mljobs.remote("BENCH2", stage_name="bench", session=s)
        def trivial(i: int):
            return i

        t = time.perf_counter()
        handles = [trivial(i) for i in range(jobs)]
        for h in handles:
            h.wait()
        elapsed = time.perf_counter() - t
        done = sum(h.status == "DONE" for h in handles)
        return {"median_ms": statistics.median(lat) * 1e3, "p90_ms": pct(lat, 0.9) * 1e3,
                "jobs_per_s": jobs / elapsed, "done": done, "jobs": jobs}
    finally:
        srv.stop()
        shutil.rmtree(home, ignore_errors=True)


def ray_inner(runs: int) -> None:
    """Inside the namespace: a Ray head, then hello world through JobSubmissionClient."""
    tmp = tempfile.mkdtemp(prefix="ray-bench-")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                    "--include-dashboard=true", f"--temp-dir={tmp}", "--num-cpus=2", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True)
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient("http://127.0.0.1:8265")
        entry = "python -c \"print('Hello world!')\""

        def one() -> float:
            t = time.perf_counter()
            jid = client.submit_job(entrypoint=entry)
            while client.get_job_status(jid) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                time.sleep(0.01)
            return time.perf_counter() - t

        one()
        lat = [one() for _ in range(runs)]
        print(json.dumps({"median_ms": statistics.median(lat) * 1e3, "p90_ms": pct(lat, 0.9) * 1e3}))
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--metrics-off-too", action="store_true",
                    help="run the mljobs half twice, sampling on and off (MLJOBS_METRICS=0), side by side")
    ap.add_argument("--ray-inner", action="store_true")
    a = ap.parse_args()
    if a.ray_inner:
        ray_inner(a.runs)
        return
    bare = bare_start()
    halves = [("metrics on", None), ("metrics off", {"MLJOBS_METRICS": "0"})] if a.metrics_off_too else [("", None)]
    results = [(label, bench_mljobs(a.runs, a.jobs, env)) for label, env in halves]
    print(f"bare `python -c 'import cloudpickle'`: {bare * 1e3:.1f} ms (median of 20)")
    for label, m in results:
        tag = f" [{label}]" if label else ""
        print(f"mljobs submit->result{tag}: median {m['median_ms']:.1f} ms, p90 {m['p90_ms']:.1f} ms over {a.runs} "
              f"runs ({m['median_ms'] / (bare * 1e3):.1f}x the bare start)")
        print(f"mljobs throughput{tag}: {m['jobs_per_s']:.1f} jobs/s ({m['done']}/{m['jobs']} DONE, pool max_nodes 2)")
    if a.ray:
        r = run_ray_half(__file__, ["--runs", str(a.runs)])
        if isinstance(r, str):
            print(f"Ray Jobs: {r}")
        else:
            print(f"Ray Jobs submit->SUCCEEDED (no result value): median {r['median_ms']:.1f} ms, "
                  f"p90 {r['p90_ms']:.1f} ms over {a.runs} runs")


if __name__ == "__main__":
    main()
