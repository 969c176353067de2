"""The Ray cluster distributed training runs on, and the group of workers placed on it.

Inside a multi-node job the payload already has its job's Ray cluster (``RAY_ADDRESS``); in a
plain Python session or a single-node job a local Ray is started when more than one worker is
asked for. Workers are Ray actors in one placement group, so a gang either starts whole or not at
all; their failures end the whole group at once (a collective would otherwise wait forever).
A group that finished its work is kept warm for the next fit of the same shape in this driver
(:func:`workers`), for ``MLJOBS_WARM_WORKERS_S`` seconds, so that only the first fit pays for
starting actors and importing the library.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mljobs.errors import InvalidArgumentError, MLJobsError

__all__ = ["NodeView", "ClusterView", "WorkerGroup", "workers", "release_workers", "connect", "cluster_view",
           "ray_available", "local_cpus", "local_gpus", "free_port", "interface_of", "TrainingError"]

PLACEMENT_TIMEOUT_S = float(os.environ.get("MLJOBS_PLACEMENT_TIMEOUT_S", "120"))
WARM_WORKERS_S = 30.0  # the default of MLJOBS_WARM_WORKERS_S


class TrainingError(MLJobsError):
    """A distributed training worker failed; the message names the worker, its node and the cause."""


@dataclass(frozen=True)
class NodeView:
    node_id: str
    ip: str
    cpus: float
    gpus: float

    def describe(self) -> str:
        gpus = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.ip}: {self.cpus:g} CPU{gpus}"


@dataclass(frozen=True)
class ClusterView:
    nodes: list[NodeView]

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    def describe(self) -> str:
        return (f"{len(self.nodes)} node(s), {self.cpus:g} CPU and {self.gpus:g} GPU in all "
                f"({'; '.join(n.describe() for n in self.nodes)})")

    def fits(self, workers: int, cpus: float, gpus: float, per_node: int = 1) -> bool:
        """Whether ``workers`` workers of ``cpus``/``gpus`` each fit, ``per_node`` to a bundle."""
        bundles = -(-workers // per_node)
        slots = 0
        for n in self.nodes:
            by_cpu = int(n.cpus // (cpus * per_node)) if cpus else bundles
            by_gpu = int(n.gpus // (gpus * per_node)) if gpus else bundles
            slots += min(by_cpu, by_gpu)
        return slots >= bundles


def local_cpus() -> int:
    """This process's CPUs: the job instance's count (its thread variables) or the affinity mask."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return len(os.sched_getaffinity(0))


def local_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def ray_available() -> bool:
    """Whether a Ray cluster is there to use: this process is connected, or the job gave one."""
    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


def connect() -> None:
    """Connect to the job's Ray cluster, or start a local one for this session."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    # A local Ray for a plain session or a single-node job: its node address is loopback, no
    # dashboard, and the job's CPU count rather than the machine's.
    ray.init(num_cpus=local_cpus(), num_gpus=local_gpus(), include_dashboard=False,
             _node_ip_address="127.0.0.1", logging_level=logging.WARNING)


def cluster_view() -> ClusterView:
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        nodes.append(NodeView(n["NodeID"], n["NodeManagerAddress"], float(res.get("CPU", 0)),
                              float(res.get("GPU", 0))))
    return ClusterView(sorted(nodes, key=lambda n: (n.ip, n.node_id)))


def free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def interface_of(ip: str) -> str | None:
    """The network interface that holds ``ip`` (gloo and tensorpipe pick theirs by name)."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


class _Worker:
    """One training process: a Ray actor that runs what the driver sends it."""

    def info(self) -> dict[str, Any]:
        ip = ray.util.get_node_ip_address()
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ip, "port": free_port(ip),
                "ifname": interface_of(ip), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "hostname": socket.gethostname(), "pid": os.getpid()}

    def execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


_RemoteWorker = ray.remote(_Worker)


class WorkerGroup:
    """``count`` workers of ``cpus``/``gpus`` each, ``per_node`` to a placement bundle.

    ``spread``: bundles on distinct nodes (STRICT_SPREAD), else as Ray packs them (SPREAD).
    """

    def __init__(self, count: int, cpus: float, gpus: float, *, per_node: int = 1, spread: bool = True,
                 what: str = "training") -> None:
        self.count, self.cpus, self.gpus, self.per_node, self.what = count, cpus, gpus, per_node, what
        bundles = -(-count // per_node)
        bundle = {"CPU": cpus * per_node, **({"GPU": gpus * per_node} if gpus else {})}
        strategy = "STRICT_SPREAD" if spread and bundles > 1 else ("PACK" if bundles == 1 else "SPREAD")
        self._pg = placement_group([dict(bundle) for _ in range(bundles)], strategy=strategy)
        self.actors: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        try:
            self._wait_ready(strategy)
            for rank in range(count):
                self.actors.append(_RemoteWorker.options(
                    num_cpus=cpus, num_gpus=gpus, max_concurrency=2,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self._pg, placement_group_bundle_index=rank // per_node)).remote())
            self.infos = self.run(_Worker.info, [()] * count, method="info")
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, strategy: str) -> None:
        ready = self._pg.ready()
        deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
        while True:
            done, _ = ray.wait([ready], timeout=min(15.0, max(deadline - time.monotonic(), 0.1)))
            if done:
                return
            if time.monotonic() >= deadline:
                raise InvalidArgumentError(
                    f"{self.count} {self.what} worker(s) of {self.cpus:g} CPU/{self.gpus:g} GPU ({strategy}) could "
                    f"not be placed within {PLACEMENT_TIMEOUT_S:g} s; the cluster has {cluster_view().describe()}, "
                    f"of which free now: {ray.available_resources()}; use fewer workers or CPUs per worker "
                    "(MLJOBS_PLACEMENT_TIMEOUT_S sets the wait)")
            print(f"mljobs: waiting for room for {self.count} {self.what} worker(s) on the Ray cluster "
                  f"(free now: {ray.available_resources()})", flush=True)

    def run(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]], *, method: str = "execute") -> list[Any]:
        """Call ``fn(*args[rank])`` on every worker; the first failure stops the group and is raised."""
        if method == "info":
            refs = [a.info.remote() for a in self.actors]
        else:
            refs = [a.execute.remote(fn, *a_args) for a, a_args in zip(self.actors, args)]
        rank_of = {r: i for i, r in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                self.close()
                # str(e) holds the worker's own traceback
                raise TrainingError(f"{self.what} worker {self._where(rank_of[done[0]])} failed: {e}") from None
            except ray.exceptions.RayError as e:
                self.close()
                raise TrainingError(f"{self.what} worker {self._where(rank_of[done[0]])} was lost "
                                    f"(its process or node died): {e}") from None
        return ray.get(refs)

    def _where(self, rank: int) -> str:
        if rank < len(self.infos):
            return f"{rank} (node {self.infos[rank]['ip']}, pid {self.infos[rank]['pid']})"
        return str(rank)

    def close(self) -> None:
        actors, pg, self.actors, self._pg = self.actors, self._pg, [], None
        if not ray.is_initialized():  # the driver left its Ray cluster: the actors went with it
            return
        for actor in actors:
            ray.kill(actor)
        if pg is not None:
            remove_placement_group(pg)

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Groups that finished their work cleanly, kept for the next fit of the same shape: the key is the
# shape and the Ray job (this driver's connection), since a group of an earlier ray.init is gone.
_idle_lock = threading.Lock()
_idle: dict[WorkerGroup, tuple[tuple[Any, ...], threading.Timer]] = {}


def warm_seconds() -> float:
    """How long a finished group stays warm (``MLJOBS_WARM_WORKERS_S``; 0 closes it at once)."""
    raw = os.environ.get("MLJOBS_WARM_WORKERS_S", "")
    try:
        value = float(raw) if raw.strip() else WARM_WORKERS_S
    except ValueError:
        raise InvalidArgumentError(f"MLJOBS_WARM_WORKERS_S={raw!r}: use a number of seconds (0 keeps no "
                                   "workers warm between fits)") from None
    if not 0 <= value < math.inf:
        raise InvalidArgumentError(f"MLJOBS_WARM_WORKERS_S={raw!r}: use 0 or more seconds (a finite number)")
    return value


@contextmanager
def workers(count: int, cpus: float, gpus: float, *, per_node: int = 1, spread: bool = True,
            what: str = "training") -> Iterator[WorkerGroup]:
    """A :class:`WorkerGroup` of this shape: a warm one this driver used before, else a new one.

    A group given back without an error stays warm for :func:`warm_seconds` (its placement group
    holds its CPUs and GPUs meanwhile); one whose work failed is closed. A group of another shape
    is needed only when no warm one fits, so the warm ones are closed first to make room. A warm
    group whose actors were lost (a node gone) is replaced.
    """
    linger = warm_seconds()
    context = ray.get_runtime_context()
    # this connection: a new local cluster numbers its jobs from 1 again, but its node is new
    key = (count, float(cpus), float(gpus), per_node, spread, context.get_job_id(), context.get_node_id())
    group = _take(key)
    if group is not None:
        group.what = what
        try:
            group.infos = group.run(_Worker.info, [()] * count, method="info")  # fresh ports for this fit
        except TrainingError:  # lost actors: run() closed the group
            group = None
        except BaseException as e:  # anything else (an interrupt): the group is closed, not leaked
            _close_quietly(group)
            if not isinstance(e, Exception):
                raise
            group = None
    if group is None:
        group = WorkerGroup(count, cpus, gpus, per_node=per_node, spread=spread, what=what)
    clean = False
    try:
        yield group
        clean = True
    finally:
        if clean and linger > 0 and group.actors:
            _keep(group, key, linger)
        else:
            group.close()


def release_workers() -> None:
    """Close every warm group now, giving their CPUs and GPUs back to the Ray cluster."""
    with _idle_lock:
        groups = list(_idle)
        for _, timer in _idle.values():
            timer.cancel()
        _idle.clear()
    for group in groups:
        _close_quietly(group)


def _take(key: tuple[Any, ...]) -> WorkerGroup | None:
    """The warm group of shape ``key``; without one, close the warm groups (of other shapes, or of
    an earlier Ray connection) so that a new placement group finds their resources free."""
    with _idle_lock:
        found = next((g for g, (k, _) in _idle.items() if k == key), None)
        dropped = [found] if found is not None else list(_idle)
        for g in dropped:
            _idle.pop(g)[1].cancel()
    if found is not None:
        return found
    for g in dropped:
        _close_quietly(g)
    return None


def _keep(group: WorkerGroup, key: tuple[Any, ...], linger: float) -> None:
    timer = threading.Timer(linger, _expire, args=(group,))
    timer.daemon = True
    with _idle_lock:
        _idle[group] = (key, timer)
    timer.start()


def _expire(group: WorkerGroup) -> None:
    with _idle_lock:
        if _idle.pop(group, None) is None:  # taken or released meanwhile
            return
    _close_quietly(group)


def _close_quietly(group: WorkerGroup) -> None:
    """Close a warm group whose actors may be gone with their cluster (a Ray shut down and
    started again, the driver exiting): there is then nothing to give back."""
    try:
        group.close()
    except Exception:  # noqa: BLE001
        logging.getLogger(__name__).debug("closing a warm worker group failed", exc_info=True)
