"""The Ray cluster distributed training runs on, and the group of workers placed on it.

Inside a multi-node job the payload already has its job's Ray cluster (``RAY_ADDRESS``); in a
plain Python session or a single-node job a local Ray is started when more than one worker is
asked for. Workers are Ray actors in one placement group, so a gang either starts whole or not at
all; their failures end the whole group at once (a collective would otherwise wait forever).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mljobs.errors import InvalidArgumentError, MLJobsError

__all__ = ["NodeView", "ClusterView", "WorkerGroup", "connect", "cluster_view", "ray_available", "local_cpus",
           "local_gpus", "free_port", "interface_of", "TrainingError"]

PLACEMENT_TIMEOUT_S = float(os.environ.get("MLJOBS_PLACEMENT_TIMEOUT_S", "120"))


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
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
