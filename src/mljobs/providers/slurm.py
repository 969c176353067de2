"""The Slurm provider: a pool is a Slurm partition; a job is one allocation.

``create_compute_pool("HPC", instance_family="CPU_X64_S", max_nodes=3, provider="slurm",
provider_options={"partition": "debug"})``. Each mljobs job is one ``sbatch`` allocation named
``mljobs-<job id>``: ``--nodes`` (the job's instances), one task per node, the family's CPUs
(``--cpus-per-task``), memory (``--mem``) and GPUs (``--gres=gpu:N``). Its batch step is one
``srun`` that starts :mod:`mljobs.runtime.agent` on every node; task ``SLURM_PROCID`` is instance
that number, 0 the head. The agents report over HTTP (:mod:`mljobs.providers.remote`); Slurm is
the engine's view: ``squeue`` says whether an allocation waits, runs or is gone; ``sacct``, where
accounting is enabled, says why it ended.

Cancel asks the agents, then ``scancel --signal=TERM`` (every process of the agents' step gets
SIGTERM; the supervisors stop their trees and the agents report the exit), and after the grace
period a plain ``scancel``, which kills what is left (with ``proctrack/cgroup``, the whole tree). After a server restart,
allocations are found again by name. The server runs ``sinfo``, ``sbatch``, ``squeue``,
``scancel`` (and ``sacct``) itself, so it must run where those reach the cluster's controller.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from mljobs.errors import InvalidArgumentError
from mljobs.providers.base import InstanceHandle, InstanceLaunch, UnsupportedError, check_options
from mljobs.providers.remote import ENGINE_GONE, ENGINE_PENDING, ENGINE_RUNNING, RemoteProvider
from mljobs.runtime import sandbox
from mljobs.spec import GIB, InstanceFamily, JobSpec, PoolSpec

__all__ = ["SlurmProvider", "parse_sinfo", "job_name"]

log = logging.getLogger("mljobs.server")

_PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
_VIEW_TTL_S = 2.0  # one squeue serves every poll within this long
_PREFIX = "mljobs-"
# The server's variables a job's allocation gets (the rest, tokens and database URLs included, stay)
_EXPORT = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "MLJOBS_NODE_DIR")


def job_name(job_id: str, attempt: int = 1) -> str:
    """The allocation's name: one per attempt (a retry's must not be taken for the last attempt's,
    which Slurm may still list while it ends)."""
    return _PREFIX + job_id + (f".{attempt}" if attempt > 1 else "")


def _job_of(name: str) -> str:
    return name.removeprefix(_PREFIX).split(".")[0]


def parse_sinfo(text: str) -> list[dict[str, Any]]:
    """``sinfo -h -o '%P|%D|%c|%m|%G|%a'`` lines as {partition, default, nodes, cpus, memory_mb, gpus, up}."""
    rows = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 6:
            continue
        part, nodes, cpus, mem, gres, avail = parts
        gpus = 0
        for item in gres.split(","):  # gpu:2, gpu:a100:4, gpu:a100:4(S:0-1)
            fields = item.split("(")[0].split(":")
            if fields[0] == "gpu" and fields[-1].isdigit():
                gpus = max(gpus, int(fields[-1]))
        rows.append({"partition": part.rstrip("*"), "default": part.endswith("*"), "nodes": int(nodes),
                     "cpus": int(cpus.rstrip("+")), "memory_mb": int(mem.rstrip("+")), "gpus": gpus, "up": avail == "up"})
    return rows


def _fits(row: dict[str, Any], fam: InstanceFamily) -> bool:
    return row["cpus"] >= fam.cpus and row["memory_mb"] * (1 << 20) >= fam.memory_bytes and row["gpus"] >= fam.gpus


class SlurmProvider(RemoteProvider):
    name = "slurm"
    OPTIONS: ClassVar[dict[str, str]] = {
        "partition": "the Slurm partition (default: the cluster's default partition)",
        "account": "sbatch --account",
        "qos": "sbatch --qos",
        "time_limit": "sbatch --time, e.g. '2:00:00'",
        "sbatch_args": "more sbatch flags, a list of strings, e.g. ['--exclusive']",
        "output": "where an allocation's own stdout/stderr go on the nodes (default /dev/null; %j is its id)",
        "mounts": "folders of the nodes that a sandboxed job sees (an admin's to set), each 'PATH' (read-only) or "
                  "'PATH:rw', e.g. ['/data', '/scratch:rw']",
        **RemoteProvider.COMMON_OPTIONS,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._submit_lock = threading.Lock()
        self._view: dict[str, tuple[str, str]] = {}  # job name -> (slurm id, state)
        self._view_at = 0.0
        self._view_lock = threading.Lock()

    # -- the engine's commands ------------------------------------------------------------------
    def _run(self, args: list[str], *, stdin: str | None = None, timeout: float = 60.0) -> str:
        """Run a Slurm command; its failure is an InvalidArgumentError quoting the command and its error."""
        cmd = " ".join(shlex.quote(a) for a in args)
        if shutil.which(args[0]) is None:
            raise InvalidArgumentError(f"`{args[0]}` is not installed on the server, so it cannot reach a Slurm "
                                       "cluster; run the server on a Slurm login node (with slurm-client)")
        try:
            out = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise InvalidArgumentError(f"`{cmd}` did not answer in {timeout:g} s: is slurmctld up?") from None
        if out.returncode != 0:
            raise InvalidArgumentError(f"`{cmd}` failed (exit {out.returncode}): "
                                       f"{(out.stderr or out.stdout).strip()[:1000]}")
        return out.stdout

    def _partition(self, pool: PoolSpec) -> tuple[str, list[dict[str, Any]]]:
        """The pool's partition and its node groups as sinfo reports them."""
        want = pool.provider_options.get("partition")
        rows = parse_sinfo(self._run(["sinfo", "-h", "-o", "%P|%D|%c|%m|%G|%a"]))
        if not rows:
            raise InvalidArgumentError("`sinfo` lists no partitions: the Slurm cluster has no nodes configured")
        names = sorted({r["partition"] for r in rows})
        if want is None:
            want = next((r["partition"] for r in rows if r["default"]), None)
            if want is None:
                raise InvalidArgumentError(f"compute pool {pool.name}: the cluster has no default partition; name one "
                                           f"with provider_options={{'partition': ...}} (it has {names})")
        mine = [r for r in rows if r["partition"] == want]
        if not mine:
            raise InvalidArgumentError(f"compute pool {pool.name}: Slurm partition {want!r} does not exist; "
                                       f"`sinfo` lists {names}")
        return want, mine

    # -- pools and jobs -------------------------------------------------------------------------
    def validate_pool(self, pool: PoolSpec) -> None:
        check_options(self.name, pool, self.OPTIONS)
        try:  # the form only: the folders are the nodes' (a missing one fails the job's sandbox, named)
            sandbox.parse_mounts(pool.provider_options.get("mounts"), pool.name, local=False)
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from None
        extra = pool.provider_options.get("sbatch_args", [])
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise InvalidArgumentError(f"compute pool {pool.name}: sbatch_args must be a list of strings, got {extra!r}")
        self.check_reachable(pool, self.settings.advertise_url or "")
        part, rows = self._partition(pool)
        fam = pool.family
        if not any(_fits(r, fam) for r in rows):
            found = "; ".join(f"{r['nodes']} node(s) with {r['cpus']} CPUs, {r['memory_mb'] / 1024:.1f} GiB, "
                              f"{r['gpus']} GPU(s)" for r in rows)
            raise InvalidArgumentError(
                f"compute pool {pool.name}: {fam.name} needs {fam.cpus} CPUs, {fam.memory_bytes / GIB:g} GiB and "
                f"{fam.gpus} GPU(s) per node, but no node of Slurm partition {part!r} is that big ({found}); "
                "choose a smaller instance family or another partition")

    def check_job(self, spec: JobSpec, pool: PoolSpec, stage_url: str) -> None:
        super().check_job(spec, pool, stage_url)
        part, rows = self._partition(pool)
        fit = sum(r["nodes"] for r in rows if _fits(r, pool.family))
        if spec.target_instances > fit:
            raise InvalidArgumentError(
                f"target_instances={spec.target_instances}, but Slurm partition {part!r} has {fit} node(s) that fit "
                f"{pool.family.name}; lower target_instances or use a larger partition")

    # -- instances ------------------------------------------------------------------------------
    def launch_template(self, launch: InstanceLaunch, options: dict[str, Any]) -> dict[str, Any]:
        doc = super().launch_template(launch, options)
        if launch.instance_count > 1 and not launch.spec.parallel:  # workers hear "release" soon
            doc["heartbeat_s"] = min(doc["heartbeat_s"], 1.0)
        return doc

    def start(self, launch: InstanceLaunch) -> InstanceHandle:
        pool = launch.pool
        assert pool is not None
        opts = pool.provider_options
        with self._submit_lock:
            alloc = self.allocation(launch.job_id)
            if alloc is None:
                if launch.instance_id > 0:
                    raise UnsupportedError("a Slurm allocation cannot grow: late instances do not join a running job")
                alloc = self._submit(launch, opts)
        return self.handle_for(launch.job_id, launch.instance_id, alloc)

    def handle_for(self, job_id: str, instance_id: int, alloc: dict[str, Any]) -> InstanceHandle:
        handle = super().handle_for(job_id, instance_id, alloc)
        handle.extra["slurm_job_id"] = alloc["id"]
        handle.extra["slurm_job_name"] = alloc.get("name") or job_name(job_id)
        return handle

    def _submit(self, launch: InstanceLaunch, opts: dict[str, Any]) -> dict[str, Any]:
        """sbatch the job's allocation, unless one named for it exists already (a retry)."""
        name = job_name(launch.job_id, launch.attempt)
        found = self._squeue(force=True).get(name)
        stage = {"name": launch.stage.name, "url": launch.stage.url}
        if found is None:
            self.write_launch(launch, opts)
            fam, k = launch.family, launch.instance_count
            low = min(launch.spec.effective_min_instances, k)  # min_instances: Slurm's node range
            args = ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={low}-{k}" if low < k else f"--nodes={k}",
                    "--ntasks-per-node=1",
                    f"--cpus-per-task={fam.cpus}", f"--mem={fam.memory_bytes >> 20}M",
                    f"--output={opts.get('output') or '/dev/null'}", "--export=" + ",".join(_EXPORT)]
            if fam.gpus:
                args.append(f"--gres=gpu:{fam.gpus}")
            for opt, flag in (("partition", "--partition"), ("account", "--account"), ("qos", "--qos"),
                              ("time_limit", "--time")):
                if opts.get(opt):
                    args.append(f"{flag}={opts[opt]}")
            args += list(opts.get("sbatch_args") or [])
            slurm_id = self._run(args, stdin=self._script(launch, opts)).strip().split(";")[0]
            self._invalidate()
        else:
            slurm_id = found[0]
        alloc = {"id": slurm_id, "count": launch.instance_count, "stage": stage, "name": name}
        self.save_allocation(launch.job_id, alloc)
        return alloc

    def _script(self, launch: InstanceLaunch, opts: dict[str, Any]) -> str:
        python = opts.get("python") or sys.executable
        agent = [python, "-m", "mljobs.runtime.agent", "--stage", launch.stage.name, "--stage-url", launch.stage.url,
                 "--job", launch.job_id]
        return ("#!/bin/sh\n"
                f"# mljobs job {launch.job_id}: one agent per node; instance = SLURM_PROCID, 0 the head\n"
                'exec srun --kill-on-bad-exit=0 --ntasks-per-node=1 --nodes="$SLURM_JOB_NUM_NODES" '
                '--ntasks="$SLURM_JOB_NUM_NODES" ' + " ".join(shlex.quote(a) for a in agent) + "\n")

    # -- the engine's view ----------------------------------------------------------------------
    def _invalidate(self) -> None:
        with self._view_lock:
            self._view_at = 0.0

    def _squeue(self, force: bool = False) -> dict[str, tuple[str, str]]:
        """mljobs' allocations in the queue: job name -> (Slurm id, state); one squeue a while."""
        with self._view_lock:
            if force or time.monotonic() - self._view_at > _VIEW_TTL_S:
                out = self._run(["squeue", "-h", "-o", "%i|%j|%T"], timeout=30)
                view = {}
                for line in out.splitlines():
                    sid, _, rest = line.strip().partition("|")
                    name, _, state = rest.partition("|")
                    if name.startswith(_PREFIX):
                        view[name] = (sid, state)
                self._view, self._view_at = view, time.monotonic()
            return dict(self._view)

    def engine_state(self, handle: InstanceHandle) -> str | None:
        try:
            found = self._squeue().get(str(handle.extra.get("slurm_job_name") or job_name(handle.job_id)))
        except InvalidArgumentError as e:
            log.warning("slurm: %s", e)
            return None
        if found is None or found[0] != str(handle.extra.get("slurm_job_id")):
            return ENGINE_GONE
        return ENGINE_PENDING if found[1] in _PENDING else ENGINE_RUNNING

    def engine_detail(self, handle: InstanceHandle) -> str:
        """How Slurm says the allocation ended (sacct), or why it cannot say."""
        sid = str(handle.extra.get("slurm_job_id"))
        try:
            out = self._run(["sacct", "-n", "-X", "-P", "-j", sid, "-o", "State,ExitCode,NodeList"], timeout=15)
        except InvalidArgumentError as e:
            return f"sacct cannot say why ({str(e)[:200]})"
        line = out.strip().splitlines()[0] if out.strip() else ""
        return f"sacct: {line}" if line else "sacct has no record of it"

    # -- stopping -------------------------------------------------------------------------------
    def cancel(self, handle: InstanceHandle, grace_period_s: float) -> bool:
        self.ask(handle, "cancel")
        ended = self._cancel_unstarted(handle)
        sid = str(handle.extra.get("slurm_job_id"))
        if handle.instance_id != 0:  # one signal per allocation: instance 0's cancel sends it
            return ended
        if ended and not self._any_started(handle.job_id):
            # nothing of the job runs (the allocation is pending, or its nodes start Python): end
            # it now, as a signal would not reach a pending allocation
            try:
                self._run(["scancel", sid], timeout=30)
            except InvalidArgumentError as e:
                log.warning("slurm: %s", e)
            self._invalidate()
            return True
        try:
            # the steps' processes only: srun (the batch step) would end the step at once on SIGTERM
            self._run(["scancel", "--signal=TERM", sid], timeout=30)
        except InvalidArgumentError as e:
            log.warning("slurm: %s", e)

        def force() -> None:  # what the supervisors did not stop in the grace period
            try:
                self._run(["scancel", sid], timeout=30)
            except InvalidArgumentError as e:
                log.warning("slurm: %s", e)
            self._invalidate()

        t = threading.Timer(grace_period_s + 5.0, force)
        t.daemon = True
        t.start()
        return ended

    def finish_job(self, job_id: str) -> None:
        """Every instance has reported its end: end the allocation if Slurm still has it."""
        alloc = self.allocation(job_id)
        if alloc is None:
            return
        try:
            found = self._squeue(force=True).get(alloc.get("name") or job_name(job_id))
            if found is not None and found[0] == str(alloc["id"]):
                self._run(["scancel", str(alloc["id"])], timeout=30)
        except InvalidArgumentError as e:
            log.warning("slurm: job %s: %s", job_id, e)
        self._invalidate()

    def sweep(self, ended: Callable[[str], bool]) -> list[str]:
        """After a server start: cancel allocations of jobs that ended while it was away."""
        try:
            view = self._squeue(force=True)
        except InvalidArgumentError as e:
            log.warning("slurm: %s", e)
            return []
        done = []
        for name, (sid, _) in view.items():
            job_id = _job_of(name)
            if ended(job_id):
                self._run(["scancel", sid], timeout=30)
                done.append(job_id)
        return done

    def containment(self) -> str:
        return ("Slurm: one allocation per job; its cgroups (proctrack/cgroup) hold every process; scancel ends "
                "it; the supervisor on each node watches resident memory against the family's limit")
