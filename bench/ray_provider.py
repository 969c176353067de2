"""Submit -> result of a trivial job on a Ray pool, beside Ray's own job API on the same cluster.

    python bench/ray_provider.py [--runs 10]

One real 3-node Ray cluster (tests/raycluster.py: each node a network namespace on a bridge of
its own, 2 CPUs each) and an mljobs server in one more namespace on that bridge; both halves run
from a thread inside that namespace, so they pay the same network.

- mljobs: ``@remote("RAYPOOL")`` of ``lambda: 1`` (CPU_X64_XS), timed from just before the call
  to ``job.result()`` returning the value (submit, Ray job, agent, supervisor, result envelope
  back through the stage).
- Ray alone: ``JobSubmissionClient.submit_job(entrypoint="python -c 'print(1)'",
  entrypoint_num_cpus=1)`` polled with ``get_job_status`` every 50 ms until SUCCEEDED (Ray
  returns no value; this is its floor for "the trivial thing ran").

Needs root, iproute2 and nsenter.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests import raycluster  # noqa: E402
from tests.integration.test_ray_provider import POOL, Env, NsServer  # noqa: E402


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    reason = raycluster.unavailable_reason()
    if reason:
        print(f"skipped: {reason}")
        return
    import mljobs

    cluster = raycluster.RayCluster(nodes=3, cpus=2)
    cluster.start()
    ns = raycluster.NsThread(cluster.srv_ns)
    home = Path(tempfile.mkdtemp(prefix="mljray-bench-"))
    server = NsServer(home, cluster, ns)
    try:
        server.start()
        env = Env(cluster, server, ns)
        env.connect()
        ns(mljobs.create_compute_pool, POOL, instance_family="CPU_X64_XS", max_nodes=3, provider="ray",
           provider_options=env.options(), session=env.session)

        def mljobs_once() -> float:
            t = time.perf_counter()
            job = mljobs.remote(POOL, stage_name="st", session=env.session)(lambda: 1)()
            assert job.result(timeout=120) == 1
            return time.perf_counter() - t

        def ray_once(client) -> float:
            t = time.perf_counter()
            sid = client.submit_job(entrypoint=f"{shlex.quote(sys.executable)} -c 'print(1)'", entrypoint_num_cpus=1)
            while (status := client.get_job_status(sid).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
                time.sleep(0.05)
            assert status == "SUCCEEDED", status
            return time.perf_counter() - t

        def ray_client():
            from ray.job_submission import JobSubmissionClient

            return JobSubmissionClient(cluster.dashboard_url)

        client = ns(ray_client)
        ns(mljobs_once), ns(ray_once, client)  # warm-up: imports, worker processes
        mine, ray = [], []
        for _ in range(args.runs):  # interleaved, so that load on the machine hits both alike
            mine.append(ns(mljobs_once))
            ray.append(ns(ray_once, client))
        print(f"{'':36} {'median':>8} {'p90':>8}   (runs={args.runs}, seconds)")
        print(f"{'mljobs Ray pool: submit -> result':36} {statistics.median(mine):8.2f} {_p90(mine):8.2f}")
        print(f"{'Ray job API: submit -> SUCCEEDED':36} {statistics.median(ray):8.2f} {_p90(ray):8.2f}")
    finally:
        server.stop()
        ns.close()
        left = cluster.stop()
        shutil.rmtree(home, ignore_errors=True)
        if left:
            print(f"warning: left running: {left}")


if __name__ == "__main__":
    main()
