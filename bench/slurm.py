"""The Slurm provider against Slurm itself, on the same cluster, side by side.

    scripts/slurm-cluster up
    scripts/slurm-cluster exec -- .venv/bin/python bench/slurm.py [--runs 10]

Run inside the controller's network namespace (``exec``), where ``sbatch`` reaches slurmctld and
the nodes reach the control plane this script starts (bound to the namespace's address).

- one node: submit -> payload start of a one-node mljobs job (``submit_file``), against
  ``sbatch --wrap`` of the same command (same CPUs and memory) to its start. Start = the payload's
  first statement writes ``time.time()`` to a file (one machine, one clock).
- three nodes: submit -> payload start of a 3-instance Ray job (the payload starts once the head
  sees 3 Ray nodes), against a bare allocation that ``srun``s ``ray start`` on the same 3 nodes and
  waits until the head sees 3 nodes.
- --instances N (with nodes advertised big enough, e.g. MLJOBS_SLURM_NODE_CPUS=34
  MLJOBS_SLURM_NODE_MEMORY_MB=70000 scripts/slurm-cluster up): the control plane's resident memory
  while N one-node jobs run and report (every agent a heartbeat each 5 s).
- --lost: the time from a node's death (its slurmd and the job's processes SIGKILLed) to the job
  ending INTERNAL_ERROR, with MLJOBS_HEARTBEAT_TIMEOUT_S=--heartbeat-timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _wait_file(path: Path, timeout: float = 120.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text().strip()
            if text:
                return float(text)
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise TimeoutError(f"{path} never written")


def _squeue_empty(timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            raise TimeoutError("the queue did not drain")
        time.sleep(0.1)


def _random_phase() -> None:
    """Slurm starts batch jobs on a cycle of about a second: a submission made right after the last
    job ended always lands at the same phase of it. A random 0-1 s pause before each one (both
    sides) samples the phase instead."""
    time.sleep(random.uniform(0.0, 1.0))


def stamp_cmd(path: Path) -> str:
    return f"{sys.executable} -c 'import time; open(\"{path}\", \"w\").write(repr(time.time()))'"


def bench_sbatch(runs: int, tmp: Path) -> list[float]:
    out = []
    for r in range(runs):
        f = tmp / f"sbatch-{r}"
        _random_phase()
        t0 = time.time()
        subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1",
                        "--mem=2048M", "--output=/dev/null", f"--wrap={stamp_cmd(f)}"], check=True,
                       capture_output=True)
        out.append(_wait_file(f) - t0)
        _squeue_empty()
    return out


RAY_BARE = textwrap.dedent("""\
    #!/bin/bash
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
    headip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname -I | awk '{print $1}')
    srun --nodes=1 --ntasks=1 -w "$head" bash -c "ray start --head --node-ip-address=$headip --port=6379 \
        --temp-dir=/tmp/rb-\\$SLURM_NODEID --num-cpus=1 --include-dashboard=false --block" &
    srun --nodes=2 --ntasks=2 --exclude="$head" bash -c "ray start --address=$headip:6379 \
        --node-ip-address=\\$(hostname -I | awk '{print \\$1}') --temp-dir=/tmp/rb-\\$SLURM_NODEID \
        --num-cpus=1 --block" &
    RAY_ADDRESS=$headip:6379 {python} -c "
    import ray, time
    ray.init(address='$headip:6379')
    while len([n for n in ray.nodes() if n['Alive']]) < 3: time.sleep(0.05)
    open('{stamp}', 'w').write(repr(time.time()))
    "
    scancel --signal=TERM "$SLURM_JOB_ID"
    """)


def bench_ray_bare(runs: int, tmp: Path) -> list[float]:
    out = []
    ray_bin = str(Path(sys.executable).parent)
    for r in range(runs):
        f = tmp / f"raybare-{r}"
        script = RAY_BARE.replace("{python}", sys.executable).replace("{stamp}", str(f))
        t0 = time.time()
        subprocess.run(["sbatch", "--parsable", "--nodes=3", "--ntasks-per-node=1", "--cpus-per-task=1",
                        "--mem=2048M", "--output=/dev/null",
                        f"--export=ALL,PATH={ray_bin}:{os.environ['PATH']}"], input=script, text=True, check=True,
                       capture_output=True)
        out.append(_wait_file(f, 180) - t0)
        subprocess.run(["scancel", "--user=root"], check=False)
        _squeue_empty()
    return out


def _server(address: str, max_nodes: int, tmp: Path, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """A control plane bound to ``address`` with an admin, and a Slurm pool HPC."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import ServerProc  # the tests' real-server helper

    import mljobs

    home = Path(tempfile.mkdtemp(prefix="mljobs-bench-slurm-"))
    made = subprocess.run([sys.executable, "-m", "mljobs", "user", "create", "bench", "--admin"],
                          env=dict(os.environ, MLJOBS_HOME=str(home)), capture_output=True, text=True, check=True)
    token = made.stdout.strip().splitlines()[-1]
    srv = ServerProc(home, extra_env={"MLJOBS_DEFAULT_POOL": "0", "MLJOBS_TOKEN": "", **(env or {})},
                     args=["--host", address, "--port", "0"])
    srv.token = token
    srv.start()
    s = mljobs.Session(url=srv.url, token=token)
    mljobs.create_compute_pool("HPC", instance_family="CPU_X64_XS", max_nodes=max_nodes, provider="slurm",
                               # the payloads write their stamps into tmp: a sandbox sees it only as a mount
                               provider_options={"shared_paths": [str(home), str(tmp)], "mounts": [f"{tmp}:rw"]},
                               session=s)
    return srv, s


def bench_memory(n: int, tmp: Path, address: str) -> dict[str, float]:
    import psutil

    import mljobs

    srv, s = _server(address, n, tmp)
    try:
        script = tmp / "idle.py"
        script.write_text("import time\nprint('up', flush=True)\ntime.sleep(600)\n")
        proc = psutil.Process(srv.proc.pid)
        idle = proc.memory_info().rss
        jobs = [mljobs.submit_file(str(script), "HPC", stage_name="bench", session=s) for _ in range(n)]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            up = sum("up" in j.get_logs() for j in jobs)
            print(f"{up}/{n} instances up, server rss {proc.memory_info().rss / 2**20:.0f} MiB", flush=True)
            if up == n:
                break
            time.sleep(2)
        samples = []
        for _ in range(15):  # three heartbeat rounds
            samples.append(proc.memory_info().rss)
            time.sleep(1)
        for j in jobs:
            j.cancel()
        for j in jobs:
            j.wait(120)
        return {"instances_running": up, "server_rss_idle_mib": idle / 2**20,
                "server_rss_with_instances_mib": max(samples) / 2**20}
    finally:
        srv.stop()


def bench_lost(tmp: Path, address: str, timeout_s: float) -> float:
    import psutil

    import mljobs
    from slurm_cluster import Cluster

    srv, s = _server(address, 1, tmp, {"MLJOBS_HEARTBEAT_TIMEOUT_S": str(timeout_s)})
    try:
        script = tmp / "doomed.py"
        script.write_text("import time\nprint('up', flush=True)\ntime.sleep(600)\n")
        job = mljobs.submit_file(str(script), "HPC", stage_name="bench", session=s)
        while "up" not in job.get_logs():
            time.sleep(0.2)
        host = next(n for n in Cluster().nodes if f"on {n} (" in job.get_logs(verbose=True))
        Cluster().kill_node(host)
        for p in psutil.process_iter(["cmdline"]):
            if job.id in " ".join(p.info["cmdline"] or []):
                p.kill()
        t0 = time.monotonic()
        job.wait(timeout_s + 60)
        took = time.monotonic() - t0
        Cluster().restart_node(host)
        return took
    finally:
        srv.stop()


def bench_mljobs(runs: int, tmp: Path, address: str) -> tuple[list[float], list[float]]:
    import mljobs

    srv, s = _server(address, 3, tmp)
    one, three = [], []
    try:
        for r in range(runs):
            f = tmp / f"mljobs-{r}"
            script = tmp / f"stamp{r}.py"
            script.write_text(f"import time\nopen({str(f)!r}, 'w').write(repr(time.time()))\n")
            _random_phase()
            t0 = time.time()
            job = mljobs.submit_file(str(script), "HPC", stage_name="bench", session=s)
            one.append(_wait_file(f) - t0)
            job.wait(60)
        for r in range(max(1, runs // 3)):
            f = tmp / f"mljobs3-{r}"
            script = tmp / f"ray{r}.py"
            script.write_text(f"import time\nopen({str(f)!r}, 'w').write(repr(time.time()))\n")
            t0 = time.time()
            job = mljobs.submit_file(str(script), "HPC", stage_name="bench", target_instances=3, session=s)
            three.append(_wait_file(f, 180) - t0)
            job.wait(120)
    finally:
        srv.stop()
    return one, three


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--address", default="10.213.0.1", help="the controller namespace's address")
    ap.add_argument("--instances", type=int, default=0, help="only: control-plane memory with N running instances")
    ap.add_argument("--lost", action="store_true", help="only: lost-node detection time")
    ap.add_argument("--heartbeat-timeout", type=float, default=30.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mljobs-bench-stamps-"))
    tmp.chmod(0o1777)  # the payloads write their stamps here under a uid of their owner's own (a sandbox)
    sys.path.insert(0, str(ROOT / "scripts"))
    if args.instances:
        print(json.dumps(bench_memory(args.instances, tmp, args.address), indent=1))
        return
    if args.lost:
        took = bench_lost(tmp, args.address, args.heartbeat_timeout)
        print(f"lost node detected after {took:.1f} s (MLJOBS_HEARTBEAT_TIMEOUT_S={args.heartbeat_timeout:g}, "
              "the monitor looks every 5 s)")
        return
    ml1, ml3 = bench_mljobs(args.runs, tmp, args.address)
    sb = bench_sbatch(args.runs, tmp)
    rb = bench_ray_bare(max(1, args.runs // 3), tmp)
    rows = {"mljobs 1 node: submit -> payload start": ml1, "sbatch --wrap: submit -> start": sb,
            "mljobs 3-node Ray job: submit -> payload start": ml3, "bare srun ray start x3: submit -> 3 nodes": rb}
    print(json.dumps({k: {"median_s": round(statistics.median(v), 3), "p90_s": round(pct(v, 0.9), 3), "n": len(v)}
                      for k, v in rows.items()}, indent=1))
    print(f"one node: {statistics.median(ml1) / statistics.median(sb):.2f}x sbatch "
          f"(+{statistics.median(ml1) - statistics.median(sb):.2f} s); three nodes: "
          f"{statistics.median(ml3) / statistics.median(rb):.2f}x bare srun ray start")


if __name__ == "__main__":
    main()
