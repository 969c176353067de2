"""What the control plane sustains: API requests per second, queue throughput, memory, recovery.

    python bench/api.py [--stores sqlite,postgres] [--jobs 10000] [--requests 2000] [--threads 4]
                        [--queue 1000]

For each store (SQLite under a fresh MLJOBS_HOME; PostgreSQL at MLJOBS_TEST_PG, default
127.0.0.1:5432 db `test`, in a fresh schema dropped afterwards):
- ``--jobs`` jobs are written straight into the store (90% finished, 10% queued on a suspended
  pool), then a real server starts and ``--threads`` httpx clients send ``--requests`` requests
  each kind: ``get_job`` of a finished job, ``get_job`` of a queued job (it computes the queue
  position), ``list_jobs(limit=100)``;
- ``--queue`` trivial function jobs are submitted on a pool of max_nodes 2 and timed until all
  are DONE, while the server process's RSS is sampled (peak);
- recovery: two jobs run, the server is killed with SIGKILL, the jobs end meanwhile; the time from
  the restart command until /health answers and until both jobs read DONE.
Everything binds to and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import PG_URL, ServerProc, pg_available  # noqa: E402 - the tests' real-server helper

import mljobs  # noqa: E402
from mljobs.server.store import Store  # noqa: E402
from mljobs.server.tables import jobs  # noqa: E402
from mljobs.spec import JobSpec, PayloadKind, PoolSpec, new_job_id  # noqa: E402


def fill(store: Store, n: int) -> tuple[list[str], list[str]]:
    """``n`` jobs: 90% DONE on DEFAULT_POOL, 10% PENDING on the suspended pool QUEUED."""
    store.migrate()
    store.create_pool(PoolSpec("QUEUED", "CPU_X64_XS", 1, 1, "local"), if_not_exists=True)
    store.update_pool("QUEUED", suspended=True)
    spec = JobSpec("DEFAULT_POOL", "bench", PayloadKind.FUNCTION, entrypoint=["func.pkl"],
                   client_python="3.11.0", client_cloudpickle="3.0.0").to_dict()
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    done, pending, rows = [], [], []
    for i in range(n):
        job_id = new_job_id()
        queued = i % 10 == 9
        rows.append({
            "id": job_id, "name": job_id, "status": "PENDING" if queued else "DONE", "message": "",
            "database_name": "MLJOBS", "schema_name": "PUBLIC", "owner": "bench",
            "compute_pool": "QUEUED" if queued else "DEFAULT_POOL", "stage_name": "bench",
            "target_instances": 1, "min_instances": 1, "instances_ran": 0 if queued else 1,
            "spec": {**spec, "compute_pool": "QUEUED"} if queued else spec,
            "created_time": t0 + dt.timedelta(seconds=i), "started_time": None if queued else t0,
            "completed_time": None if queued else t0 + dt.timedelta(seconds=i + 1),
        })
        (pending if queued else done).append(job_id)
    with store.engine.begin() as c:  # what Store.insert_job does, in one transaction
        c.execute(jobs.insert(), rows)
    return done, pending


def hammer(url: str, paths: list[str], threads: int) -> float:
    """Requests per second for GET ``paths`` (split across ``threads`` keep-alive clients)."""
    errors: list[str] = []

    def worker(mine: list[str]) -> None:
        with httpx.Client(base_url=url + "/api/v1", timeout=60) as c:
            for p in mine:
                r = c.get(p)
                if r.status_code != 200:
                    errors.append(f"{p}: {r.status_code} {r.text[:200]}")

    ts = [threading.Thread(target=worker, args=(paths[k::threads],)) for k in range(threads)]
    t = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    took = time.perf_counter() - t
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return len(paths) / took


def peak_rss(pid: int, stop: threading.Event, out: list[int]) -> None:
    proc = psutil.Process(pid)
    while not stop.wait(0.05):
        try:
            out.append(proc.memory_info().rss)
        except psutil.NoSuchProcess:
            return


def queue_throughput(srv: ServerProc, n: int) -> tuple[float, float]:
    """Seconds for ``n`` trivial jobs on a pool of 2 to be DONE, and the server's peak RSS (MiB)."""
    s = mljobs.Session(url=srv.url)
    mljobs.create_compute_pool("BENCH2", instance_family="CPU_X64_XS", max_nodes=2, session=s)

    @mljobs.remote("BENCH2", stage_name="bench", session=s)
    def trivial(i: int):
        return i

    assert srv.proc is not None
    samples: list[int] = [psutil.Process(srv.proc.pid).memory_info().rss]
    stop = threading.Event()
    sampler = threading.Thread(target=peak_rss, args=(srv.proc.pid, stop, samples))
    sampler.start()
    t = time.perf_counter()
    try:
        handles = [trivial(i) for i in range(n)]
        for h in handles:
            assert h.wait(timeout=600) == "DONE", (h.id, h.message)
        took = time.perf_counter() - t
    finally:
        stop.set()
        sampler.join()
    s.close()
    return took, max(samples) / 2**20


def recovery(srv: ServerProc) -> tuple[float, float]:
    """kill -9 of the server while two jobs run; they end meanwhile. Seconds from the restart
    command to /health answering, and to both jobs read DONE."""
    s = mljobs.Session(url=srv.url)

    @mljobs.remote("BENCH2", stage_name="bench", session=s)
    def nap():
        import time as t

        t.sleep(1.0)
        return "ok"

    jobs = [nap(), nap()]
    for j in jobs:
        while j.status.value != "RUNNING":
            time.sleep(0.02)
    srv.kill(signal.SIGKILL)
    time.sleep(2.0)
    t = time.perf_counter()
    srv.start()  # returns once /health answers
    health = time.perf_counter() - t
    with httpx.Client(base_url=srv.url + "/api/v1", timeout=30) as c:
        while any(c.get(f"/jobs/{j.id}").json()["status"] != "DONE" for j in jobs):
            time.sleep(0.01)
    done = time.perf_counter() - t
    s.close()
    return health, done


def bench_store(kind: str, a: argparse.Namespace) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="mljobs-bench-api-"))
    schema = None
    eng = None
    if kind == "postgres":
        schema = "mljobs_bench_" + uuid.uuid4().hex[:10]
        eng = sa.create_engine(PG_URL)
        with eng.begin() as c:
            c.execute(sa.text(f"CREATE SCHEMA {schema}"))
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    else:
        url = f"sqlite:///{home / 'mljobs.db'}"
    srv = ServerProc(home, url if kind == "postgres" else None)
    try:
        store = Store(url)
        t = time.perf_counter()
        done, pending = fill(store, a.jobs)
        fill_s = time.perf_counter() - t
        store.close()
        srv.start()
        rnd = random.Random(1)
        out = {"fill_s": fill_s}
        hammer(srv.url, [f"/jobs/{rnd.choice(done)}" for _ in range(100)], a.threads)  # warm up
        out["get_done"] = hammer(srv.url, [f"/jobs/{rnd.choice(done)}" for _ in range(a.requests)], a.threads)
        out["get_pending"] = hammer(srv.url, [f"/jobs/{rnd.choice(pending)}" for _ in range(a.requests // 4)],
                                    a.threads)
        out["list_100"] = hammer(srv.url, ["/jobs?limit=100"] * (a.requests // 4), a.threads)
        if a.queue:
            took, rss = queue_throughput(srv, a.queue)
            out.update(queue_s=took, queue_rate=a.queue / took, peak_rss_mib=rss)
            out["recover_health_s"], out["recover_done_s"] = recovery(srv)
        return out
    finally:
        srv.stop()
        shutil.rmtree(home, ignore_errors=True)
        if eng is not None:
            with eng.begin() as c:
                c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
            eng.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--queue", type=int, default=1000)
    a = ap.parse_args()
    results = {}
    for kind in a.stores.split(","):
        if kind == "postgres" and (why := pg_available()):
            print(f"postgres: skipped, {why}")
            continue
        results[kind] = bench_store(kind, a)
    rows = [(f"store filled with {a.jobs} jobs (s)", "fill_s", "{:.1f}"),
            ("get_job, finished job (req/s)", "get_done", "{:.0f}"),
            ("get_job, queued job (req/s)", "get_pending", "{:.0f}"),
            ("list_jobs(limit=100) (req/s)", "list_100", "{:.0f}"),
            (f"{a.queue} trivial jobs, pool of 2 (s)", "queue_s", "{:.1f}"),
            ("  throughput (jobs/s)", "queue_rate", "{:.1f}"),
            ("server peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
            ("recovery after kill -9: /health (s)", "recover_health_s", "{:.2f}"),
            ("recovery: jobs that ended meanwhile DONE (s)", "recover_done_s", "{:.2f}")]
    kinds = list(results)
    print(f"\n{'':46}" + "".join(f"{k:>12}" for k in kinds))
    for label, key, fmt in rows:
        cells = [fmt.format(results[k][key]) if key in results[k] else "-" for k in kinds]
        print(f"{label:46}" + "".join(f"{c:>12}" for c in cells))
    print(f"({a.threads} client threads, {a.requests} get_job requests, {a.requests // 4} of each other kind; "
          f"{psutil.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
