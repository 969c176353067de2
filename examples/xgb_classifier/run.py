"""The xgb_classifier example end to end: synthetic loan data on a stage, the same XGBoost
pipeline trained twice as a job (a ``@remote`` function, and ``submit_directory`` of
``train_job/``), each saving its model and metrics to a stage, then both models fetched from the
stage and scored here on the held-out applications.

    python run.py --rows 20000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import joblib
import prepare_data
from train_job import loan_model  # for scoring here exactly as in the job

from mljobs import Session, create_compute_pool, remote, submit_directory

HERE = Path(__file__).resolve().parent
POOL = "DEMO_POOL_CPU"


@remote(POOL, stage_name="payload_stage", imports=[HERE / "train_job" / "loan_model.py"])
def train_remote(session: Session, data_path: str, model_stage: str, n_estimators: int = 200) -> dict:
    import loan_model  # shipped with the function by imports=

    return loan_model.train_and_save(session, data_path, model_stage, n_estimators=n_estimators)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description="train and evaluate the loan default classifier as jobs")
    parser.add_argument("--rows", type=int, default=20000, help="synthetic applications (default 20000)")
    parser.add_argument("--n-estimators", type=int, default=200)
    args = parser.parse_args(argv)
    if args.n_estimators < 1:
        parser.error(f"--n-estimators {args.n_estimators}: give at least 1 (e.g. 200)")
    try:
        loans = prepare_data.make_loans(args.rows)
    except ValueError as e:
        parser.error(str(e))

    session = Session.builder.getOrCreate()
    create_compute_pool(POOL, instance_family="CPU_X64_S", max_nodes=1, if_not_exists=True)
    data = prepare_data.upload(session, loans, "@loan_data/")
    print(f"data: {len(loans)} applications on {data['train']} and {data['holdout']}", flush=True)

    jobs = {
        "remote": train_remote(session, data["train"], "@models/xgb/remote/", args.n_estimators),
        "directory": submit_directory(HERE / "train_job", POOL, entrypoint="main.py", stage_name="payload_stage",
                                      args=["--data", data["train"], "--model-stage", "@models/xgb/directory/",
                                            "--n-estimators", str(args.n_estimators)]),
    }
    holdout = loan_model.read_stage_parquet(session, data["holdout"])
    report = {}
    for how, job in jobs.items():
        metrics = job.result(timeout=900)
        with tempfile.TemporaryDirectory() as tmp:  # the model as the job saved it, from the stage
            session.file.get(metrics["model_path"], tmp)
            model = joblib.load(Path(tmp) / loan_model.MODEL_FILE)
        scored = loan_model.score(model, holdout)
        report[how] = {"job": job.id, **metrics, **{f"holdout_{k}": v for k, v in scored.items()}}
        print(f"{how}: job {job.id} fit {metrics['train_rows']} rows in {metrics['fit_seconds']}s; "
              f"validation accuracy {metrics['valid_accuracy']:.3f}; holdout accuracy {scored['accuracy']:.3f} "
              f"auc {scored['roc_auc']:.3f} ({scored['rows']} rows, model from {metrics['model_path']})",
              flush=True)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
