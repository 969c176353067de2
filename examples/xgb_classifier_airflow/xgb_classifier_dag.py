"""An XGBoost classifier pipeline on mljobs, orchestrated by Airflow 3.

ensure_pool -> prepare -> train -> evaluate. Each step after the first is a job on an mljobs
compute pool (``@task.mljobs``), so the Airflow worker only submits and waits:

- prepare (1 instance) makes a data set and writes it as Parquet files to a stage;
- train (2 instances) runs XGBoost's data-parallel training across the job's 2-node Ray cluster,
  one worker per node, each reading its own rows; the task defers, so the wait for the job happens
  in Airflow's triggerer without holding a worker slot; the model goes to a stage;
- evaluate (1 instance) scores the model on rows training never saw.

Only small values travel through XCom (stage paths, metrics); data and the model stay on stages.
The size is a DAG parameter: ``airflow dags test xgb_classifier_airflow -c '{"n_samples": 4000}'``.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param, task

from mljobs import Session

POOL = "DEMO_POOL_MULTI"
FEATURES = [f"feature_{i}" for i in range(20)]
LABEL = "target"

with DAG("xgb_classifier_airflow", schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False,
         params={"n_samples": Param(30_000, type="integer", minimum=1_000)},
         render_template_as_native_obj=True, tags=["mljobs", "example"]):

    @task
    def ensure_pool() -> str:
        """The pool the jobs run on (three 1-CPU nodes), made if missing."""
        from mljobs import create_compute_pool

        create_compute_pool(POOL, instance_family="CPU_X64_XS", max_nodes=3, if_not_exists=True)
        return POOL

    @task.mljobs(compute_pool=POOL, stage_name="payload_stage")
    def prepare(n_samples: int, key: str, session: Session | None = None) -> dict:
        """Make a classification data set; put 80% as 4 Parquet files on a stage, 20% held out."""
        import re
        import tempfile
        from pathlib import Path

        import numpy as np
        import pandas as pd
        from sklearn.datasets import make_classification
        from sklearn.model_selection import train_test_split

        assert session is not None  # the job's own session
        X, y = make_classification(n_samples=n_samples, n_features=len(FEATURES), n_informative=10,
                                   random_state=7)
        df = pd.DataFrame(X.astype("float32"), columns=FEATURES)
        df[LABEL] = y
        train, test = train_test_split(df, test_size=0.2, random_state=7, stratify=df[LABEL])
        root = "@training_data/xgb_airflow/" + re.sub(r"[^A-Za-z0-9_-]", "_", key) + "/"
        with tempfile.TemporaryDirectory() as tmp:
            for i, rows in enumerate(np.array_split(np.arange(len(train)), 4)):
                train.iloc[rows].to_parquet(Path(tmp) / f"part-{i:03d}.parquet", index=False)
            session.file.put(tmp, root + "train/")
        with tempfile.TemporaryDirectory() as tmp:
            test.to_parquet(Path(tmp) / "test.parquet", index=False)
            session.file.put(tmp, root + "test/")
        print(f"prepared {len(train)} training and {len(test)} test rows under {root}", flush=True)
        return {"train": root + "train/", "test": root + "test/", "models": root + "model/"}

    @task.mljobs(compute_pool=POOL, stage_name="payload_stage", target_instances=2, deferrable=True,
                 poll_interval=5, timeout=1800)
    def train(data: dict, session: Session | None = None) -> dict:
        """XGBoost across the job's 2 nodes; returns where the model is and who trained on what."""
        import tempfile
        from pathlib import Path

        import ray

        from mljobs.data import DataConnector
        from mljobs.modeling.distributors import XGBEstimator, XGBScalingConfig

        assert session is not None
        ray.init(address="auto", ignore_reinit_error=True)  # the job's own cluster
        print(f"Ray nodes: {len(ray.nodes())}", flush=True)
        estimator = XGBEstimator(n_estimators=60, params={"objective": "binary:logistic", "max_depth": 6,
                                                          "eta": 0.2}, scaling_config=XGBScalingConfig())
        model = estimator.fit(DataConnector.from_sources(data["train"]), input_cols=FEATURES, label_col=LABEL)
        rows = [w["rows"] for w in estimator.workers_]
        print(f"trained on {len(rows)} workers: {rows} rows each", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.json"
            model.save_model(str(path))
            session.file.put(str(path), data["models"])
        return {"model": data["models"] + "model.json", "workers": len(rows), "rows": rows}

    @task.mljobs(compute_pool=POOL, stage_name="payload_stage")
    def evaluate(data: dict, trained: dict, session: Session | None = None) -> dict:
        """Score the model on the held-out rows."""
        import tempfile
        from pathlib import Path

        import xgboost as xgb
        from sklearn.metrics import accuracy_score, roc_auc_score

        from mljobs.data import DataConnector

        assert session is not None
        test = DataConnector.from_sources(data["test"]).to_pandas()
        with tempfile.TemporaryDirectory() as tmp:
            session.file.get(trained["model"], tmp)
            booster = xgb.Booster(model_file=str(Path(tmp) / "model.json"))
        proba = booster.predict(xgb.DMatrix(test[FEATURES], feature_names=FEATURES))
        metrics = {"auc": float(roc_auc_score(test[LABEL], proba)),
                   "accuracy": float(accuracy_score(test[LABEL], proba > 0.5)), "rows": len(test)}
        print(metrics, flush=True)
        return metrics

    data = prepare(n_samples="{{ params.n_samples }}", key="{{ run_id }}")
    ensure_pool() >> data
    evaluate(data, train(data))
