"""The model of the xgb_classifier example: preprocessing and XGBoost in one scikit-learn
Pipeline, trained on a stage's data and saved, with its metrics, to a stage.

Used by both ways the example trains: ``main.py`` (this folder, as ``submit_directory``) and the
``@remote`` function in ``../run.py`` (which ships this module with ``imports=``).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import joblib
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from xgboost import XGBClassifier

__all__ = ["NUMERIC", "CATEGORICAL", "LABEL", "MODEL_FILE", "METRICS_FILE", "build_pipeline", "read_stage_parquet",
           "score", "train_and_save"]

NUMERIC = ["income", "loan_amount", "term_months", "credit_score", "debt_to_income", "employment_years",
           "open_accounts"]
CATEGORICAL = ["purpose", "home_ownership"]
LABEL = "defaulted"
MODEL_FILE, METRICS_FILE = "model.joblib", "metrics.json"


def build_pipeline(n_estimators: int = 200, max_depth: int = 4, learning_rate: float = 0.1) -> Pipeline:
    pre = ColumnTransformer([("num", StandardScaler(), NUMERIC),
                             ("cat", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL)])
    model = XGBClassifier(n_estimators=n_estimators, max_depth=max_depth, learning_rate=learning_rate,
                          eval_metric="logloss", n_jobs=2)
    return Pipeline([("preprocess", pre), ("classifier", model)])


def read_stage_parquet(session: Any, stage_path: str) -> pd.DataFrame:
    """A Parquet file on a stage (``@stage/dir/file.parquet``), as a DataFrame."""
    with tempfile.TemporaryDirectory() as tmp:
        files = session.file.get(stage_path, tmp)
        if not files:
            raise FileNotFoundError(f"{stage_path} holds no file: run prepare_data.py first")
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def score(model: Pipeline, frame: pd.DataFrame) -> dict[str, float]:
    proba = model.predict_proba(frame[NUMERIC + CATEGORICAL])[:, 1]
    return {"accuracy": float(accuracy_score(frame[LABEL], proba > 0.5)),
            "roc_auc": float(roc_auc_score(frame[LABEL], proba)), "rows": len(frame)}


def train_and_save(session: Any, data_path: str, model_stage: str, n_estimators: int = 200,
                   max_depth: int = 4) -> dict[str, Any]:
    """Train on ``data_path`` (a validation split held back), put ``model.joblib`` and
    ``metrics.json`` under ``model_stage``; returns the metrics."""
    frame = read_stage_parquet(session, data_path)
    train, valid = train_test_split(frame, test_size=0.2, random_state=0, stratify=frame[LABEL])
    model = build_pipeline(n_estimators, max_depth)
    began = time.perf_counter()
    model.fit(train[NUMERIC + CATEGORICAL], train[LABEL])
    metrics: dict[str, Any] = {"train_rows": len(train), "fit_seconds": round(time.perf_counter() - began, 3),
                               "n_estimators": n_estimators, "max_depth": max_depth,
                               **{f"valid_{k}": v for k, v in score(model, valid).items()}}
    stage = model_stage if model_stage.endswith("/") else model_stage + "/"
    with tempfile.TemporaryDirectory() as tmp:
        joblib.dump(model, Path(tmp) / MODEL_FILE)
        Path(tmp, METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        session.file.put(tmp, stage)
    metrics["model_path"] = stage + MODEL_FILE
    print(json.dumps(metrics), flush=True)
    return metrics
