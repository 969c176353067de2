"""Train an XGBoost classifier across 3 nodes with XGBEstimator, from Parquet files on a stage.

The reference product's distributed_xgb_classifier: the job's 3 instances form one Ray cluster;
XGBEstimator puts one worker on each node (XGBScalingConfig() takes the count and the CPUs from
the cluster) and each worker reads only its own rows of the Parquet files. The Booster comes back
to this process, which scores it on rows the job never saw.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split

from mljobs import create_compute_pool, get_active_session, remote

FEATURES = [f"feature_{i}" for i in range(20)]
LABEL = "target"

create_compute_pool("DEMO_POOL_MULTI", instance_family="CPU_X64_XS", max_nodes=3, if_not_exists=True)


@remote("DEMO_POOL_MULTI", stage_name="payload_stage", target_instances=3)
def distributed_training(source: str, input_cols: list[str], label_col: str):
    import ray

    from mljobs.data import DataConnector
    from mljobs.modeling.distributors import XGBEstimator, XGBScalingConfig

    ray.init(address="auto", ignore_reinit_error=True)  # the job's own cluster
    print(f"Available nodes: {len(ray.nodes())}", flush=True)
    data_connector = DataConnector.from_sources(source)
    estimator = XGBEstimator(n_estimators=100, params={"objective": "binary:logistic", "max_depth": 6,
                                                       "eta": 0.2}, scaling_config=XGBScalingConfig())
    model = estimator.fit(data_connector, input_cols=input_cols, label_col=label_col)
    print(f"trained on {len(estimator.workers_)} workers: {[w['rows'] for w in estimator.workers_]} rows each")
    return model


def upload_training_data(train: pd.DataFrame, stage_path: str, files: int = 6) -> None:
    """Write the training rows as Parquet files and put them on the stage."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, rows in enumerate(np.array_split(np.arange(len(train)), files)):
            pq.write_table(pa.Table.from_pandas(train.iloc[rows], preserve_index=False),
                           Path(tmp) / f"part-{i:03d}.parquet")
        get_active_session().file.put(tmp, stage_path)


if __name__ == "__main__":
    import xgboost as xgb

    X, y = make_classification(n_samples=30_000, n_features=len(FEATURES), n_informative=10, random_state=7)
    df = pd.DataFrame(X.astype("float32"), columns=FEATURES)
    df[LABEL] = y
    train, test = train_test_split(df, test_size=0.2, random_state=7, stratify=df[LABEL])
    upload_training_data(train, "@training_data/classifier/")

    job = distributed_training("@training_data/classifier/", FEATURES, LABEL)
    print("job", job.id, "on", job.target_instances, "nodes")
    model = job.result(timeout=900)
    proba = model.predict(xgb.DMatrix(test[FEATURES], feature_names=FEATURES))
    print(job.get_logs())
    print(job.id, "test accuracy", round(float(np.mean((proba > 0.5) == test[LABEL].to_numpy())), 3))
