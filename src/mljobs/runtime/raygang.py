"""The Ray driver of a multi-node job on an existing Ray cluster (the Ray provider's Ray job).

The Ray provider submits, for a job of ``k`` instances, one Ray job whose entrypoint is ::

    python -m mljobs.runtime.raygang --stage NAME --stage-url URL --job JOB_ID --python PY

It reads the job's launch document from the stage, reserves ``k`` nodes at once with a
``STRICT_SPREAD`` placement group (one bundle of the family's CPUs, GPUs and memory per instance,
each on a different node), and waits for it within the job's ``join_timeout_s``. Meanwhile it
heartbeats for every instance, with a line in the instance's log, so the control plane knows
they wait rather than are lost. If the reservation does not come in time every instance fails
with :class:`mljobs.errors.InstancesUnavailableError`, saying what the cluster has. Once placed
it runs one Ray task per bundle (``bundle_index=i``) that runs the node agent of instance ``i``
(:mod:`mljobs.runtime.agent`) as a subprocess and returns its exit code; the agent gets the host
cluster's GCS address in ``MLJOBS_RAY_ADDRESS`` (a job without ``parallel`` runs its payload on
that cluster, see :mod:`mljobs.providers.ray`).

Stopping: SIGTERM to this driver (Ray's ``stop_job``) cancels the tasks; a cancelled task sends
SIGTERM to its agent, which forwards it to its supervisor, which stops its whole tree. An agent
also gets SIGTERM from the kernel when its Ray worker dies (parent-death signal).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from mljobs.paths import StagePaths
from mljobs.runtime import launcher
from mljobs.runtime.agent import Reporter, Stop, Unreachable
from mljobs.stages import Stage

__all__ = ["main", "bundles"]

PR_SET_PDEATHSIG = 1
_WAIT_NOTE_S = 10.0  # how often the wait for the reservation is told in the instances' logs


def bundles(mn: dict[str, Any]) -> list[dict[str, float]]:
    """One bundle per instance: the family's CPUs, GPUs and memory."""
    one = {"CPU": float(mn["cpus"]), "memory": float(mn["memory_bytes"])}
    if mn.get("gpus"):
        one["GPU"] = float(mn["gpus"])
    return [dict(one) for _ in range(int(mn["count"]))]


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run_agent(cmd: list[str], env: dict[str, str], grace_s: float) -> int:
    """The body of an instance's Ray task: the agent as a subprocess, until it ends. A cancel
    (KeyboardInterrupt in the task) or a dying worker sends the agent SIGTERM."""
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)  # a loop, so that a cancel's KeyboardInterrupt lands
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        proc.terminate()
        try:
            return proc.wait(timeout=grace_s + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def _describe_cluster(ray: Any) -> str:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    free = ray.available_resources()
    parts = [f"{n.get('NodeManagerAddress')}: {n['Resources'].get('CPU', 0):g} CPUs, "
             f"{n['Resources'].get('memory', 0) / 2**30:.1f} GiB, {n['Resources'].get('GPU', 0):g} GPU(s)"
             for n in nodes]
    return (f"{len(nodes)} alive node(s) ({'; '.join(parts)}); free now: {free.get('CPU', 0):g} CPUs, "
            f"{free.get('memory', 0) / 2**30:.1f} GiB, {free.get('GPU', 0):g} GPU(s)")


def _fail_all(stage: Stage, job_id: str, reporters: list[Reporter], exc: BaseException) -> None:
    """Every instance ends with ``exc`` (its envelope on the stage, its exit record reported)."""
    envelope = launcher.exception_envelope(exc)
    for i, rep in enumerate(reporters):
        stage.put_bytes(StagePaths(job_id).instance_result(i), _envelope_bytes(envelope))
        rep.system(f"{envelope['exc_type']}: {envelope['exc_message']}")
        try:
            rep.send(exit={"exit_code": 1, "cancelled": False, "has_result": True,
                           "error": {"exc_type": envelope["exc_type"], "exc_message": envelope["exc_message"]}})
        except Stop:
            pass
        except Unreachable as e:
            print(f"mljobs raygang: could not report instance {i}'s failure: {e}", file=sys.stderr)


def _envelope_bytes(envelope: dict[str, Any]) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "result.pkl"
        launcher.write_envelope(path, envelope)
        return path.read_bytes()


def run(stage: Stage, job_id: str, python: str, grace_s: float) -> int:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from mljobs.errors import InstancesUnavailableError

    tpl = json.loads(stage.get_bytes(StagePaths(job_id).launch))
    mn = tpl["multinode"]
    k = int(mn["count"])
    url, token = tpl["env"]["MLJOBS_URL"], tpl["env"]["MLJOBS_TOKEN"]
    reporters = [Reporter(url, token, job_id, i) for i in range(k)]
    stopping = {"signal": False}

    def on_term(*_: Any) -> None:
        stopping["signal"] = True

    signal.signal(signal.SIGTERM, on_term)
    ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
    pg = placement_group(bundles(mn), strategy="STRICT_SPREAD", name=f"mljobs-{job_id}")
    deadline = float(mn["started_at"]) + float(mn["join_timeout_s"])
    heartbeat = float(tpl.get("heartbeat_s") or 5.0)
    said = beat = 0.0
    t0 = time.monotonic()
    try:
        while True:
            if pg.wait(timeout_seconds=0.5):
                break
            if stopping["signal"]:
                return 0  # cancelled while waiting: the server's cancel ends the instances
            now = time.monotonic()
            if now - beat >= heartbeat:
                note = now - said >= _WAIT_NOTE_S
                for i, rep in enumerate(reporters):
                    if note:
                        rep.system(f"instance {i}: waiting for the Ray cluster to reserve {k} nodes "
                                   f"(STRICT_SPREAD placement group), {now - t0:.0f} s so far")
                    try:
                        rep.send()
                    except Stop:
                        return 0
                    except Unreachable as e:  # the control plane is away: try again
                        print(f"mljobs raygang: heartbeat: {e}", file=sys.stderr)
                beat = now
                said = now if note else said
            # after the note: even a wait that outlasted the timeout before its first look is told
            if time.time() >= deadline:
                exc = InstancesUnavailableError(
                    f"the Ray cluster could not reserve {k} nodes of {mn['cpus']} CPUs, "
                    f"{mn['memory_bytes'] / 2**30:g} GiB and {mn['gpus']} GPU(s) each (a STRICT_SPREAD placement "
                    f"group: one node per instance) within join_timeout_s={mn['join_timeout_s']:g}; the cluster "
                    f"has {_describe_cluster(ray)}. Raise join_timeout_s, lower target_instances, or free nodes.")
                _fail_all(stage, job_id, reporters, exc)
                return 1
        task = ray.remote(run_agent)
        env = {"MLJOBS_RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        refs = [task.options(num_cpus=mn["cpus"], num_gpus=mn["gpus"] or 0, memory=mn["memory_bytes"], max_retries=0,
                             scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
                .remote([python, "-m", "mljobs.runtime.agent", "--stage", stage.name, "--stage-url", stage.url,
                         "--job", job_id, "--instance", str(i)], env, grace_s)
                for i in range(k)]
        cancelled_at = None
        # Until every agent has reported (the reply then carries the nodes' addresses), this
        # driver heartbeats for those whose task still runs: a Ray worker and an agent take
        # seconds to start on a busy node, and a task whose worker died is done here at once.
        covering = True
        while True:
            done, pending = ray.wait(refs, num_returns=k, timeout=0.5)
            if not pending:
                break
            now = time.monotonic()
            if covering and now - beat >= heartbeat and not stopping["signal"]:
                beat = now
                covering = time.time() < deadline
                for ref, rep in zip(refs, reporters):
                    if ref in pending and covering:
                        try:
                            covering = not rep.send().get("addresses")
                        except Stop:
                            covering = False
                        except Unreachable as e:
                            print(f"mljobs raygang: heartbeat: {e}", file=sys.stderr)
            if stopping["signal"] and cancelled_at is None:
                cancelled_at = time.monotonic()
                for ref in pending:
                    ray.cancel(ref)
            if cancelled_at is not None and time.monotonic() - cancelled_at > grace_s + 15:
                break
        codes = []
        for ref in refs:
            try:
                codes.append(ray.get(ref, timeout=0))
            except ray.exceptions.RayError:  # cancelled, or its worker died
                codes.append(None)
        print(f"mljobs raygang: agents ended with {codes}")
        return 0 if all(c == 0 for c in codes) else 1
    finally:
        try:
            remove_placement_group(pg)
        except ray.exceptions.RayError as e:  # Ray frees it with this driver's job anyway
            print(f"mljobs raygang: could not remove the placement group: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mljobs.runtime.raygang", description=__doc__.split("\n")[0])
    ap.add_argument("--stage", required=True)
    ap.add_argument("--stage-url", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs the agents on the nodes")
    ap.add_argument("--grace-period-s", type=float, default=3.0)
    args = ap.parse_args(argv)
    return run(Stage(args.stage, args.stage_url), args.job, args.python, args.grace_period_s)


if __name__ == "__main__":
    sys.exit(main())
