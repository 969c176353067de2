"""XGBEstimator: XGBoost's own data-parallel training (its collective and tracker), one worker per
Ray actor, each worker reading its own shard of the data on its own node."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import ray

from mljobs.errors import InvalidArgumentError
from mljobs.modeling import tabular
from mljobs.modeling.tabular import ScalingConfig

__all__ = ["XGBEstimator", "XGBScalingConfig"]

TRACKER_TIMEOUT_S = 600


@dataclass
class XGBScalingConfig(ScalingConfig):
    """Workers for :class:`XGBEstimator`: ``num_workers`` (-1: one per node), ``num_cpu_per_worker``
    (-1: the node's CPUs), ``use_gpu`` (None: when the cluster has GPUs)."""


class XGBEstimator:
    """Train an ``xgboost.Booster`` on a DataConnector across the job's nodes.

    Example:
        >>> est = XGBEstimator(n_estimators=100, params={"objective": "binary:logistic"})
        >>> booster = est.fit(DataConnector.from_sources("@data/train/"), input_cols=cols, label_col="y")
    """

    def __init__(self, n_estimators: int = 100, objective: str = "reg:squarederror",
                 params: dict[str, Any] | None = None, scaling_config: XGBScalingConfig | None = None,
                 callbacks: list[Any] | None = None) -> None:
        if not isinstance(n_estimators, int) or n_estimators < 1:
            raise InvalidArgumentError(f"n_estimators={n_estimators!r}: use a positive number of boosting rounds")
        self.n_estimators, self.callbacks = n_estimators, list(callbacks or [])
        self.params = {"objective": objective, "tree_method": "hist", **(params or {})}
        self.scaling_config = scaling_config or XGBScalingConfig()
        self.evals_result_: dict[str, Any] = {}
        self.workers_: list[dict[str, Any]] = []

    def fit(self, dataset: Any, input_cols: list[str] | None = None, label_col: str = "label",
            eval_set: Any = None) -> Any:
        """Train and return the ``xgboost.Booster``; ``eval_set`` (a DataConnector) is evaluated each round.

        Raises:
            InvalidArgumentError: a missing or non-numeric column, or workers the cluster cannot hold,
                before any training starts.
        """
        tabular.require("xgboost", "xgboost")
        import xgboost

        data = tabular.as_connector(dataset)
        cols = tabular.check_inputs(data, input_cols, label_col)
        evals = tabular.as_connector(eval_set, "eval_set") if eval_set is not None else None
        if evals is not None:
            tabular.check_eval_set(evals, cols, label_col)
        plan = tabular.plan_workers(self.scaling_config)
        shared = dict(input_cols=cols, label_col=label_col, params=self.params, rounds=self.n_estimators,
                      callbacks=self.callbacks, cpus=plan.cpus, gpu=bool(plan.gpus),
                      levels=data.category_levels(cols))
        trackers: list[Any] = []

        def start_tracker(infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
            # Started once the workers are placed, on this (the driver's) node address.
            from xgboost.tracker import RabitTracker

            tracker = RabitTracker(n_workers=len(infos), host_ip=ray.util.get_node_ip_address(),
                                   sortby="task", timeout=TRACKER_TIMEOUT_S)
            tracker.start()
            trackers.append(tracker)
            return [{"tracker_args": tracker.worker_args()} for _ in infos]

        try:
            out = tabular.fit_on_workers(plan, _train, shared, data, evals, setup=start_tracker, what="XGBoost")
        except BaseException:
            for tracker in trackers:
                # The tracker then only says that workers went away; the error raised is the workers' own.
                with contextlib.suppress(xgboost.core.XGBoostError):
                    tracker.free()
            raise
        for tracker in trackers:
            tracker.wait_for(TRACKER_TIMEOUT_S)
            tracker.free()
        self.workers_ = [{k: v for k, v in o.items() if k not in ("booster", "evals_result")} for o in out]
        self.evals_result_ = out[0]["evals_result"]
        return out[0]["booster"]


def _train(*, rank: int, world: int, shard: Any, eval_shard: Any, input_cols: list[str], label_col: str,
           params: dict[str, Any], rounds: int, callbacks: list[Any], cpus: int, gpu: bool,
           levels: dict[str, list[Any]],
           tracker_args: dict[str, Any] | None = None, node_id: str | None = None) -> dict[str, Any]:
    import xgboost as xgb

    X, y, categorical = tabular.features(shard, input_cols, label_col, levels)
    params = {**params, "nthread": cpus, **({"device": "cuda"} if gpu else {})}
    comm = (xgb.collective.CommunicatorContext(**tracker_args, dmlc_task_id=f"{rank:06d}")
            if tracker_args else contextlib.nullcontext())
    with comm:
        dtrain = xgb.QuantileDMatrix(X, y, enable_categorical=bool(categorical), nthread=cpus,
                                     feature_names=input_cols)
        evals = [(dtrain, "train")]
        if eval_shard is not None:
            Xe, ye, _ = tabular.features(eval_shard, input_cols, label_col, levels)
            evals.append((xgb.QuantileDMatrix(Xe, ye, ref=dtrain, enable_categorical=bool(categorical),
                                              nthread=cpus, feature_names=input_cols), "eval"))
        result: dict[str, Any] = {}
        booster = xgb.train(params, dtrain, num_boost_round=rounds, evals=evals, evals_result=result,
                            callbacks=callbacks or None, verbose_eval=False)
    return {"rank": rank, "rows": int(len(y)), "node_id": node_id, "evals_result": result,
            "booster": booster if rank == 0 else None}
