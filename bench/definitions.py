"""Definitions and schedules, measured on a real local server (the tests' ServerProc).

    python bench/definitions.py [--runs 40] [--queued 200] [--ticks 30] [--json FILE]

1. Submit -> result of a trivial function, three ways alternating call by call on one server
   (same machine state): ``upload`` pickles and uploads the function with its arguments at each
   call (what ``@remote`` did before it registered lazily, and still does for arguments over
   ``REMOTE_CALL_BYTES``); ``remote``, a ``@remote`` call (registered at its first call: only the
   arguments travel after); ``definition``, a call of the function registered by name
   (``MLJobDefinition.register``). Prints p50/p90 of each and the ratios to ``upload``.
2. Tick lateness: a 1 s schedule (``concurrency="allow"``) fires for ``--ticks`` seconds while
   ``--queued`` jobs wait in another (suspended) pool's queue; lateness is each run's
   ``created_time`` minus its ``scheduled_tick``. Prints p50/p99.
3. Store cost of a schedule: the rows written per tick (job, job event, schedule event, the
   schedule's update) and the store's growth per tick (SQLite file, jobs kept), scaled to a day of
   1-minute ticks; and the reads an idle server makes for its clock.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
from latency import pct  # noqa: E402 - the benchmarks' one percentile


def _used_bytes(db: Path) -> int:
    """The store's pages in use (WAL merged first), in bytes."""
    import sqlite3

    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages, free, size = (con.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count",
                                                                                 "page_size"))
        return (pages - free) * size
    finally:
        con.close()


def trivial(i: int) -> int:
    return i


TABLE = b""  # filled by --table-mb: what a function carries with it (a lookup table, a small model)


def carrying(i: int) -> int:
    return i + len(TABLE) * 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--queued", type=int, default=200)
    ap.add_argument("--ticks", type=int, default=30)
    ap.add_argument("--table-mb", type=float, default=2.0,
                    help="the global a second function carries (its pickle's size), for the same comparison")
    ap.add_argument("--json", help="write the figures here too")
    a = ap.parse_args()

    from conftest import ServerProc

    import mljobs

    home = Path(tempfile.mkdtemp(prefix="mljobs-bench-defs-"))
    srv = ServerProc(home)
    srv.start()
    out: dict[str, object] = {}
    try:
        s = mljobs.Session(url=srv.url)
        import mljobs.client.definitions as client_defs

        plain = mljobs.remote("DEFAULT_POOL", stage_name="bench", session=s)(trivial)
        defn = mljobs.MLJobDefinition.register(trivial, "DEFAULT_POOL", "bench", session=s)

        def upload(i: int) -> mljobs.MLJob:  # every call's arguments "too large": the whole call uploaded
            saved, client_defs.REMOTE_CALL_BYTES = client_defs.REMOTE_CALL_BYTES, -1
            try:
                return plain(i)
            finally:
                client_defs.REMOTE_CALL_BYTES = saved

        global TABLE
        TABLE = os.urandom(int(a.table_mb * (1 << 20)))
        heavy = mljobs.remote("DEFAULT_POOL", stage_name="bench", session=s)(carrying)

        def heavy_upload(i: int) -> mljobs.MLJob:
            saved, client_defs.REMOTE_CALL_BYTES = client_defs.REMOTE_CALL_BYTES, -1
            try:
                return heavy(i)
            finally:
                client_defs.REMOTE_CALL_BYTES = saved

        for what, ways in (("a trivial function", [("upload", upload), ("remote", plain), ("definition", defn)]),
                           (f"a function carrying {a.table_mb:g} MiB", [("upload", heavy_upload), ("remote", heavy)])):
            for i in range(3):
                for _, fn in ways:
                    fn(i).result()
            lat: dict[str, list[float]] = {label: [] for label, _ in ways}
            for i in range(a.runs):
                for label, fn in ways[i % len(ways):] + ways[:i % len(ways)]:
                    t = time.perf_counter()
                    assert fn(i).result() == i
                    lat[label].append((time.perf_counter() - t) * 1e3)
            key = "" if what == "a trivial function" else "carrying_"
            for label, xs in lat.items():
                out[f"{key}{label}_p50_ms"], out[f"{key}{label}_p90_ms"] = statistics.median(xs), pct(xs, 0.9)
            print(f"submit -> result of {what}, {a.runs} calls each, alternating on one server:")
            for label in lat:
                print(f"  {label:<11} p50 {out[f'{key}{label}_p50_ms']:6.1f} ms   p90 {out[f'{key}{label}_p90_ms']:6.1f} ms")
            for label in lat:
                if label != "upload":
                    ratio = out[f"{key}{label}_p50_ms"] / out[f"{key}upload_p50_ms"]  # type: ignore[operator]
                    out[f"{key}{label}_vs_upload_p50"] = ratio
                    print(f"  {label} / upload p50: {ratio:.2f}x")

        # -- tick lateness with a queue elsewhere ---------------------------------------------
        mljobs.create_compute_pool("QUEUE", instance_family="CPU_X64_XS", max_nodes=1, session=s)
        mljobs.alter_compute_pool("QUEUE", suspend=True, session=s)
        queued = mljobs.remote("QUEUE", stage_name="bench", session=s)(trivial)
        for i in range(a.queued):
            queued(i)
        db = home / "mljobs.db"
        size0 = _used_bytes(db)
        mljobs.create_schedule("TICK", defn, every="1s", args=(1,), concurrency="allow", session=s)
        time.sleep(a.ticks)
        mljobs.pause_schedule("TICK", session=s)
        runs = s.request("GET", "/jobs", params={"limit": 0, "schedule": "TICK"}).json()
        late = [(dt.datetime.fromisoformat(r["created_time"]) - dt.datetime.fromisoformat(r["scheduled_tick"]))
                .total_seconds() * 1e3 for r in runs]
        out["ticks"], out["lateness_p50_ms"], out["lateness_p99_ms"] = len(runs), statistics.median(late), pct(late, 0.99)
        print(f"\ntick lateness over {len(runs)} ticks of a 1 s schedule, {a.queued} jobs queued in another pool:")
        print(f"  p50 {out['lateness_p50_ms']:.1f} ms   p99 {out['lateness_p99_ms']:.1f} ms")
        for r in runs:
            mljobs.get_job(r["id"], session=s).wait()
        import sqlite3

        con = sqlite3.connect(db)
        events = con.execute("SELECT COUNT(*) FROM schedule_events WHERE schedule_name='TICK'").fetchone()[0]
        con.close()
        size1 = _used_bytes(db)
        per_tick = max(0, size1 - size0) / max(1, len(runs))
        out["store_bytes_per_tick"] = per_tick
        out["store_mb_per_day_1min"] = per_tick * 1440 / 1e6
        print(f"\nstore cost: per tick one transaction (the schedule's compare-and-set UPDATE, INSERT job, INSERT "
              f"job event, INSERT schedule event; {events} schedule events for {len(runs)} ticks), then the run's own "
              f"rows as any job's;\n  the SQLite store grew {per_tick:.0f} bytes a tick with the runs kept "
              f"(a 1-minute schedule: {out['store_mb_per_day_1min']:.2f} MB a day until TTL prunes its runs);"
              f"\n  the clock reads the store once a second while a schedule is active (two indexed SELECTs), every 5 s "
              f"while none is.")
    finally:
        srv.stop()
        shutil.rmtree(home, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
