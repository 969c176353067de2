"""Fair share, measured (docs/sharing.md).

    python bench/fairshare.py [--queued 10000] [--users 50] [--minutes 2] [--jobs 200] [--rounds 2]
                              [--database-url URL] [--json FILE]

1. Decision time: a store holding ``--queued`` PENDING jobs across ``--users`` users on a pool of
   ``max_nodes=2``; one decision is what ``ControlPlane.schedule`` does before it starts anything
   (the pool's live instances, each user's first queued jobs, everyone's usage, the plan). p50/p99
   over 300 decisions, on SQLite (and on PostgreSQL with ``--database-url``).
2. Share: two busy users on a real server (users alice and bob, a fair pool of 2) keep 1-second
   jobs queued for ``--minutes``; each user's instance-seconds in that window, and how far each
   share is from half.
3. Throughput: ``--jobs`` trivial jobs from the two users, alternating, on a pool of 2, with the
   pool fair and then fifo, ``--rounds`` times each in ABAB order on one server; jobs/s and the ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
from latency import pct  # noqa: E402 - the benchmarks' one percentile


def decision_time(url: str | None, queued: int, users: int) -> dict[str, float]:
    from collections import Counter

    import sqlalchemy as sa

    from mljobs.server.quotas import Quotas
    from mljobs.server.scheduler import plan
    from mljobs.server.store import Store, utcnow
    from mljobs.server.tables import jobs
    from mljobs.server.usage import Usage
    from mljobs.spec import PoolSpec

    tmp = Path(tempfile.mkdtemp(prefix="mljobs-bench-fair-"))
    drop = None
    if url:
        from latency import _fresh_schema  # the latency benchmark's schema-per-run helper

        url, drop = _fresh_schema(url)
    store = Store(url) if url else Store.sqlite(tmp / "mljobs.db")
    try:
        store.migrate()
        store.create_pool(PoolSpec("P", "CPU_X64_XS", 1, 2))
        now = utcnow()
        rows = [{"id": f"MLJOB_{uuid.uuid4().hex}", "name": "j", "status": "PENDING", "message": "",
                 "database_name": "D", "schema_name": "S", "owner": f"user{i % users}", "compute_pool": "P",
                 "stage_name": "ST", "target_instances": 1, "min_instances": 1, "instances_ran": 0,
                 "spec": {"compute_pool": "P"}, "created_time": now + dt.timedelta(microseconds=i), "priority": 0}
                for i in range(queued)]
        with store.engine.begin() as c:
            c.execute(jobs.insert(), rows)
        if url:  # what autovacuum does after this many inserts: the planner then uses the queue's index
            with store.engine.connect() as c:
                c.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("VACUUM ANALYZE jobs"))
        usage = Usage(86400.0)
        for i in range(users):
            usage.add(f"user{i}", float(i * 100), time.time())
        quotas = Quotas(store)
        times = []
        for _ in range(300):
            t = time.perf_counter()
            live, heads = store.start_view("P", 2)
            decision = plan(store.get_pool("P"), {s for s, _, _ in live}, heads, fair=True,
                            usage=usage.snapshot(time.time()), running=Counter(o for _, o, _ in live),
                            max_instances=quotas.max_instances(list(heads), "P"))
            times.append((time.perf_counter() - t) * 1e3)
            assert len(decision.starts) == 2 and decision.starts[0][0].owner == "user0"
        return {"p50_ms": statistics.median(times), "p99_ms": pct(times, 0.99)}
    finally:
        store.close()
        if drop is not None:
            drop()
        shutil.rmtree(tmp, ignore_errors=True)


def hold(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def trivial(i: int) -> int:
    return i


def on_server(minutes: float, n_jobs: int, rounds: int) -> dict[str, float]:
    from conftest import ServerProc, add_users

    import mljobs

    home = Path(tempfile.mkdtemp(prefix="mljobs-bench-fair-srv-"))
    srv = ServerProc(home)
    srv.start()
    out: dict[str, float] = {}
    try:
        team = add_users(srv)
        mljobs.create_compute_pool("SHARE", instance_family="CPU_X64_XS", max_nodes=2, session=team["root"])
        # -- share over a synthetic load --------------------------------------------------------
        fns = {u: mljobs.remote("SHARE", stage_name=u.upper(), session=team[u])(hold) for u in ("alice", "bob")}
        window_s = minutes * 60.0
        per_user = int(window_s) + 10  # 1-second jobs: more than the window can run on 2 slots for one user
        start = dt.datetime.now(dt.timezone.utc)
        handles = {u: [fns[u](1.0) for _ in range(per_user)] for u in fns}
        time.sleep(window_s)
        end = dt.datetime.now(dt.timezone.utc)
        secs = {}
        for u, hs in handles.items():
            total = 0.0
            for h in hs:
                info = h._refresh()
                for inst in info["instances"]:
                    s0 = dt.datetime.fromisoformat(inst["started_time"]) if inst["started_time"] else None
                    s1 = dt.datetime.fromisoformat(inst["ended_time"]) if inst["ended_time"] else end
                    if s0 is not None:
                        total += max(0.0, (min(s1, end) - max(s0, start)).total_seconds())
            secs[u] = total
        for hs in handles.values():
            for h in hs:
                h.cancel()
        total = sum(secs.values())
        out["share_alice"], out["share_bob"] = secs["alice"] / total, secs["bob"] / total
        out["share_deviation"] = max(abs(s - 0.5) for s in (out["share_alice"], out["share_bob"]))
        out["window_s"] = window_s
        print(f"share over {window_s:.0f} s of two busy users on a fair pool of 2: alice {out['share_alice']:.1%}, "
              f"bob {out['share_bob']:.1%} (off half by {out['share_deviation']:.1%})")
        # -- throughput, fair against fifo --------------------------------------------------------
        for hs in handles.values():
            for h in hs:
                h.wait()
        quick = {u: mljobs.remote("SHARE", stage_name=u.upper(), session=team[u])(trivial) for u in fns}
        rates: dict[str, list[float]] = {"fair": [], "fifo": []}
        for r in range(rounds):
            for mode in ("fair", "fifo") if r % 2 == 0 else ("fifo", "fair"):
                mljobs.alter_compute_pool("SHARE", scheduling=mode, session=team["root"])
                t = time.perf_counter()
                hs = [quick["alice" if i % 2 else "bob"](i) for i in range(n_jobs)]
                for h in hs:
                    h.wait()
                rates[mode].append(n_jobs / (time.perf_counter() - t))
        out["fair_jobs_per_s"] = statistics.median(rates["fair"])
        out["fifo_jobs_per_s"] = statistics.median(rates["fifo"])
        out["fair_vs_fifo"] = out["fair_jobs_per_s"] / out["fifo_jobs_per_s"]
        print(f"throughput, {n_jobs} trivial jobs of two users on a pool of 2, {rounds} rounds ABAB: fair "
              f"{out['fair_jobs_per_s']:.1f} jobs/s, fifo {out['fifo_jobs_per_s']:.1f} jobs/s "
              f"({out['fair_vs_fifo']:.2f}x)")
    finally:
        srv.stop()
        shutil.rmtree(home, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--database-url", help="also time decisions on this PostgreSQL")
    ap.add_argument("--json", help="write the figures here too")
    a = ap.parse_args()
    figures: dict[str, object] = {}
    d = decision_time(None, a.queued, a.users)
    figures["sqlite_decision"] = d
    print(f"decision time, {a.queued} jobs queued across {a.users} users, SQLite: p50 {d['p50_ms']:.2f} ms, "
          f"p99 {d['p99_ms']:.2f} ms")
    if a.database_url:
        d = decision_time(a.database_url, a.queued, a.users)
        figures["postgres_decision"] = d
        print(f"decision time, same, PostgreSQL: p50 {d['p50_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms")
    figures.update(on_server(a.minutes, a.jobs, a.rounds))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
