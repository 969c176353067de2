"""The estimators' checks and their in-process path (one worker, no Ray cluster): bad input is
refused before any training starts, with the columns and the fix named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mljobs.data import DataConnector
from mljobs.errors import InvalidArgumentError
from mljobs.modeling import cluster, tabular
from mljobs.modeling.distributors import (LightGBMEstimator, LightGBMScalingConfig, PyTorchScalingConfig,
                                          XGBEstimator, XGBScalingConfig, get_context)


@pytest.fixture(autouse=True)
def _no_ray_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster, "connect", _no_connect)


def _no_connect() -> None:
    raise AssertionError("these tests must not start Ray")


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(2000, 3)), columns=["a", "b", "c"])
    df["y"] = ((df["a"] + 0.5 * df["b"]) > 0).astype(int)
    return df


@pytest.mark.parametrize("estimator", [XGBEstimator, LightGBMEstimator])
def test_missing_label_and_input_columns_name_the_columns_there_are(estimator, frame):
    with pytest.raises(InvalidArgumentError, match=r"label_col 'target' not in the data; the columns are: a, b, c, y"):
        estimator(n_estimators=2).fit(frame, input_cols=["a"], label_col="target")
    with pytest.raises(InvalidArgumentError, match=r"input column 'zz', 'a2' not in the data; the columns are"):
        estimator(n_estimators=2).fit(frame, input_cols=["a", "zz", "a2"], label_col="y")
    with pytest.raises(InvalidArgumentError, match="also in input_cols"):
        estimator(n_estimators=2).fit(frame, input_cols=["a", "y"], label_col="y")


def test_text_columns_without_an_encoding_are_named(frame):
    frame["city"] = ["x", "y"] * 1000
    with pytest.raises(InvalidArgumentError, match=r"'city' \((string|large_string)\) are not numeric.*astype"):
        XGBEstimator(n_estimators=2).fit(frame, label_col="y")
    frame["label_text"] = np.where(frame["y"] == 1, "yes", "no")
    with pytest.raises(InvalidArgumentError, match="label_col 'label_text' is .*factorize"):
        XGBEstimator(n_estimators=2).fit(frame, input_cols=["a"], label_col="label_text")


@pytest.mark.parametrize("estimator, config", [(XGBEstimator, XGBScalingConfig),
                                               (LightGBMEstimator, LightGBMScalingConfig)])
def test_gpu_asked_for_where_there_is_none(frame, monkeypatch, estimator, config):
    monkeypatch.setattr(cluster, "local_gpus", lambda: 0)
    with pytest.raises(InvalidArgumentError, match="use_gpu=True, but this machine has no GPU"):
        estimator(n_estimators=2, scaling_config=config(use_gpu=True)).fit(frame, label_col="y")


@pytest.mark.parametrize("estimator", [XGBEstimator, LightGBMEstimator])
def test_eval_set_is_checked_like_the_training_data_before_training(estimator, frame, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started before eval_set was checked")

    monkeypatch.setattr(tabular, "plan_workers", no_training)
    text = frame.assign(b=["x", "y"] * 1000)
    with pytest.raises(InvalidArgumentError, match=r"eval_set: input column\(s\) 'b' \((string|large_string)\)"):
        estimator(n_estimators=2).fit(frame, input_cols=["a", "b"], label_col="y", eval_set=text)
    with pytest.raises(InvalidArgumentError, match="eval_set: input column 'b' not in the data; the columns are: a, c, y"):
        estimator(n_estimators=2).fit(frame, input_cols=["a", "b"], label_col="y", eval_set=frame.drop(columns="b"))
    with pytest.raises(InvalidArgumentError, match="eval_set: the data set has no rows"):
        estimator(n_estimators=2).fit(frame, input_cols=["a", "b"], label_col="y", eval_set=frame.iloc[:0])


@pytest.mark.parametrize("bad", [dict(num_workers=0), dict(num_workers=-2), dict(num_cpu_per_worker=0),
                                 dict(num_workers=1.5), dict(use_gpu="yes")])
def test_scaling_configs_refuse_nonsense(bad):
    with pytest.raises(InvalidArgumentError):
        XGBScalingConfig(**bad)
    with pytest.raises(InvalidArgumentError):
        LightGBMScalingConfig(**bad)


def test_pytorch_scaling_config_and_context_outside_a_run():
    with pytest.raises(InvalidArgumentError, match="num_nodes=0"):
        PyTorchScalingConfig(num_nodes=0)
    with pytest.raises(InvalidArgumentError, match="num_workers_per_node=0"):
        PyTorchScalingConfig(num_workers_per_node=0)
    with pytest.raises(RuntimeError, match="only inside the train_func"):
        get_context()


def test_an_empty_data_set_is_refused(frame):
    with pytest.raises(InvalidArgumentError, match="no rows"):
        XGBEstimator(n_estimators=2).fit(frame.iloc[:0], label_col="y")


def test_one_worker_without_ray_trains_in_process_and_matches_xgboost(frame):
    import xgboost as xgb

    est = XGBEstimator(n_estimators=20, objective="binary:logistic", params={"max_depth": 3})
    booster = est.fit(DataConnector.from_pandas(frame), input_cols=["a", "b", "c"], label_col="y",
                      eval_set=DataConnector.from_pandas(frame.iloc[:500]))
    assert isinstance(booster, xgb.Booster) and est.workers_ == [{"rank": 0, "rows": 2000, "node_id": None}]
    assert len(est.evals_result_["eval"]["logloss"]) == 20
    same = xgb.train({"objective": "binary:logistic", "max_depth": 3, "tree_method": "hist"},
                     xgb.DMatrix(frame[["a", "b", "c"]], frame["y"]), num_boost_round=20)
    X = xgb.DMatrix(frame[["a", "b", "c"]])
    np.testing.assert_allclose(booster.predict(X), same.predict(X), atol=1e-3)


def test_lightgbm_in_process_with_a_categorical_column(frame):
    import lightgbm as lgb

    frame["kind"] = pd.Categorical(np.where(frame["c"] > 0, "hi", "lo"))
    est = LightGBMEstimator(n_estimators=20, objective="binary")
    booster = est.fit(frame, label_col="y")
    assert isinstance(booster, lgb.Booster)
    assert booster.feature_name() == ["a", "b", "c", "kind"]
    assert est.workers_[0]["rows"] == 2000


def test_features_turn_nulls_into_nan_and_keep_categoricals():
    table = pa.table({"i": pa.array([1, None, 3], pa.int64()), "f": [0.5, 1.5, None],
                      "k": pa.array(["u", "v", "u"]).dictionary_encode(), "y": [0, 1, 0]})
    X, y, categorical = tabular.features(DataConnector.from_dataframe(table), ["i", "f"], "y")
    assert X.dtype == np.float32 and np.isnan(X[1, 0]) and np.isnan(X[2, 1]) and list(y) == [0, 1, 0]
    assert categorical == []
    frame, _, categorical = tabular.features(DataConnector.from_dataframe(table), ["i", "k"], "y")
    assert categorical == ["k"] and str(frame["k"].dtype) == "category"


def test_cluster_view_fits_counts_bundles_per_node():
    view = cluster.ClusterView([cluster.NodeView("n1", "10.0.0.1", 2, 0), cluster.NodeView("n2", "10.0.0.2", 1, 1)])
    assert view.fits(3, 1, 0) and not view.fits(4, 1, 0)
    assert view.fits(1, 1, 1) and not view.fits(2, 1, 1)
    assert view.fits(2, 1, 0, per_node=2) and not view.fits(4, 1, 0, per_node=2)
    assert "2 node(s), 3 CPU and 1 GPU in all (10.0.0.1: 2 CPU; 10.0.0.2: 1 CPU, 1 GPU)" == view.describe()


def test_how_long_workers_stay_warm_is_read_from_the_environment_and_checked(monkeypatch):
    monkeypatch.delenv("MLJOBS_WARM_WORKERS_S", raising=False)
    assert cluster.warm_seconds() == cluster.WARM_WORKERS_S == 30.0
    monkeypatch.setenv("MLJOBS_WARM_WORKERS_S", "0")
    assert cluster.warm_seconds() == 0.0
    for bad, says in (("soon", "use a number of seconds"), ("-1", "use 0 or more seconds"),
                      ("inf", "use 0 or more seconds")):
        monkeypatch.setenv("MLJOBS_WARM_WORKERS_S", bad)
        with pytest.raises(InvalidArgumentError, match=f"MLJOBS_WARM_WORKERS_S='{bad}': {says}"):
            cluster.warm_seconds()


def test_categorical_codes_agree_across_files_with_their_own_dictionaries(tmp_path):
    """Two Parquet files whose dictionaries differ: every shard maps a level to the same code."""
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"k": pa.array(["b", "a", "b"]).dictionary_encode(), "y": [1, 0, 1]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"k": pa.array(["c", "a", "c"]).dictionary_encode(), "y": [0, 0, 1]}), tmp_path / "2.parquet")
    data = DataConnector.from_sources(str(tmp_path))
    levels = data.category_levels(["k"])
    assert levels == {"k": ["a", "b", "c"]}
    first, second = (tabular.features(s, ["k"], "y", levels)[0] for s in data.shards(2))
    assert list(first["k"].cat.categories) == list(second["k"].cat.categories) == ["a", "b", "c"]
    assert list(first["k"].cat.codes) == [1, 0, 1] and list(second["k"].cat.codes) == [2, 0, 2]


def test_xgboost_in_process_takes_a_categorical_column(frame):
    import xgboost as xgb

    frame["kind"] = pd.Categorical(np.where(frame["c"] > 0, "hi", "lo"))
    booster = XGBEstimator(n_estimators=5, objective="binary:logistic").fit(frame, label_col="y")
    assert isinstance(booster, xgb.Booster) and booster.feature_types[-1] == "c"


def _one_rank_train():
    import torch
    import torch.distributed as dist

    from mljobs.modeling.distributors import get_context

    ctx = get_context()
    dist.init_process_group(backend=ctx.get_default_backend())
    total = torch.tensor([float(len(ctx.get_dataset_map()["train"].get_shard()))])
    dist.all_reduce(total)
    with open(f"{ctx.get_model_dir()}/weights.txt", "w") as f:
        f.write("w")
    return {"rows": total.item(), "world": dist.get_world_size(), "lr": ctx.get_hyper_params()["lr"]}


def test_pytorch_distributor_with_one_process_and_no_ray_runs_here(frame, tmp_path):
    import os

    from mljobs.modeling.distributors import PyTorchDistributor

    before = dict(os.environ)
    result = PyTorchDistributor(_one_rank_train).run(dataset_map={"train": frame}, hyper_params={"lr": 0.1},
                                                    artifact_stage_location=str(tmp_path / "art"))
    assert result.value == {"rows": 2000.0, "world": 1, "lr": 0.1}
    assert (tmp_path / "art" / "weights.txt").read_text() == "w"
    assert dict(os.environ) == before  # MASTER_ADDR & co. do not outlive the run
