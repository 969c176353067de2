"""Distributed trainers on the job's Ray cluster: XGBoost, LightGBM and PyTorch DDP."""

from __future__ import annotations

from mljobs.modeling.distributors.lightgbm import LightGBMEstimator, LightGBMScalingConfig
from mljobs.modeling.distributors.pytorch import (PyTorchDistributor, PyTorchDistributorResult, PyTorchScalingConfig,
                                                  WorkerResourceConfig, get_context)
from mljobs.modeling.distributors.xgboost import XGBEstimator, XGBScalingConfig

__all__ = ["XGBEstimator", "XGBScalingConfig", "LightGBMEstimator", "LightGBMScalingConfig", "PyTorchDistributor",
           "PyTorchDistributorResult", "PyTorchScalingConfig", "WorkerResourceConfig", "get_context"]
