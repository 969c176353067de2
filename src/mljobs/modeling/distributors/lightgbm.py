"""LightGBMEstimator: LightGBM's own data-parallel training (``tree_learner="data"`` over its socket
network), one worker per Ray actor, each reading its own shard on its own node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mljobs.errors import InvalidArgumentError
from mljobs.modeling import tabular
from mljobs.modeling.tabular import ScalingConfig

__all__ = ["LightGBMEstimator", "LightGBMScalingConfig"]

NETWORK_TIMEOUT_MIN = 10


@dataclass
class LightGBMScalingConfig(ScalingConfig):
    """Workers for :class:`LightGBMEstimator`: ``num_workers`` (-1: one per node),
    ``num_cpu_per_worker`` (-1: the node's CPUs), ``use_gpu`` (None: when the cluster has GPUs)."""


class LightGBMEstimator:
    """Train a ``lightgbm.Booster`` on a DataConnector across the job's nodes.

    Example:
        >>> est = LightGBMEstimator(n_estimators=100, objective="binary")
        >>> booster = est.fit(DataConnector.from_sources("@data/train/"), input_cols=cols, label_col="y")
    """

    def __init__(self, n_estimators: int = 100, objective: str = "regression",
                 params: dict[str, Any] | None = None, scaling_config: LightGBMScalingConfig | None = None,
                 callbacks: list[Any] | None = None) -> None:
        if not isinstance(n_estimators, int) or n_estimators < 1:
            raise InvalidArgumentError(f"n_estimators={n_estimators!r}: use a positive number of boosting rounds")
        self.n_estimators, self.callbacks = n_estimators, list(callbacks or [])
        self.params = {"objective": objective, "verbosity": -1, **(params or {})}
        self.scaling_config = scaling_config or LightGBMScalingConfig()
        self.evals_result_: dict[str, Any] = {}
        self.workers_: list[dict[str, Any]] = []

    def fit(self, dataset: Any, input_cols: list[str] | None = None, label_col: str = "label",
            eval_set: Any = None) -> Any:
        """Train and return the ``lightgbm.Booster``; ``eval_set`` (a DataConnector) is evaluated each round.

        Raises:
            InvalidArgumentError: a missing or non-numeric column, or workers the cluster cannot hold,
                before any training starts.
        """
        tabular.require("lightgbm", "lightgbm")
        data = tabular.as_connector(dataset)
        cols = tabular.check_inputs(data, input_cols, label_col)
        evals = tabular.as_connector(eval_set, "eval_set") if eval_set is not None else None
        if evals is not None:
            tabular.check_eval_set(evals, cols, label_col)
        plan = tabular.plan_workers(self.scaling_config)
        shared = dict(input_cols=cols, label_col=label_col, params=self.params, rounds=self.n_estimators,
                      callbacks=self.callbacks, cpus=plan.cpus, gpu=bool(plan.gpus),
                      levels=data.category_levels(cols))
        out = tabular.fit_on_workers(plan, _train, shared, data, evals, setup=_network, what="LightGBM")
        self.workers_ = [{k: v for k, v in o.items() if k not in ("booster", "evals_result")} for o in out]
        self.evals_result_ = out[0]["evals_result"]
        return out[0]["booster"]


def _network(infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each worker's listen port and the machine list LightGBM's network connects."""
    machines = ",".join(f"{i['ip']}:{i['port']}" for i in infos)
    return [{"machines": machines, "port": i["port"]} for i in infos]


def _train(*, rank: int, world: int, shard: Any, eval_shard: Any, input_cols: list[str], label_col: str,
           params: dict[str, Any], rounds: int, callbacks: list[Any], cpus: int, gpu: bool,
           levels: dict[str, list[Any]],
           machines: str | None = None, port: int | None = None, node_id: str | None = None) -> dict[str, Any]:
    import lightgbm as lgb

    X, y, categorical = tabular.features(shard, input_cols, label_col, levels)
    params = {**params, "num_threads": cpus, **({"device_type": "gpu"} if gpu else {})}
    if world > 1:
        params.update(tree_learner=params.get("tree_learner", "data"), num_machines=world, machines=machines,
                      local_listen_port=port, time_out=NETWORK_TIMEOUT_MIN, pre_partition=True)
    train_set = lgb.Dataset(X, y, feature_name=input_cols, categorical_feature=categorical or "auto",
                            free_raw_data=True)
    valid_sets, names = [], []
    if eval_shard is not None:
        Xe, ye, _ = tabular.features(eval_shard, input_cols, label_col, levels)
        valid_sets, names = [lgb.Dataset(Xe, ye, reference=train_set)], ["eval"]
    result: dict[str, Any] = {}
    booster = lgb.train(params, train_set, num_boost_round=rounds, valid_sets=valid_sets or None,
                        valid_names=names or None, callbacks=[*callbacks, lgb.record_evaluation(result)])
    if world > 1:
        booster.free_network()
    return {"rank": rank, "rows": int(len(y)), "node_id": node_id, "evals_result": result,
            "booster": booster if rank == 0 else None}
