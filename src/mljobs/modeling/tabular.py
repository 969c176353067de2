"""What the gradient-boosting estimators share: input checks, the worker plan, features as arrays,
and the fit loop that runs one training function on every worker with its own shard."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from mljobs.data import DataConnector
from mljobs.errors import InvalidArgumentError
from mljobs.modeling import cluster

__all__ = ["require", "ScalingConfig", "Plan", "as_connector", "check_inputs", "check_eval_set", "features", "plan_workers", "fit_on_workers"]


@dataclass
class ScalingConfig:
    """How many workers train, and what each holds. -1: from the cluster (one worker per node,
    all of its CPUs); ``use_gpu=None``: GPUs when the cluster has them."""

    num_workers: int = -1
    num_cpu_per_worker: int = -1
    use_gpu: bool | None = None

    def __post_init__(self) -> None:
        for name in ("num_workers", "num_cpu_per_worker"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
                raise InvalidArgumentError(f"{name}={value!r}: use a positive number, or -1 to take it from the cluster")
        if self.use_gpu not in (None, True, False):
            raise InvalidArgumentError(f"use_gpu={self.use_gpu!r}: use True, False or None (GPUs if there are any)")


@dataclass(frozen=True)
class Plan:
    workers: int
    cpus: int
    gpus: int
    in_process: bool  # one worker and no Ray cluster: train here, start no Ray
    spread: bool = True  # one worker per node (STRICT_SPREAD), when there are enough nodes


def require(module: str, package: str) -> None:
    """Fail in the driver, before any worker starts, when a training library is not installed."""
    if importlib.util.find_spec(module) is None:
        raise InvalidArgumentError(f"{module} is not installed here: pip install {package} "
                                   "(or pip install 'mljobs[ml]'; in a job, add it to pip_requirements)")


def as_connector(dataset: Any, what: str = "dataset") -> DataConnector:
    if isinstance(dataset, DataConnector):
        return dataset
    try:
        return DataConnector.from_dataframe(dataset)
    except InvalidArgumentError:
        raise InvalidArgumentError(f"{what} must be a DataConnector or a pandas/polars DataFrame or Arrow table, "
                                   f"not {type(dataset).__name__}") from None


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


def check_inputs(data: DataConnector, input_cols: list[str] | None, label_col: str) -> list[str]:
    """The input columns (all but the label when None); errors name what is wrong and the fix."""
    if not isinstance(label_col, str) or not label_col:
        raise InvalidArgumentError(f"label_col={label_col!r}: name the column to predict")
    data.check_columns([label_col], "label_col")
    if input_cols is None:
        input_cols = [c for c in data.columns if c != label_col]
    if isinstance(input_cols, str) or not list(input_cols):
        raise InvalidArgumentError(f"input_cols={input_cols!r}: give a list of column names")
    input_cols = list(input_cols)
    data.check_columns(input_cols, "input column")
    if label_col in input_cols:
        raise InvalidArgumentError(f"the label column {label_col!r} is also in input_cols; leave it out")
    schema = data.schema
    bad = [f"{c!r} ({schema.field(c).type})" for c in input_cols
           if not (_numeric(schema.field(c).type) or pa.types.is_dictionary(schema.field(c).type))]
    if bad:
        raise InvalidArgumentError(
            f"input column(s) {', '.join(bad)} are not numeric and have no encoding: make them categorical "
            "(pandas: df[col].astype('category')) or one-hot encode them, or leave them out of input_cols")
    label_type = schema.field(label_col).type
    if not _numeric(label_type):
        raise InvalidArgumentError(f"label_col {label_col!r} is {label_type}, not numeric: encode the classes as "
                                   "numbers 0..k-1 first (e.g. pandas.factorize)")
    if data.count_rows() == 0:
        raise InvalidArgumentError("the data set has no rows")
    return input_cols


def check_eval_set(evals: DataConnector, input_cols: list[str], label_col: str) -> None:
    """The evaluation data pass the same checks as the training data (before any worker starts)."""
    try:
        check_inputs(evals, input_cols, label_col)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"eval_set: {e}") from None


def features(data: DataConnector, input_cols: list[str], label_col: str,
             levels: dict[str, list[Any]] | None = None) -> tuple[Any, np.ndarray, list[str]]:
    """(X, y, categorical columns): a float32 matrix, or a pandas frame when there are categorical
    columns, whose categories are ``levels`` (the same on every worker)."""
    table = data.to_arrow(columns=[*input_cols, label_col])
    label = table.column(label_col)
    y = label.to_numpy() if label.null_count == 0 else label.cast(pa.float64()).to_numpy(zero_copy_only=False)
    categorical = [c for c in input_cols if pa.types.is_dictionary(table.schema.field(c).type)]
    if categorical:
        frame = table.select(input_cols).to_pandas()
        for c in categorical:
            if levels and c in levels:
                frame[c] = frame[c].cat.set_categories(levels[c])
        return frame, y, categorical
    if table.num_rows == 0:
        return np.empty((0, len(input_cols)), dtype=np.float32), y, []
    columns = []
    for c in input_cols:
        col = table.column(c)
        if col.null_count or not pa.types.is_floating(col.type):
            col = col.cast(pa.float32())
        columns.append(col.to_numpy())
    return np.column_stack(columns).astype(np.float32, copy=False), y, []


def plan_workers(config: ScalingConfig) -> Plan:
    """The number of workers and their CPUs/GPUs; an error names the cluster when they cannot fit."""
    if not cluster.ray_available() and config.num_workers in (-1, 1):
        gpus = cluster.local_gpus()
        if config.use_gpu and not gpus:
            raise InvalidArgumentError("use_gpu=True, but this machine has no GPU (none visible to this process); "
                                       "set use_gpu=False or None, or run the job on a GPU pool")
        cpus = cluster.local_cpus() if config.num_cpu_per_worker == -1 else config.num_cpu_per_worker
        return Plan(1, cpus, 1 if (config.use_gpu or (config.use_gpu is None and gpus)) else 0, True)
    cluster.connect()
    view = cluster.cluster_view()
    use_gpu = config.use_gpu if config.use_gpu is not None else view.gpus > 0
    if use_gpu and view.gpus < 1:
        raise InvalidArgumentError(f"use_gpu=True, but the Ray cluster has no GPU: {view.describe()}; "
                                   "set use_gpu=False or None, or run the job on a GPU pool")
    nodes = [n for n in view.nodes if n.cpus >= 1 and (n.gpus >= 1 or not use_gpu)]
    workers = config.num_workers if config.num_workers != -1 else max(len(nodes), 1)
    per_node = -(-workers // max(len(nodes), 1))
    cpus = config.num_cpu_per_worker
    if cpus == -1:
        cpus = max(1, int(min((n.cpus for n in nodes), default=1) // per_node))
    gpus = 1 if use_gpu else 0
    if not view.fits(workers, cpus, gpus):
        raise InvalidArgumentError(
            f"num_workers={workers} with {cpus} CPU{' and 1 GPU' if gpus else ''} each does not fit the Ray "
            f"cluster: {view.describe()}; ask for fewer workers or CPUs per worker, or more target_instances")
    return Plan(workers, cpus, gpus, False, spread=workers <= len(nodes))


def fit_on_workers(plan: Plan, train: Callable[..., dict[str, Any]], shared: dict[str, Any],
                   data: DataConnector, eval_data: DataConnector | None,
                   setup: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
                   what: str = "training") -> list[dict[str, Any]]:
    """Run ``train(rank=, world=, shard=, eval_shard=, **shared, **per_worker)`` on each worker.

    ``setup(infos)`` turns the workers' addresses into per-worker arguments (ports, peers) before
    training starts. In process (one worker, no Ray) ``train`` runs here on the whole data set.
    """
    if plan.in_process:
        return [train(rank=0, world=1, shard=data, eval_shard=eval_data, **shared)]
    shards = data.shards(plan.workers)
    eval_shards = eval_data.shards(plan.workers) if eval_data is not None else [None] * plan.workers
    with cluster.workers(plan.workers, plan.cpus, plan.gpus, spread=plan.spread, what=what) as group:
        extra = setup(group.infos) if setup else [{} for _ in group.infos]
        calls = [(_call, train, dict(rank=r, world=plan.workers, shard=shards[r], eval_shard=eval_shards[r],
                                     node_id=group.infos[r]["node_id"], **shared, **extra[r]))
                 for r in range(plan.workers)]
        return group.run(_call, [c[1:] for c in calls])


def _call(train: Callable[..., dict[str, Any]], kwargs: dict[str, Any]) -> dict[str, Any]:
    out = train(**kwargs)
    out.setdefault("node_id", kwargs.get("node_id") or ray.get_runtime_context().get_node_id())
    out.setdefault("pid", os.getpid())  # the worker's process: the same one across fits while it stays warm
    return out
