"""PyTorchDistributor: run a training function on ``num_nodes x num_workers_per_node`` processes
with ``torch.distributed`` ready (``env://``), each seeing its own shard of every dataset.

Inside ``train_func``, ``get_context()`` gives the rank, world size, master address and port, the
backend to use, the hyper parameters and the dataset map; the function itself calls
``torch.distributed.init_process_group(backend=context.get_default_backend())``, as under torchrun.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from mljobs.client.pools import stage_hidden, stage_url
from mljobs.data import DataConnector
from mljobs.errors import InvalidArgumentError
from mljobs.modeling import cluster, tabular
from mljobs.stages import parse_stage_path

__all__ = ["PyTorchDistributor", "PyTorchScalingConfig", "WorkerResourceConfig", "PyTorchDistributorResult",
           "get_context", "Context"]


@dataclass
class WorkerResourceConfig:
    """What each training process holds."""

    num_cpus: int = 1
    num_gpus: int = 0


@dataclass
class PyTorchScalingConfig:
    """``num_nodes`` nodes (-1: every node of the cluster), ``num_workers_per_node`` processes on each."""

    num_nodes: int = -1
    num_workers_per_node: int = 1
    resource_requirements_per_worker: WorkerResourceConfig = field(default_factory=WorkerResourceConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.num_nodes, int) or (self.num_nodes < 1 and self.num_nodes != -1):
            raise InvalidArgumentError(f"num_nodes={self.num_nodes!r}: use a positive number, or -1 for every node")
        if not isinstance(self.num_workers_per_node, int) or self.num_workers_per_node < 1:
            raise InvalidArgumentError(f"num_workers_per_node={self.num_workers_per_node!r}: use a positive number")
        res = self.resource_requirements_per_worker
        if res.num_cpus < 0 or res.num_gpus < 0:
            raise InvalidArgumentError(f"resource_requirements_per_worker={res}: counts cannot be negative")


@dataclass
class Context:
    """What a training process knows about its place in the run (``get_context()``)."""

    world_size: int
    rank: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    backend: str
    hyper_params: dict[str, Any]
    dataset_map: dict[str, DataConnector]
    model_dir: str

    def get_world_size(self) -> int:
        return self.world_size

    def get_rank(self) -> int:
        return self.rank

    def get_local_rank(self) -> int:
        return self.local_rank

    def get_local_world_size(self) -> int:
        return self.local_world_size

    def get_node_rank(self) -> int:
        return self.node_rank

    def get_master_addr(self) -> str:
        return self.master_addr

    def get_master_port(self) -> int:
        return self.master_port

    def get_default_backend(self) -> str:
        return self.backend

    def get_hyper_params(self) -> dict[str, Any]:
        return self.hyper_params

    def get_dataset_map(self) -> dict[str, DataConnector]:
        """Each name's shard for this process (``dataset_map["train"].get_shard()`` is the same shard)."""
        return self.dataset_map

    def get_model_dir(self) -> str:
        """A folder for the model and checkpoints; rank 0's is copied to ``artifact_stage_location``."""
        return self.model_dir


@dataclass
class PyTorchDistributorResult:
    """What ``train_func`` returned on each process, in rank order (``returns[0]``: rank 0's)."""

    returns: list[Any]
    workers: list[dict[str, Any]]
    artifacts: list[str]

    @property
    def value(self) -> Any:
        return self.returns[0]


_context: Context | None = None


def get_context() -> Context:
    """The running process's :class:`Context`; only inside a ``PyTorchDistributor`` ``train_func``."""
    if _context is None:
        raise RuntimeError("get_context() works only inside the train_func that PyTorchDistributor.run() runs")
    return _context


class PyTorchDistributor:
    """Run ``train_func`` with DDP across nodes.

    Example:
        >>> def train_func():
        ...     ctx = get_context()
        ...     torch.distributed.init_process_group(backend=ctx.get_default_backend())
        ...     ds = ctx.get_dataset_map()["train"].get_shard().to_torch_dataset(batch_size=64)
        ...     ...
        >>> PyTorchDistributor(train_func, PyTorchScalingConfig(num_nodes=2, num_workers_per_node=1)).run(
        ...     dataset_map={"train": DataConnector.from_sources("@data/train/")})
    """

    def __init__(self, train_func: Callable[[], Any], scaling_config: PyTorchScalingConfig | None = None) -> None:
        if not callable(train_func):
            raise InvalidArgumentError(f"train_func must be a function, not {type(train_func).__name__}")
        self.train_func = train_func
        self.scaling_config = scaling_config or PyTorchScalingConfig()

    def run(self, *, dataset_map: dict[str, Any] | None = None, hyper_params: dict[str, Any] | None = None,
            artifact_stage_location: str | None = None) -> PyTorchDistributorResult:
        """Train; returns each process's return value. The first process that fails stops them all."""
        tabular.require("torch", "torch")
        datasets = {name: tabular.as_connector(d, f"dataset_map[{name!r}]") for name, d in (dataset_map or {}).items()}
        artifacts_url = _artifacts_url(artifact_stage_location)
        cfg = self.scaling_config
        res = cfg.resource_requirements_per_worker
        if not cluster.ray_available() and cfg.num_nodes in (-1, 1) and cfg.num_workers_per_node == 1:
            return self._run_in_process(datasets, hyper_params, artifacts_url)
        cluster.connect()
        view = cluster.cluster_view()
        if res.num_gpus and view.gpus < 1:
            raise InvalidArgumentError(f"num_gpus={res.num_gpus} per worker, but the Ray cluster has no GPU: "
                                       f"{view.describe()}")
        nodes = cfg.num_nodes if cfg.num_nodes != -1 else len(view.nodes)
        per_node = cfg.num_workers_per_node
        if nodes > len(view.nodes) or not view.fits(nodes * per_node, res.num_cpus, res.num_gpus, per_node):
            raise InvalidArgumentError(
                f"num_nodes={nodes} x num_workers_per_node={per_node} with {res.num_cpus} CPU/{res.num_gpus} GPU "
                f"each does not fit the Ray cluster: {view.describe()}; ask for fewer, or more target_instances")
        world = nodes * per_node
        shards = {name: d.shards(world) for name, d in datasets.items()}
        with cluster.workers(world, res.num_cpus, res.num_gpus, per_node=per_node, spread=True,
                             what="PyTorch") as group:
            master = group.infos[0]
            backend = "nccl" if res.num_gpus else "gloo"
            calls = []
            for rank, info in enumerate(group.infos):
                ctx = dict(world_size=world, rank=rank, local_rank=rank % per_node, local_world_size=per_node,
                           node_rank=rank // per_node, master_addr=master["ip"], master_port=master["port"],
                           backend=backend, hyper_params=dict(hyper_params or {}),
                           dataset_map={n: s[rank] for n, s in shards.items()}, model_dir="")
                calls.append((self.train_func, ctx, info.get("ifname"), res.num_cpus,
                              artifacts_url if rank == 0 else None))
            out = group.run(_worker_main, calls)
        return PyTorchDistributorResult(returns=[o["value"] for o in out],
                                        workers=[{k: v for k, v in o.items() if k != "value"} for o in out],
                                        artifacts=out[0]["artifacts"])

    def _run_in_process(self, datasets: dict[str, DataConnector], hyper_params: dict[str, Any] | None,
                        artifacts_url: str | None) -> PyTorchDistributorResult:
        """One process and no Ray cluster (a single-node job, a plain session): run here, world size 1,
        on loopback; the process's environment is put back afterwards."""
        res = self.scaling_config.resource_requirements_per_worker
        if res.num_gpus and not cluster.local_gpus():
            raise InvalidArgumentError(f"num_gpus={res.num_gpus} per worker, but this machine has no GPU")
        ctx = dict(world_size=1, rank=0, local_rank=0, local_world_size=1, node_rank=0, master_addr="127.0.0.1",
                   master_port=cluster.free_port("127.0.0.1"), backend="nccl" if res.num_gpus else "gloo",
                   hyper_params=dict(hyper_params or {}), dataset_map=dict(datasets), model_dir="")
        saved = dict(os.environ)
        try:
            out = _worker_main(self.train_func, ctx, cluster.interface_of("127.0.0.1"), 0, artifacts_url)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return PyTorchDistributorResult(returns=[out["value"]], workers=[{k: v for k, v in out.items() if k != "value"}],
                                        artifacts=out["artifacts"])


def _artifacts_url(location: str | None) -> str | None:
    if location is None:
        return None
    if isinstance(location, str) and location.startswith("@"):
        stage, rel = parse_stage_path(location)
        root = stage_url(stage).rstrip("/")
        if stage_hidden(root):  # a sandboxed job does not see the stage's folder
            return f"@{stage}/{rel.rstrip('/')}".rstrip("/")  # uploaded through the control plane
        return root + ("/" + rel.rstrip("/") if rel else "")
    if not isinstance(location, str) or not location:
        raise InvalidArgumentError(f"artifact_stage_location={location!r}: use '@stage/path' or an fsspec URL")
    return location.rstrip("/")


def _worker_main(train_func: Callable[[], Any], ctx: dict[str, Any], ifname: str | None, cpus: int,
                 artifacts_url: str | None) -> dict[str, Any]:
    """One training process: the torch.distributed environment, the context, the function, clean-up."""
    global _context
    import ray
    import torch
    import torch.distributed as dist

    env = {"MASTER_ADDR": ctx["master_addr"], "MASTER_PORT": str(ctx["master_port"]),
           "WORLD_SIZE": str(ctx["world_size"]), "RANK": str(ctx["rank"]), "LOCAL_RANK": str(ctx["local_rank"]),
           "LOCAL_WORLD_SIZE": str(ctx["local_world_size"]), "NODE_RANK": str(ctx["node_rank"]),
           "GROUP_RANK": str(ctx["node_rank"])}
    if ifname:  # gloo and tensorpipe otherwise pick an interface from the host name, often the wrong one
        env.update(GLOO_SOCKET_IFNAME=ifname, TP_SOCKET_IFNAME=ifname, NCCL_SOCKET_IFNAME=ifname)
    saved, threads = dict(os.environ), torch.get_num_threads()  # a warm worker serves the next run as it was
    os.environ.update(env)
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    try:
        with tempfile.TemporaryDirectory(prefix="mljobs-model-") as model_dir:
            _context = Context(**{**ctx, "model_dir": model_dir})
            try:
                value = train_func()
            finally:
                _context = None
                if dist.is_available() and dist.is_initialized():
                    dist.destroy_process_group()
            uploaded = _upload(Path(model_dir), artifacts_url) if artifacts_url else []
    finally:
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"value": value, "rank": ctx["rank"], "node_rank": ctx["node_rank"], "node_id": node_id,
            "pid": os.getpid(), "artifacts": uploaded}


def _upload(folder: Path, url: str) -> list[str]:
    if url.startswith("@"):  # a stage this process cannot see: through the job's own session
        from mljobs.client.session import get_active_session

        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if files:
            get_active_session().file.put(folder, url + "/")
        return [f"{url}/{p.relative_to(folder).as_posix()}" for p in files]
    fs, root = fsspec.core.url_to_fs(url)
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        target = posixpath.join(root, rel)
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        fs.put_file(str(path), target)
        out.append(f"{url}/{rel}")
    return out
