"""Entrypoint of the xgb_classifier training job (``submit_directory`` of this folder).

``python main.py --data @loan_data/train/ --model-stage @models/xgb/directory/``: trains the
pipeline of ``loan_model.py`` (beside this file) and saves it with its metrics to the stage.
"""

from __future__ import annotations

import argparse

import loan_model

from mljobs import Session

parser = argparse.ArgumentParser(description="train the loan default classifier")
parser.add_argument("--data", default="@loan_data/train/")
parser.add_argument("--model-stage", default="@models/xgb/directory/")
parser.add_argument("--n-estimators", type=int, default=200)
parser.add_argument("--max-depth", type=int, default=4)
args = parser.parse_args()

session = Session.builder.getOrCreate()  # inside a job: the job's own session
__return__ = loan_model.train_and_save(session, args.data, args.model_stage, args.n_estimators, args.max_depth)
