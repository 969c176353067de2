"""Submit -> result latency and throughput of mljobs on a warm local server, against a git ref.

    python bench/latency.py [--runs 50] [--jobs 200] [--rounds 2] [--base REF]
                            [--database-url URL] [--env K=V ...] [--timeline] [--ray] [--json FILE]

Each *half* starts a real server (the tests' ServerProc, a fresh MLJOBS_HOME), times ``--runs``
hello-world ``@remote`` jobs from submit to result, then ``--jobs`` trivial jobs on a pool of
``max_nodes=2`` (jobs/s). The floor is a bare ``python -c "import cloudpickle"`` start, measured
in every round beside the halves.

``--base REF`` checks REF out into a temporary worktree and runs REF's code and the working
tree's alternately (ABAB, ``--rounds`` times each, same machine state), each half in its own
process with that tree's ``src`` first on ``sys.path`` (so the server, spawner, supervisors and
client all run that tree's code). It prints both sides' p50, p90 and jobs/s, the ratios, and the
run-to-run spread of each side (the largest relative difference between its rounds); a change
worse by more than 10% beyond that spread is flagged. ``--env K=V`` sets server variables for
every half (``MLJOBS_CONTAINMENT=fallback``, ``MLJOBS_METRICS=0``); ``--base-env K=V`` sets one for the base's halves only (``--base HEAD --base-env
MLJOBS_ISOLATION=none``: the sandbox's cost, same code); ``--database-url`` puts the
store on that PostgreSQL (each half in a new schema of its own, dropped after). ``--timeline``
runs the working tree once more with ``MLJOBS_TRACE`` on and prints the median time of every mark
(:mod:`mljobs.trace`) from the client's submit (docs/performance.md).
``--ray``: the same hello world through Ray Jobs (JobSubmissionClient on a local ``ray start
--head``), inside a network namespace this script creates (needs root and iproute2).
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
from typing import Any

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


# -- one half, in its own process (the tree under test first on sys.path) -----------------------
def _fresh_schema(url: str) -> tuple[str, Any]:
    """A new empty schema on the PostgreSQL at ``url`` for one half: its URL, and how to drop it."""
    import uuid

    import sqlalchemy as sa

    from mljobs.server.store import normalize_url

    schema = "mljobs_bench_" + uuid.uuid4().hex[:10]
    eng = sa.create_engine(normalize_url(url))
    with eng.begin() as c:
        c.execute(sa.text(f"CREATE SCHEMA {schema}"))

    def drop() -> None:
        with eng.begin() as c:
            c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        eng.dispose()

    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}", drop


def half(tree: Path, runs: int, jobs: int, env: dict[str, str], database_url: str | None,
         trace_file: str | None, gap_s: float = 0.0) -> dict[str, Any]:
    sys.path.insert(0, str(tree / "tests"))
    from conftest import ServerProc  # the tests' real-server helper, from the tree under test

    import mljobs

    drop_schema = None
    if database_url:
        database_url, drop_schema = _fresh_schema(database_url)
    home = Path(tempfile.mkdtemp(prefix="mljobs-bench-"))
    srv = ServerProc(home, database_url=database_url, extra_env=env)
    srv.start()
    marks: list[tuple[str, str, float]] = []
    try:
        s = mljobs.Session(url=srv.url)

        @mljobs.remote("DEFAULT_POOL", stage_name="bench", session=s)
        def hello(name: str = "world"):
            print(f"Hello {name}!")
            return name

        for i in range(3):
            hello("warm-up").result()
        lat = []
        for i in range(runs):
            time.sleep(gap_s)  # 0: back to back; else the machine is idle between jobs, as between a user's
            t = time.perf_counter()
            t0 = time.time()
            job = hello(str(i))
            t1 = time.time()
            assert job.result() == str(i)
            lat.append(time.perf_counter() - t)
            marks += [(job.id, "client.submit", t0), (job.id, "client.submitted", t1),
                      (job.id, "client.result", time.time())]
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
    finally:
        srv.stop()
        shutil.rmtree(home, ignore_errors=True)
        if drop_schema is not None:
            drop_schema()
    if trace_file:
        with open(trace_file, "a") as f:
            f.writelines(f"{at:.6f} 0 {jid} {point}\n" for jid, point, at in marks)
    return {"lat_ms": [x * 1e3 for x in lat], "jobs_per_s": jobs / elapsed, "done": done, "jobs": jobs}


def run_half(tree: Path, a: argparse.Namespace, trace_file: str | None = None,
             extra_env: list[str] | None = None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "src"), os.environ.get("PYTHONPATH", "")]))
    if trace_file:
        env["MLJOBS_TRACE"] = trace_file
    cmd = [sys.executable, __file__, "--half", str(tree), "--runs", str(a.runs), "--jobs", str(a.jobs),
           "--gap-ms", str(a.gap_ms)]
    for kv in [*a.env, *(extra_env or [])]:
        cmd += ["--env", kv]
    if a.database_url:
        cmd += ["--database-url", a.database_url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the half for {tree} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the comparison --------------------------------------------------------------------------------
def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [x for r in rounds for x in r["lat_ms"]]
    medians = [statistics.median(r["lat_ms"]) for r in rounds]
    rates = [r["jobs_per_s"] for r in rounds]

    def spread(xs: list[float]) -> float:
        return (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 else 0.0

    return {"p50_ms": statistics.median(lat), "p90_ms": pct(lat, 0.9), "jobs_per_s": statistics.median(rates),
            "p50_spread": spread(medians), "rate_spread": spread(rates), "round_p50s": medians,
            "round_rates": rates, "done": sum(r["done"] for r in rounds), "jobs": sum(r["jobs"] for r in rounds)}


def verdict(base: dict[str, Any], head: dict[str, Any]) -> list[str]:
    """Regressions beyond 10% plus the spread either side measured."""
    out = []
    slack = 0.10 + max(base["p50_spread"], head["p50_spread"])
    if head["p50_ms"] > base["p50_ms"] * (1 + slack):
        out.append(f"p50 is {head['p50_ms'] / base['p50_ms']:.2f}x the base's (allowed {1 + slack:.2f}x)")
    slack = 0.10 + max(base["rate_spread"], head["rate_spread"])
    if head["jobs_per_s"] < base["jobs_per_s"] / (1 + slack):
        out.append(f"jobs/s is {head['jobs_per_s'] / base['jobs_per_s']:.2f}x the base's "
                   f"(allowed {1 / (1 + slack):.2f}x)")
    return out


def timeline(a: argparse.Namespace) -> None:
    fd, path = tempfile.mkstemp(prefix="mljobs-trace-", suffix=".txt")
    os.close(fd)
    os.chmod(path, 0o666)  # a shared sandbox's payload marks it under a uid of its own
    try:
        run_half(ROOT, a, trace_file=path)
        sys.path.insert(0, str(ROOT / "src"))
        from mljobs import trace

        per_job = [m for m in trace.read(path).values() if "client.submit" in m and "client.result" in m]
    finally:
        os.unlink(path)
    points: dict[str, list[float]] = {}
    for m in per_job:
        t0 = m["client.submit"]
        for point, at in m.items():
            points.setdefault(point, []).append((at - t0) * 1e3)
    rows = sorted(((statistics.median(v), p, len(v)) for p, v in points.items()))
    print(f"\ntimeline of {len(per_job)} hello-world jobs (median ms after the client's submit; "
          "step: from the row before)")
    prev = 0.0
    for med, point, n in rows:
        print(f"  {med:7.2f}  {med - prev:+6.2f}  {point}" + (f"  (in {n} jobs)" if n != len(per_job) else ""))
        prev = med


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2, help="halves per side, alternating (ABAB...)")
    ap.add_argument("--base", help="a git ref to compare the working tree with, in the same run")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="a server variable, every half")
    ap.add_argument("--base-env", action="append", default=[], metavar="K=V",
                    help="a server variable for the base's halves only: --base HEAD --base-env "
                         "MLJOBS_ISOLATION=none measures what the sandbox costs")
    ap.add_argument("--database-url", help="the store's URL (PostgreSQL); default: each server's SQLite")
    ap.add_argument("--timeline", action="store_true", help="also print the per-stage timeline of a job")
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="a pause before each latency job (default 0: back to back, the next job's warm "
                         "process is made while this one runs; e.g. 400: each job finds the machine idle)")
    ap.add_argument("--json", help="write the figures here as JSON")
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--half", help=argparse.SUPPRESS)
    ap.add_argument("--ray-inner", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    env = dict(kv.split("=", 1) for kv in a.env)
    if a.ray_inner:
        ray_inner(a.runs)
        return
    if a.half:
        print(json.dumps(half(Path(a.half), a.runs, a.jobs, env, a.database_url, os.environ.get("MLJOBS_TRACE"),
                              a.gap_ms / 1000)))
        return
    worktree = None
    sides: list[tuple[str, Path]] = [("working tree", ROOT)]
    if a.base:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.base], check=True,
                             capture_output=True, text=True).stdout.strip()
        worktree = Path(tempfile.mkdtemp(prefix="mljobs-base-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), sha], check=True,
                       capture_output=True)
        sides.insert(0, (f"base {a.base} ({sha})", worktree))
    for _, tree in sides:  # equal terms where PYTHONDONTWRITEBYTECODE is set: no side compiles per process
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "src")], check=True, capture_output=True)
    floors: list[float] = []
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in sides}
    try:
        for r in range(a.rounds):
            floors.append(bare_start())
            for label, tree in sides:
                print(f"round {r + 1}/{a.rounds}: {label} ...", file=sys.stderr, flush=True)
                results[label].append(run_half(tree, a, extra_env=a.base_env if label != "working tree" else None))
        floors.append(bare_start())
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)
            shutil.rmtree(worktree, ignore_errors=True)
    floor = statistics.median(floors) * 1e3
    summary = {label: summarize(rs) for label, rs in results.items()}
    where = "PostgreSQL" if a.database_url else "SQLite"
    extra = (f", server env {env}" if env else "") + (f", the base's also {a.base_env}" if a.base_env else "")
    print(f"\nfloor: bare `python -c 'import cloudpickle'` {floor:.1f} ms (median of {20 * len(floors)} starts "
          f"across the run); store {where}{extra}; {a.rounds} round(s) per side, {a.runs} jobs each"
          + (f" {a.gap_ms:g} ms apart" if a.gap_ms else " back to back") + ", "
          f"{a.jobs} trivial jobs on a pool of max_nodes 2")
    print(f"{'':28s} {'p50 ms':>8s} {'p90 ms':>8s} {'p50/floor':>9s} {'jobs/s':>8s} {'p50 spread':>10s} "
          f"{'rate spread':>11s}")
    for label, m in summary.items():
        print(f"{label[:28]:28s} {m['p50_ms']:8.1f} {m['p90_ms']:8.1f} {m['p50_ms'] / floor:8.2f}x "
              f"{m['jobs_per_s']:8.1f} {m['p50_spread']:9.1%} {m['rate_spread']:10.1%}"
              + ("" if m["done"] == m["jobs"] else f"  ({m['done']}/{m['jobs']} DONE)"))
    bad: list[str] = []
    if a.base:
        base, head = summary[sides[0][0]], summary["working tree"]
        print(f"working tree / base: p50 {head['p50_ms'] / base['p50_ms']:.2f}x, p90 "
              f"{head['p90_ms'] / base['p90_ms']:.2f}x, jobs/s {head['jobs_per_s'] / base['jobs_per_s']:.2f}x")
        bad = verdict(base, head)
        print("REGRESSION: " + "; ".join(bad) if bad else "no regression beyond 10% + the measured spread")
    if a.json:
        Path(a.json).write_text(json.dumps({"floor_ms": floor, "sides": summary, "regressions": bad}, indent=1))
    if a.timeline:
        timeline(a)
    if a.ray:
        r = run_ray_half(__file__, ["--runs", str(a.runs)])
        if isinstance(r, str):
            print(f"Ray Jobs: {r}")
        else:
            print(f"Ray Jobs submit->SUCCEEDED (no result value): median {r['median_ms']:.1f} ms, "
                  f"p90 {r['p90_ms']:.1f} ms over {a.runs} runs ({r['median_ms'] / floor:.1f}x the floor)")
    if bad:
        sys.exit(1)


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


if __name__ == "__main__":
    main()
