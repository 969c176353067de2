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
Lost-node detection (heartbeat timeout plus at most one 5 s monitor tick) is checked by
tests/integration/test_slurm.py.
"""

from __future__ import annotations

import argparse
import json
import os
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


def stamp_cmd(path: Path) -> str:
    return f"{sys.executable} -c 'import time; open(\"{path}\", \"w\").write(repr(time.time()))'"


def bench_sbatch(runs: int, tmp: Path) -> list[float]:
    out = []
    for r in range(runs):
        f = tmp / f"sbatch-{r}"
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


def bench_mljobs(runs: int, tmp: Path, address: str) -> tuple[list[float], list[float]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import ServerProc  # the tests' real-server helper

    import mljobs

    home = Path(tempfile.mkdtemp(prefix="mljobs-bench-slurm-"))
    env = dict(os.environ, MLJOBS_HOME=str(home))
    made = subprocess.run([sys.executable, "-m", "mljobs", "user", "create", "bench", "--admin"], env=env,
                          capture_output=True, text=True, check=True)
    token = made.stdout.strip().splitlines()[-1]
    srv = ServerProc(home, extra_env={"MLJOBS_DEFAULT_POOL": "0", "MLJOBS_TOKEN": ""},
                     args=["--host", address, "--port", "0"])
    srv.token = token
    srv.start()
    one, three = [], []
    try:
        s = mljobs.Session(url=srv.url, token=token)
        mljobs.create_compute_pool("HPC", instance_family="CPU_X64_XS", max_nodes=3, provider="slurm",
                                   provider_options={"shared_paths": [str(home), str(tmp)]}, session=s)
        for r in range(runs):
            f = tmp / f"mljobs-{r}"
            script = tmp / f"stamp{r}.py"
            script.write_text(f"import time\nopen({str(f)!r}, 'w').write(repr(time.time()))\n")
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
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mljobs-bench-stamps-"))
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
