"""Submit -> payload start of multi-node jobs, beside the bare cost of starting the same Ray nodes.

    python bench/multinode.py [--runs 5] [--sizes 1,2,3] [--family CPU_X64_S]

mljobs: a `remote` function with target_instances=N returns time.time() as its first statement;
the figure is that minus the time just before the submit (one clock, one machine), median of
--runs. The server runs as root, so every instance is its own network namespace on a bridge.

Floor: the same N nodes by hand, in N namespaces on a bridge made here (the same topology):
`ray start --head` in the first and, as soon as its GCS port answers, `ray start --address` in
the others at once; the figure is the time until every `ray start` has returned. Each node gets
the family's CPUs and memory, as mljobs gives them. A 1-instance mljobs job starts no Ray at
all, so its row shows what a single-node job costs, not a Ray start.

Needs root and iproute2 (Ray binds all interfaces: it must stay in namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mljobs.providers import netns  # noqa: E402
from mljobs.spec import INSTANCE_FAMILIES  # noqa: E402


def _wait_port(ns: str, host: str, port: int, deadline: float) -> None:
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=0.3).close()"
    while time.time() < deadline:
        if subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"GCS at {host}:{port} did not open")


def floor_once(n: int, family: str) -> float:
    fam = INSTANCE_FAMILIES[family]
    tag = "MLJOB_" + uuid.uuid4().hex.upper()  # the provider's naming, so leftovers are easy to find
    addrs = netns.create(tag, n)
    tmp = [tempfile.mkdtemp(prefix="mljr-", dir="/tmp") for _ in range(n)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    common = [f"--num-cpus={fam.cpus}", f"--memory={fam.memory_bytes}", "--disable-usage-stats",
              f"--object-store-memory={min(2 << 30, int(fam.memory_bytes * 0.3))}"]
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start"]
    try:
        t0 = time.time()
        head = subprocess.Popen(["ip", "netns", "exec", netns.namespace(tag, 0), *ray, "--head", "--port=6379",
                                 f"--node-ip-address={addrs[0]}", f"--temp-dir={tmp[0]}", *common],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        workers = []
        if n > 1:
            _wait_port(netns.namespace(tag, 1), addrs[0], 6379, t0 + 120)
            workers = [subprocess.Popen(["ip", "netns", "exec", netns.namespace(tag, i), *ray,
                                         f"--address={addrs[0]}:6379", f"--node-ip-address={addrs[i]}",
                                         f"--temp-dir={tmp[i]}", *common],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
                       for i in range(1, n)]
        codes = [p.wait(180) for p in [head, *workers]]
        took = time.time() - t0
        if any(codes):
            raise RuntimeError(f"ray start failed: exit codes {codes}")
        return took
    finally:
        netns.delete(tag)
        for d in tmp:
            subprocess.run(["rm", "-rf", d])


def mljobs_runs(sizes: list[int], runs: int, family: str) -> dict[int, list[float]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import ServerProc  # the tests' real-server helper

    import mljobs

    home = Path(tempfile.mkdtemp(prefix="mljobs-bench-"))
    srv = ServerProc(home)
    srv.start()
    out: dict[int, list[float]] = {}
    try:
        s = mljobs.Session(url=srv.url)
        mljobs.create_compute_pool("BENCH", instance_family=family, max_nodes=max(sizes), session=s)
        for n in sizes:
            @mljobs.remote("BENCH", stage_name="bench", target_instances=n, session=s)
            def started() -> float:
                import time as t

                return t.time()

            out[n] = []
            for _ in range(runs):
                t0 = time.time()
                job = started()
                out[n].append(job.result(timeout=300) - t0)
    finally:
        srv.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="1,2,3")
    ap.add_argument("--family", default="CPU_X64_S")
    a = ap.parse_args()
    reason = netns.unavailable_reason()
    if reason:
        sys.exit(f"bench/multinode.py needs network namespaces: {reason}")
    sizes = [int(x) for x in a.sizes.split(",")]
    ours = mljobs_runs(sizes, a.runs, a.family)
    rows = []
    for n in sizes:
        floor = [floor_once(n, a.family) for _ in range(a.runs)]
        m, f = statistics.median(ours[n]), statistics.median(floor)
        rows.append({"instances": n, "mljobs_submit_to_payload_s": round(m, 2), "ray_start_floor_s": round(f, 2),
                     "ratio": round(m / f, 2), "mljobs_runs": [round(x, 2) for x in ours[n]],
                     "floor_runs": [round(x, 2) for x in floor]})
    for r in rows:
        print(f"{r['instances']} instance(s): mljobs submit->payload {r['mljobs_submit_to_payload_s']:.2f} s, "
              f"bare ray start {r['ray_start_floor_s']:.2f} s, ratio {r['ratio']:.2f}")
    print(json.dumps({"family": a.family, "runs": a.runs, "cpus": os.cpu_count(), "host": socket.gethostname(),
                      "rows": rows}))


if __name__ == "__main__":
    main()
