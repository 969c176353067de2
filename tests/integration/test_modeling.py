"""Distributed training in real jobs: XGBEstimator and LightGBMEstimator on a 3-node job's Ray
cluster from Parquet files on a stage, PyTorchDistributor (DDP over gloo) on 2 nodes, the same
code in a single-node job (in process) and in a plain Python session (a local Ray).

Every Ray node runs in a network namespace (see test_multinode.py for the rule)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mljobs
from mljobs.providers import netns
from tests.conftest import ServerProc, assert_no_leftovers, assert_no_ray_left, kill_all
from tests.integration.test_multinode import needs_netns

pytestmark = pytest.mark.multinode

FEATURES = [f"f{i}" for i in range(12)]


@pytest.fixture(autouse=True)
def _no_ray_left_behind(tmp_path_factory: pytest.TempPathFactory):
    yield
    assert_no_ray_left(tmp_path_factory.getbasetemp())


@pytest.fixture
def token_home(tmp_path_factory):
    """A session on a server whose HOME holds ~/.ray/auth_token, as any local ray.init leaves behind:
    a job's own Ray cluster must work all the same (Ray 2.5x turned token auth on from that file)."""
    from mljobs.client.session import Session

    fake_home = tmp_path_factory.mktemp("home")
    (fake_home / ".ray").mkdir()
    (fake_home / ".ray" / "auth_token").write_text("f" * 64)
    srv = ServerProc(tmp_path_factory.mktemp("mlh"), extra_env={"HOME": str(fake_home)})
    srv.start()
    session = Session.builder.config("url", srv.url).create()
    yield session
    session.close()
    srv.stop()
    assert_no_leftovers(srv.home)


def _classification(rows: int = 24_000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    X, y = make_classification(n_samples=rows, n_features=len(FEATURES), n_informative=8, random_state=seed)
    df = pd.DataFrame(X.astype("float32"), columns=FEATURES)
    df["target"] = y
    train, test = train_test_split(df, test_size=0.25, random_state=seed, stratify=df["target"])
    return train.reset_index(drop=True), test.reset_index(drop=True)


def _put_parquet(session, df: pd.DataFrame, folder: Path, stage_path: str, files: int = 3) -> None:
    folder.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(len(df)), files)):
        pq.write_table(pa.Table.from_pandas(df.iloc[part], preserve_index=False), folder / f"part-{i}.parquet",
                       row_group_size=2_000)
    session.file.put(str(folder), stage_path)


@needs_netns
def test_xgboost_and_lightgbm_train_on_three_nodes_from_a_stage(token_home, tmp_path):
    lite = token_home
    import lightgbm as lgb
    import xgboost as xgb

    train, test = _classification()
    mljobs.create_stage("training_data", session=lite)
    _put_parquet(lite, train, tmp_path / "train", "@training_data/train/")
    mljobs.create_compute_pool("GBDT3", instance_family="CPU_X64_XS", max_nodes=3, session=lite)

    @mljobs.remote("GBDT3", stage_name="st", target_instances=3, session=lite)
    def fit_both(features: list[str]):
        from mljobs.data import DataConnector
        from mljobs.errors import InvalidArgumentError
        from mljobs.modeling.distributors import (LightGBMEstimator, XGBEstimator, XGBScalingConfig)

        import ray
        import xgboost

        from mljobs.modeling.cluster import TrainingError

        data = DataConnector.from_sources("@training_data/train/")
        xgb_est = XGBEstimator(n_estimators=60, params={"objective": "binary:logistic", "max_depth": 5})
        xgb_model = xgb_est.fit(data, input_cols=features, label_col="target")
        # the same shape of workers: LightGBM trains on XGBoost's warm actors, which hold their CPUs
        warm_cpus = ray.available_resources().get("CPU", 0.0)
        lgb_est = LightGBMEstimator(n_estimators=60, objective="binary", params={"num_leaves": 31})
        lgb_model = lgb_est.fit(data, input_cols=features, label_col="target")
        refused = {}
        for name, config in (("too_many", XGBScalingConfig(num_workers=5)), ("gpu", XGBScalingConfig(use_gpu=True))):
            try:
                XGBEstimator(n_estimators=2, scaling_config=config).fit(data, features, "target")
            except InvalidArgumentError as e:
                refused[name] = str(e)

        class Boom(xgboost.callback.TrainingCallback):
            def after_iteration(self, model, epoch, evals_log):
                raise RuntimeError("boom in round 1")

        try:  # a failed fit closes its workers: the next one starts its own
            XGBEstimator(n_estimators=3, callbacks=[Boom()]).fit(data, features, "target")
        except TrainingError as e:
            refused["failed"] = str(e)
        after_failure = XGBEstimator(n_estimators=2)
        after_failure.fit(data, features, "target")
        os.environ["MLJOBS_WARM_WORKERS_S"] = "0.5"
        XGBEstimator(n_estimators=2).fit(data, features, "target")
        deadline = time.monotonic() + 30  # then its workers go, and their CPUs are free again
        while ray.available_resources().get("CPU", 0.0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
            time.sleep(0.2)
        return {"xgb": xgb_model, "lgb": lgb_model, "xgb_workers": xgb_est.workers_,
                "lgb_workers": lgb_est.workers_, "rows": len(data), "refused": refused,
                "warm_cpus": warm_cpus, "after_failure": after_failure.workers_,
                "free_cpus": ray.available_resources().get("CPU", 0.0), "cpus": ray.cluster_resources()["CPU"]}

    job = fit_both(FEATURES)
    out = job.result(timeout=300)
    assert out["rows"] == len(train)
    for name in ("xgb_workers", "lgb_workers"):
        workers = out[name]
        assert len(workers) == 3 and len({w["node_id"] for w in workers}) == 3, workers  # 3 distinct nodes
        assert sum(w["rows"] for w in workers) == len(train)  # each row read once, by one worker
        assert max(w["rows"] for w in workers) - min(w["rows"] for w in workers) <= 1
    assert "num_workers=5" in out["refused"]["too_many"] and "3 node(s)" in out["refused"]["too_many"]
    assert "no GPU" in out["refused"]["gpu"]
    # Warm workers: the second fit ran in the first one's processes, whose CPUs stayed held between
    # fits; a failed fit's workers are not used again; with MLJOBS_WARM_WORKERS_S=0.5 they go.
    assert [(w["node_id"], w["pid"]) for w in out["lgb_workers"]] == [(w["node_id"], w["pid"]) for w in out["xgb_workers"]]
    assert out["warm_cpus"] <= out["cpus"] - 3, out
    assert "boom in round 1" in out["refused"]["failed"], out["refused"]
    assert not {(w["node_id"], w["pid"]) for w in out["after_failure"]} & {(w["node_id"], w["pid"]) for w in out["xgb_workers"]}
    assert out["free_cpus"] == out["cpus"], out

    # The models came back to this process as real Boosters; their test error is within 2% of the
    # same training in one process on the same rows.
    X_test, y_test = test[FEATURES].to_numpy(), test["target"].to_numpy()
    assert isinstance(out["xgb"], xgb.Booster) and isinstance(out["lgb"], lgb.Booster)
    dist_xgb = np.mean((out["xgb"].predict(xgb.DMatrix(X_test, feature_names=FEATURES)) > 0.5) != y_test)
    one_xgb = xgb.train({"objective": "binary:logistic", "max_depth": 5, "tree_method": "hist"},
                        xgb.DMatrix(train[FEATURES], train["target"]), num_boost_round=60)
    single_xgb = np.mean((one_xgb.predict(xgb.DMatrix(test[FEATURES])) > 0.5) != y_test)
    dist_lgb = np.mean((out["lgb"].predict(X_test) > 0.5) != y_test)
    one_lgb = lgb.train({"objective": "binary", "num_leaves": 31, "verbosity": -1},
                        lgb.Dataset(train[FEATURES], train["target"]), num_boost_round=60)
    single_lgb = np.mean((one_lgb.predict(test[FEATURES]) > 0.5) != y_test)
    assert abs(dist_xgb - single_xgb) <= 0.02, (dist_xgb, single_xgb)
    assert abs(dist_lgb - single_lgb) <= 0.02, (dist_lgb, single_lgb)
    assert dist_xgb < 0.2 and dist_lgb < 0.2  # and they learned something


def _digits_train_func():
    import torch
    import torch.distributed as dist
    from torch import nn

    from mljobs.modeling.distributors import get_context

    ctx = get_context()
    dist.init_process_group(backend=ctx.get_default_backend())
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))
    opt = torch.optim.Adam(model.parameters(), lr=ctx.get_hyper_params()["lr"])
    shard = ctx.get_dataset_map()["train"].get_shard()
    data = shard.to_torch_dataset(batch_size=32, shuffle=True, drop_last_batch=False)
    pixels = [f"p{i}" for i in range(64)]
    for _ in range(ctx.get_hyper_params()["epochs"]):
        for batch in torch.utils.data.DataLoader(data, batch_size=None):
            loss = nn.functional.cross_entropy(model(torch.stack([batch[c] for c in pixels], 1)),
                                               batch["label"].long())
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(model.module.state_dict(), f"{ctx.get_model_dir()}/model.pt")
    return {"rank": ctx.get_rank(), "world": ctx.get_world_size(), "rows": len(shard),
            "master": f"{ctx.get_master_addr()}:{ctx.get_master_port()}", "node_rank": ctx.get_node_rank(),
            "state": model.module.state_dict() if ctx.get_rank() == 0 else None}


@needs_netns
def test_pytorch_ddp_on_two_nodes_reaches_95_percent_on_digits(lite):
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    train = pd.DataFrame(X_train.astype("float32"), columns=[f"p{i}" for i in range(64)])
    train["label"] = y_train
    mljobs.create_stage("models", session=lite)
    mljobs.create_compute_pool("DDP2", instance_family="CPU_X64_XS", max_nodes=2, session=lite)

    @mljobs.remote("DDP2", stage_name="st", target_instances=2, session=lite)
    def ddp(frame, train_func):
        from mljobs.data import DataConnector
        from mljobs.modeling.distributors import PyTorchDistributor, PyTorchScalingConfig

        result = PyTorchDistributor(train_func, PyTorchScalingConfig(num_nodes=2, num_workers_per_node=1)).run(
            dataset_map={"train": DataConnector.from_pandas(frame)}, hyper_params={"lr": 0.01, "epochs": 15},
            artifact_stage_location="@models/digits/")
        return {"returns": result.returns, "workers": result.workers, "artifacts": result.artifacts}

    out = ddp(train, _digits_train_func).result(timeout=300)
    returns = out["returns"]
    assert [r["rank"] for r in returns] == [0, 1] and {r["world"] for r in returns} == {2}
    assert [r["node_rank"] for r in returns] == [0, 1]
    assert len({w["node_id"] for w in out["workers"]}) == 2  # two nodes
    assert sum(r["rows"] for r in returns) == len(train)  # each rank its own half
    assert returns[0]["master"] == returns[1]["master"] and returns[0]["master"].startswith("10.211.0.")
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model.load_state_dict(returns[0]["state"])
    accuracy = (model(torch.from_numpy(X_test.astype("float32"))).argmax(1).numpy() == y_test).mean()
    assert accuracy >= 0.95, accuracy
    assert [a.rsplit("/", 1)[-1] for a in out["artifacts"]] == ["model.pt"]
    names = [f["name"] for f in lite.file.list("@models/digits/")]
    assert any(n.endswith("model.pt") for n in names), names


def test_single_node_job_trains_in_process(lite):
    """One instance, no Ray cluster: the estimator trains in the payload's own process."""
    train, test = _classification(rows=4_000)
    mljobs.create_compute_pool("GBDT1", instance_family="CPU_X64_S", max_nodes=1, session=lite)

    @mljobs.remote("GBDT1", stage_name="st", session=lite)
    def fit_one(frame):
        import ray

        from mljobs.data import DataConnector
        from mljobs.modeling.distributors import XGBEstimator

        est = XGBEstimator(n_estimators=30, params={"objective": "binary:logistic"})
        booster = est.fit(DataConnector.from_pandas(frame), label_col="target")
        return {"booster": booster, "workers": est.workers_, "ray": ray.is_initialized()}

    out = fit_one(train).result(timeout=120)
    assert out["ray"] is False and out["workers"][0]["rows"] == len(train)
    import xgboost as xgb

    err = np.mean((out["booster"].predict(xgb.DMatrix(test[FEATURES])) > 0.5) != test["target"].to_numpy())
    assert err < 0.2


PLAIN_SESSION = textwrap.dedent('''
    import json, sys
    import numpy as np, pandas as pd
    from mljobs.data import DataConnector
    from mljobs.modeling.distributors import LightGBMEstimator, LightGBMScalingConfig, XGBEstimator, XGBScalingConfig
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(3000, 4)), columns=list("abcd"))
    df["y"] = (df["a"] + df["b"] > 0).astype(int)
    dc = DataConnector.from_pandas(df)
    xgb_est = XGBEstimator(n_estimators=10, objective="binary:logistic",
                           scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1))
    xgb_est.fit(dc, label_col="y")
    print("xgboost trained", flush=True)
    lgb_est = LightGBMEstimator(n_estimators=10, objective="binary",
                                scaling_config=LightGBMScalingConfig(num_workers=2, num_cpu_per_worker=1))
    lgb_est.fit(dc, label_col="y")
    print("lightgbm trained", flush=True)
    import ray
    # Ray shut down and started again while the workers are warm: the next fit makes its own
    ray.shutdown()
    again = XGBEstimator(n_estimators=2, objective="binary:logistic",
                         scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1))
    again.fit(dc, label_col="y")
    assert {w["pid"] for w in again.workers_}.isdisjoint(w["pid"] for w in xgb_est.workers_), again.workers_
    print("xgboost trained again on a new local Ray", flush=True)
    # Ray datasets both ways: a table to Ray and back as blocks in the object store, and Parquet
    # files read by Ray Data where they lie.
    back = DataConnector.from_ray_dataset(dc.to_ray_dataset())
    halves = [s.to_pandas() for s in back.shards(2)]
    df.iloc[:1000].to_parquet("part.parquet")
    from_files = DataConnector.from_sources("part.parquet").to_ray_dataset()
    print("RESULT", json.dumps({"xgb": [w["rows"] for w in xgb_est.workers_], "lgb": [w["rows"] for w in lgb_est.workers_],
                      "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
                      "ray_rows": [len(h) for h in halves], "ray_same": bool(pd.concat(halves).reset_index(drop=True).equals(df)),
                      "ray_files": from_files.count(), "ray_columns": from_files.columns()}), flush=True)
''')


@needs_netns
def test_plain_session_starts_a_local_ray_for_two_workers(tmp_path):
    """Outside any job, more than one worker starts a local Ray (here inside a namespace made for
    the test, since Ray binds every interface); it ends with the session."""
    ns = f"mljobs-model-{os.getpid()}"
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_SESSION)
    ray_tmp = tempfile.mkdtemp(prefix="mlr-")  # Ray's session folders (short: socket paths fit 107 bytes)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        # HOME: Ray writes its token for a local cluster to ~/.ray, which must not outlive the test
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLJOBS_"))}
        env["HOME"] = str(tmp_path)
        env["RAY_TMPDIR"] = ray_tmp
        try:
            # alone it takes 45 s; on a loaded machine (pytest-xdist on 2 cores) several times that
            out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(script)], capture_output=True,
                                 text=True, timeout=480, env=env, cwd=tmp_path)
        except subprocess.TimeoutExpired as e:  # what it printed says which step it was in
            pytest.fail(f"timed out; it printed:\n{(e.stdout or b'').decode()[-3000:]}\n{(e.stderr or b'').decode()[-3000:]}")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        result = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        assert (tmp_path / ".ray" / "auth_token").exists()  # Ray's own token auth for a local cluster
        assert result == {"xgb": [1500, 1500], "lgb": [1500, 1500], "nodes": ["127.0.0.1"], "ray_rows": [1500, 1500],
                          "ray_same": True, "ray_files": 1000, "ray_columns": ["a", "b", "c", "d", "y"]}
    finally:
        kill_all(netns.pids(ns))
        subprocess.run(["ip", "netns", "delete", ns], check=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
