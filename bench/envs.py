"""Submit -> result for a job with one small pip requirement: first time and cached, beside none.

    python bench/envs.py [--runs 10] [--ray]

mljobs, on a warm local server whose uv cache starts empty (UV_CACHE_DIR in a temp folder):
- cold: the very first job with the requirement (uv resolves and downloads from the index);
- first time: median over --runs of a job whose environment was just pruned (a new venv and an
  install from uv's now-warm download cache), as for a new requirement set of known packages;
- cached: median over --runs of the same job again (the environment is reused);
- none: the same job without requirements.
--ray: the peer, Ray's runtime_env={"pip": [...]} on a local Ray head inside a network namespace
this script creates (loopback only; needs root and iproute2): a task's first run with the
requirement, then the median of --runs cached runs, beside a task without it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _netns import run_ray_half  # noqa: E402 - the benchmarks' shared Ray-in-a-namespace runner

# Ray runs in a namespace without network, where pip finds only the machine's local index: pick a
# version that index has, so both sides install the same package.
REQ = "humanize==4.16.0"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_mljobs(runs: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import ServerProc  # the tests' real-server helper

    import mljobs

    home = Path(tempfile.mkdtemp(prefix="mljobs-bench-envs-"))
    srv = ServerProc(home, extra_env={"UV_CACHE_DIR": str(home / "uv-cache")})
    srv.start()
    try:
        s = mljobs.Session(url=srv.url)

        def job(reqs: list[str]):
            @mljobs.remote("DEFAULT_POOL", stage_name="bench", session=s, pip_requirements=reqs)
            def hello():
                try:
                    import humanize
                    return humanize.intcomma(1000)
                except ImportError:
                    return "1,000"

            return hello

        plain, with_req = job([]), job([REQ])
        plain().result()
        cold = _timed(lambda: with_req().result())
        first = []
        for _ in range(runs):
            mljobs.prune_environments(0, session=s)
            first.append(_timed(lambda: with_req().result()))
        cached = [_timed(lambda: with_req().result()) for _ in range(runs)]
        none = [_timed(lambda: plain().result()) for _ in range(runs)]
        return {"cold_ms": cold * 1e3, "first_ms": statistics.median(first) * 1e3,
                "cached_ms": statistics.median(cached) * 1e3, "none_ms": statistics.median(none) * 1e3}
    finally:
        srv.stop()
        shutil.rmtree(home, ignore_errors=True)


def ray_inner(runs: int) -> None:
    """Inside the namespace: a Ray head, then tasks with and without runtime_env pip."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ray-bench-")
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, _node_ip_address="127.0.0.1")

        @ray.remote
        def hello():
            try:
                import humanize
                return humanize.intcomma(1000)
            except ImportError:
                return "1,000"

        env = {"pip": [REQ]}
        ray.get(hello.remote())
        none = [_timed(lambda: ray.get(hello.remote())) for _ in range(runs)]
        first = _timed(lambda: ray.get(hello.options(runtime_env=env).remote()))
        cached = [_timed(lambda: ray.get(hello.options(runtime_env=env).remote())) for _ in range(runs)]
        print(json.dumps({"first_ms": first * 1e3, "cached_ms": statistics.median(cached) * 1e3,
                          "none_ms": statistics.median(none) * 1e3}))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--ray-inner", action="store_true")
    a = ap.parse_args()
    if a.ray_inner:
        ray_inner(a.runs)
        return
    m = bench_mljobs(a.runs)
    print(f"mljobs submit->result, {REQ}: cold (empty uv cache) {m['cold_ms']:.0f} ms; "
          f"first time (new venv) median {m['first_ms']:.0f} ms; cached median {m['cached_ms']:.0f} ms; "
          f"no requirements median {m['none_ms']:.0f} ms (cached adds {m['cached_ms'] - m['none_ms']:.0f} ms)")
    if a.ray:
        r = run_ray_half(__file__, ["--runs", str(a.runs)])
        if isinstance(r, str):
            print(f"Ray runtime_env pip: {r}")
        else:
            print(f"Ray task with runtime_env pip={REQ}: first {r['first_ms']:.0f} ms; cached median "
                  f"{r['cached_ms']:.0f} ms; no runtime_env median {r['none_ms']:.0f} ms")


if __name__ == "__main__":
    main()
