"""The Ray provider: a pool is an existing Ray cluster; a job is one Ray job on it.

``create_compute_pool("RAYPOOL", instance_family="CPU_X64_XS", max_nodes=3, provider="ray",
provider_options={"address": "http://HEAD:8265", "shared_paths": ["/shared/mljobs"]})``. The
server talks to the cluster only through its job server (the dashboard's REST API, with
``ray.job_submission.JobSubmissionClient``): no Ray Client, no driver in the server. Every mljobs
job is one Ray job whose ``submission_id`` is ``mljobs-<job id>``, so a retried submit finds the
first one ("already exists") instead of starting a second, and a restarted server finds its
jobs again by name.

- One instance: the Ray job's entrypoint is the node agent itself
  (``python -m mljobs.runtime.agent ... --instance 0``), with the family's CPUs, GPUs and memory
  as the entrypoint's resources, so Ray places it on a node that fits.
- Several instances: the entrypoint is :mod:`mljobs.runtime.raygang`, a small Ray driver that
  reserves the job's nodes at once with a ``STRICT_SPREAD`` placement group (one bundle of the
  family's size per instance, each on a different node; all or nothing, as SkyPilot does), waits
  for it within the job's ``join_timeout_s`` (heartbeating for the instances meanwhile, and
  failing them with a message that says what the cluster has if it never comes), then runs one
  Ray task per bundle that runs the agent of instance ``i`` as a subprocess.

The agents report over HTTP (:mod:`mljobs.providers.remote`): logs, heartbeats, their node's
address (so ``parallel=True`` jobs get ranks and a rendezvous as on the local provider) and the
exit record. A multi-node job without ``parallel`` does not start a Ray cluster of its own: its
nodes already belong to one, whose ports (6379, 8265, ...) a second cluster would collide with.
Instead the payload joins the host cluster: instance 0 runs it with ``RAY_ADDRESS`` set to the
host cluster's GCS, so ``ray.init(address="auto")`` works unchanged, while the other instances
hold their bundles (the job's reservation on those nodes) until the head has finished and the
server releases them. The payload's own Ray tasks are scheduled by the host cluster like any
other job's.

Cancel asks the agents and stops the Ray job: Ray sends SIGTERM to the entrypoint and its
children (the agent forwards it to the supervisor, which stops its whole tree within the grace
period; each job's ``RAY_JOB_STOP_WAIT_TIME_S`` is set above that grace, so Ray's SIGKILL comes
after the supervisor is done). For a gang, the driver cancels its tasks, whose agents get
SIGTERM; an agent whose Ray worker dies gets SIGTERM from the kernel (parent-death signal), so no
path leaves a payload behind. The Ray job's own driver log is only for debugging
(``ray job logs mljobs-<id>``); the instances' logs come from the agents.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import httpx

from mljobs.errors import InvalidArgumentError
from mljobs.providers.base import InstanceHandle, InstanceLaunch, UnsupportedError, check_options
from mljobs.providers.remote import ENGINE_GONE, ENGINE_PENDING, ENGINE_RUNNING, RemoteProvider
from mljobs.spec import GIB, InstanceFamily, JobSpec, PoolSpec

__all__ = ["RayProvider", "submission_id", "node_fits"]

log = logging.getLogger("mljobs.server")

_PREFIX = "mljobs-"
_STATUS_TTL_S = 2.0  # one status request serves every poll of a job within this long
_NODES_TTL_S = 2.0
_PENDING = {"PENDING"}
_RUNNING = {"RUNNING"}
_FINISH_WAIT_S = 10.0  # a finished job's Ray job ends on its own within this, else it is stopped


def submission_id(job_id: str, attempt: int = 1) -> str:
    """The Ray job's submission id: one per attempt (Ray keeps finished ones, and a retry must not
    reuse its last attempt's)."""
    return _PREFIX + job_id + (f".{attempt}" if attempt > 1 else "")


def _job_of(sid: str) -> str:
    return sid[len(_PREFIX):].split(".")[0]


def _normalize(address: str) -> str:
    address = address.strip().rstrip("/")
    return address if "://" in address else "http://" + address


def node_fits(node: dict[str, Any], fam: InstanceFamily) -> bool:
    """Whether a node (``{"cpus", "gpus", "memory_bytes"}``) is big enough for one instance."""
    return node["cpus"] >= fam.cpus and node["memory_bytes"] >= fam.memory_bytes and node["gpus"] >= fam.gpus


class RayProvider(RemoteProvider):
    name = "ray"
    sandboxes_payload = False  # the payload is a Ray driver on the node's raylet (docs/isolation.md)
    OPTIONS: ClassVar[dict[str, str]] = {
        "address": "the Ray cluster's job server (dashboard) URL, e.g. 'http://head:8265' (required)",
        **RemoteProvider.COMMON_OPTIONS,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._submit_lock = threading.Lock()
        self._clients: dict[str, Any] = {}
        self._status: dict[str, tuple[float, str | None]] = {}  # submission id -> (when, Ray status)
        self._nodes: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._cache_lock = threading.Lock()

    # -- the cluster ----------------------------------------------------------------------------
    def _client(self, address: str) -> Any:
        """A JobSubmissionClient for ``address``; its failure quoted in an InvalidArgumentError."""
        with self._cache_lock:
            client = self._clients.get(address)
        if client is not None:
            return client
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError as e:
            raise InvalidArgumentError(f"the Ray provider needs Ray on the server (pip install 'ray[default]'): {e}") \
                from None
        try:
            client = JobSubmissionClient(address)
        except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, ValueError, RuntimeError
            raise InvalidArgumentError(f"`JobSubmissionClient({address!r})` failed: {e}") from None
        with self._cache_lock:
            self._clients[address] = client
        return client

    def _address(self, pool: PoolSpec) -> str:
        address = pool.provider_options.get("address")
        if not isinstance(address, str) or not address.strip():
            raise InvalidArgumentError(
                f"compute pool {pool.name}: the ray provider needs provider_options={{'address': "
                f"'http://HEAD:8265'}}, the Ray cluster's job server (dashboard) URL (got {address!r})")
        return _normalize(address)

    def alive_nodes(self, address: str, fresh: bool = False) -> list[dict[str, Any]]:
        """The cluster's alive nodes as {"address", "cpus", "gpus", "memory_bytes"} (the dashboard's
        state API), cached for a moment."""
        with self._cache_lock:
            cached = self._nodes.get(address)
        if cached and not fresh and time.monotonic() - cached[0] < _NODES_TTL_S:
            return cached[1]
        url = f"{address}/api/v0/nodes"
        try:
            r = httpx.get(url, params={"limit": 10000}, timeout=15)
            r.raise_for_status()
            rows = r.json()["data"]["result"]["result"]
        except (httpx.HTTPError, KeyError, ValueError) as e:
            raise InvalidArgumentError(f"listing the Ray cluster's nodes (GET {url}) failed: {e}") from None
        nodes = [{"address": n.get("node_ip"), "cpus": float(n.get("resources_total", {}).get("CPU", 0)),
                  "gpus": float(n.get("resources_total", {}).get("GPU", 0)),
                  "memory_bytes": float(n.get("resources_total", {}).get("memory", 0))}
                 for n in rows if n.get("state") == "ALIVE"]
        with self._cache_lock:
            self._nodes[address] = (time.monotonic(), nodes)
        return nodes

    def _remember(self, address: str) -> None:
        """Keep the cluster's address, so that a restarted server's sweep knows where to look."""
        path = self.home.root / "ray-clusters.json"
        try:
            known = set(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            known = set()
        if address not in known:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(sorted(known | {address})))
            tmp.replace(path)

    def _known_clusters(self) -> set[str]:
        try:
            out = set(json.loads((self.home.root / "ray-clusters.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            out = set()
        for alloc in self.home.allocation_files():
            try:
                out.add(json.loads(alloc.read_text())["address"])
            except (OSError, json.JSONDecodeError, KeyError):
                continue
        return out

    # -- pools and jobs -------------------------------------------------------------------------
    def validate_pool(self, pool: PoolSpec) -> None:
        check_options(self.name, pool, self.OPTIONS)
        address = self._address(pool)
        shared = pool.provider_options.get("shared_paths", [])
        if not isinstance(shared, list) or not all(isinstance(s, str) for s in shared):
            raise InvalidArgumentError(f"compute pool {pool.name}: shared_paths must be a list of paths, got {shared!r}")
        self.check_reachable(pool, self.settings.advertise_url or "")
        self._client(address)
        nodes = self.alive_nodes(address, fresh=True)
        fam = pool.family
        if not any(node_fits(n, fam) for n in nodes):
            found = "; ".join(f"{n['address']}: {n['cpus']:g} CPUs, {n['memory_bytes'] / GIB:.1f} GiB, "
                              f"{n['gpus']:g} GPU(s)" for n in nodes) or "no alive node"
            raise InvalidArgumentError(
                f"compute pool {pool.name}: {fam.name} needs {fam.cpus} CPUs, {fam.memory_bytes / GIB:g} GiB and "
                f"{fam.gpus} GPU(s) per node, but no alive node of the Ray cluster at {address} is that big "
                f"({found}); choose a smaller instance family or add bigger nodes")
        self._remember(address)

    def check_job(self, spec: JobSpec, pool: PoolSpec, stage_url: str) -> None:
        super().check_job(spec, pool, stage_url)
        address = self._address(pool)
        fit = sum(node_fits(n, pool.family) for n in self.alive_nodes(address))
        if spec.target_instances > fit:
            raise InvalidArgumentError(
                f"target_instances={spec.target_instances}, but the Ray cluster at {address} has {fit} alive node(s) "
                f"that fit {pool.family.name} (each instance needs a node of its own); lower target_instances or "
                "add nodes to the cluster")

    # -- instances ------------------------------------------------------------------------------
    def launch_template(self, launch: InstanceLaunch, options: dict[str, Any]) -> dict[str, Any]:
        doc = super().launch_template(launch, options)
        mn = doc.get("multinode")
        if mn is not None and not launch.spec.parallel:
            mn["host_cluster"] = True  # the payload joins the cluster the nodes belong to (module doc)
            doc["heartbeat_s"] = min(doc["heartbeat_s"], 1.0)  # workers hear "release" soon
        return doc

    def start(self, launch: InstanceLaunch) -> InstanceHandle:
        pool = launch.pool
        assert pool is not None
        with self._submit_lock:
            alloc = self.allocation(launch.job_id)
            if alloc is None:
                if launch.instance_id > 0:
                    raise UnsupportedError("a Ray placement group cannot grow: late instances do not join a running "
                                           "job on the ray provider")
                alloc = self._submit(launch, pool)
        return self.handle_for(launch.job_id, launch.instance_id, alloc)

    def handle_for(self, job_id: str, instance_id: int, alloc: dict[str, Any]) -> InstanceHandle:
        handle = super().handle_for(job_id, instance_id, alloc)
        handle.extra.update(submission_id=alloc["submission_id"], address=alloc["address"])
        return handle

    def _submit(self, launch: InstanceLaunch, pool: PoolSpec) -> dict[str, Any]:
        """Submit the job's Ray job, unless one of its name exists already (a retry)."""
        opts = pool.provider_options
        address = self._address(pool)
        client = self._client(address)
        sid = submission_id(launch.job_id, launch.attempt)
        fam, k = launch.family, launch.instance_count
        self.write_launch(launch, opts)
        python = opts.get("python") or sys.executable
        where = ["--stage", launch.stage.name, "--stage-url", launch.stage.url, "--job", launch.job_id]
        stop_wait = int(launch.grace_period_s) + 15  # Ray's SIGKILL after the supervisors' own
        kwargs: dict[str, Any] = {"submission_id": sid, "metadata": {"mljobs_job_id": launch.job_id},
                                  "runtime_env": {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(stop_wait)}}}
        if k == 1:
            cmd = [python, "-m", "mljobs.runtime.agent", *where, "--instance", "0"]
            kwargs.update(entrypoint_num_cpus=fam.cpus, entrypoint_memory=fam.memory_bytes)
            if fam.gpus:
                kwargs["entrypoint_num_gpus"] = fam.gpus
        else:  # the gang's driver is light: the bundles hold the family's resources
            cmd = [python, "-m", "mljobs.runtime.raygang", *where, "--python", python,
                   "--grace-period-s", str(launch.grace_period_s)]
        try:
            client.submit_job(entrypoint=" ".join(shlex.quote(c) for c in cmd), **kwargs)
        except Exception as e:  # noqa: BLE001 - the SDK raises RuntimeError with the server's text
            if "already exists" not in str(e):
                raise InvalidArgumentError(f"submitting Ray job {sid} to {address} failed: {e}") from None
            log.info("ray: job %s was submitted before (%s); reusing it", sid, e)
        self._forget_status(sid)
        alloc = {"submission_id": sid, "address": address, "count": k,
                 "stage": {"name": launch.stage.name, "url": launch.stage.url}}
        self.save_allocation(launch.job_id, alloc)
        return alloc

    # -- the engine's view ----------------------------------------------------------------------
    def _forget_status(self, sid: str) -> None:
        with self._cache_lock:
            self._status.pop(sid, None)

    def ray_status(self, address: str, sid: str, fresh: bool = False) -> str | None:
        """The Ray job's status ("PENDING", "RUNNING", "SUCCEEDED", ...), "MISSING" when the cluster
        does not know it, None when it cannot be asked; cached for a moment."""
        with self._cache_lock:
            cached = self._status.get(sid)
        if cached and not fresh and time.monotonic() - cached[0] < _STATUS_TTL_S:
            return cached[1]
        try:
            status: str | None = str(self._client(address).get_job_status(sid).value)
        except InvalidArgumentError as e:
            log.warning("ray: %s", e)
            status = None
        except Exception as e:  # noqa: BLE001 - the SDK's RuntimeError with the HTTP status
            if "does not exist" in str(e) or "404" in str(e):
                status = "MISSING"
            else:
                log.warning("ray: status of %s: %s", sid, e)
                status = None
        with self._cache_lock:
            self._status[sid] = (time.monotonic(), status)
        return status

    def engine_state(self, handle: InstanceHandle) -> str | None:
        status = self.ray_status(handle.extra["address"], handle.extra["submission_id"])
        if status is None:
            return None
        if status in _PENDING:
            return ENGINE_PENDING
        return ENGINE_RUNNING if status in _RUNNING else ENGINE_GONE

    def engine_detail(self, handle: InstanceHandle) -> str:
        sid = handle.extra["submission_id"]
        try:
            info = self._client(handle.extra["address"]).get_job_info(sid)
        except Exception as e:  # noqa: BLE001
            return f"Ray cannot say why ({str(e)[:200]})"
        return f"Ray job {sid} {info.status.value}" + (f": {info.message}" if info.message else "")

    def ray_info(self, handle: InstanceHandle) -> dict[str, Any] | None:
        """The host cluster's addresses: its GCS as the head's agent saw it, its dashboard."""
        info = super().ray_info(handle)
        if info is None:
            return None
        return {**info, "dashboard_url": handle.extra.get("address")}

    # -- stopping -------------------------------------------------------------------------------
    def _stop(self, address: str, sid: str) -> None:
        try:
            self._client(address).stop_job(sid)
        except Exception as e:  # noqa: BLE001 - gone already, or the cluster is away
            log.warning("ray: stop %s: %s", sid, e)
        self._forget_status(sid)

    def cancel(self, handle: InstanceHandle, grace_period_s: float) -> bool:
        self.ask(handle, "cancel")
        if handle.instance_id == 0:  # one Ray job per mljobs job: instance 0's cancel stops it
            self._stop(handle.extra["address"], handle.extra["submission_id"])
        return self._cancel_unstarted(handle)

    def finish_job(self, job_id: str) -> None:
        """Every instance has reported its end: its Ray job ends by itself within moments (the
        agents exit after their exit report); stop it if it does not."""
        alloc = self.allocation(job_id)
        if alloc is None:
            return

        def stop_if_still_running() -> None:
            deadline = time.monotonic() + _FINISH_WAIT_S
            while time.monotonic() < deadline:
                status = self.ray_status(alloc["address"], alloc["submission_id"], fresh=True)
                if status not in _PENDING | _RUNNING and status is not None:
                    return
                time.sleep(0.5)
            self._stop(alloc["address"], alloc["submission_id"])

        threading.Thread(target=stop_if_still_running, name=f"ray-finish-{job_id}", daemon=True).start()

    def sweep(self, ended: Callable[[str], bool]) -> list[str]:
        """After a server start: stop the Ray jobs of mljobs jobs that ended while it was away."""
        done = []
        for address in sorted(self._known_clusters()):
            try:
                jobs = self._client(address).list_jobs()
            except Exception as e:  # noqa: BLE001
                log.warning("ray: cannot list the jobs of %s: %s", address, e)
                continue
            for info in jobs:
                sid = info.submission_id or ""
                if sid.startswith(_PREFIX) and info.status.value in _PENDING | _RUNNING and ended(_job_of(sid)):
                    self._stop(address, sid)
                    done.append(_job_of(sid))
        return done

    def cleanup(self, handle: InstanceHandle, now: bool = False) -> None:
        super().cleanup(handle, now)
        with self._cache_lock:
            self._status.pop(str(handle.extra.get("submission_id")), None)

    def containment(self) -> str:
        return ("Ray: one Ray job per job (a STRICT_SPREAD placement group for several instances); stopping it "
                "sends SIGTERM to the agents, whose supervisors stop their trees; the supervisor on each node "
                "watches resident memory against the family's limit")
