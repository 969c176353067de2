"""Synthetic loan applications for the xgb_classifier example, put on a stage.

``python prepare_data.py --rows 20000`` writes ``@loan_data/train/loans.parquet`` (80 %) and
``@loan_data/holdout/loans.parquet`` (20 %, for the evaluation in the client). Whether a loan
defaults depends on the applicant's numbers through a known logistic model, so a good classifier
gets well above the base rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from mljobs import Session

__all__ = ["LABEL", "make_loans", "upload", "main"]

LABEL = "defaulted"  # the columns are those of make_loans; train_job/loan_model.py names the features
PURPOSES = ["debt_consolidation", "home_improvement", "car", "business", "education", "medical"]
PURPOSE_RISK = {"debt_consolidation": 0.2, "home_improvement": -0.3, "car": -0.2, "business": 0.6,
                "education": 0.1, "medical": 0.3}
OWNERSHIP = ["rent", "mortgage", "own"]
OWNERSHIP_RISK = {"rent": 0.3, "mortgage": -0.1, "own": -0.4}


def make_loans(rows: int, seed: int = 0) -> pd.DataFrame:
    """``rows`` loan applications with a ``defaulted`` label (0/1)."""
    if rows < 100:
        raise ValueError(f"rows={rows}: give at least 100 rows (e.g. --rows 20000)")
    rng = np.random.default_rng(seed)
    income = np.round(rng.lognormal(mean=11.0, sigma=0.45, size=rows), -2)
    loan_amount = np.round(np.clip(rng.normal(0.35, 0.15, rows), 0.02, 1.2) * income, -2)
    term = rng.choice([36, 60], size=rows, p=[0.7, 0.3])
    credit = np.clip(rng.normal(690, 60, rows), 300, 850).round()
    dti = np.clip(rng.gamma(4.0, 4.5, rows), 0, 60).round(1)
    employment = np.clip(rng.exponential(5.0, rows), 0, 40).round(1)
    accounts = rng.poisson(8, rows)
    purpose = rng.choice(PURPOSES, size=rows)
    ownership = rng.choice(OWNERSHIP, size=rows, p=[0.45, 0.4, 0.15])
    logit = 3.0 * (-0.35 - 0.018 * (credit - 690) + 0.05 * (dti - 18) + 2.2 * (loan_amount / income - 0.35)
             + 0.5 * (term == 60) - 0.06 * np.minimum(employment, 10)
             + np.vectorize(PURPOSE_RISK.get)(purpose) + np.vectorize(OWNERSHIP_RISK.get)(ownership))
    defaulted = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    return pd.DataFrame({"income": income, "loan_amount": loan_amount, "term_months": term,
                         "credit_score": credit, "debt_to_income": dti, "employment_years": employment,
                         "open_accounts": accounts, "purpose": purpose, "home_ownership": ownership,
                         LABEL: defaulted})


def upload(session: Session, loans: pd.DataFrame, stage: str = "@loan_data/") -> dict[str, str]:
    """Split ``loans`` 80/20 and put both parts on ``stage``; returns their stage paths."""
    stage = stage if stage.endswith("/") else stage + "/"
    cut = int(len(loans) * 0.8)
    paths = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part, frame in (("train", loans.iloc[:cut]), ("holdout", loans.iloc[cut:])):
            local = Path(tmp) / "loans.parquet"
            frame.to_parquet(local, index=False)
            paths[part] = f"{stage}{part}/loans.parquet"
            session.file.put(local, f"{stage}{part}/")
    return paths


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000, help="how many applications (default 20000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", default="@loan_data/", help="where to put them (default @loan_data/)")
    args = parser.parse_args(argv)
    try:
        loans = make_loans(args.rows, args.seed)
    except ValueError as e:
        parser.error(str(e))
    paths = upload(Session.builder.getOrCreate(), loans, args.stage)
    print(f"{len(loans)} loan applications ({loans[LABEL].mean():.1%} defaulted): "
          f"{paths['train']}, {paths['holdout']}")
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
