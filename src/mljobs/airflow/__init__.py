"""Airflow 3 integration: ``MLJobOperator``, ``@mljob_task`` (``@task.mljobs``), ``MLJobTrigger``, ``MLJobsHook``.

Needs ``pip install 'mljobs[airflow]'`` (Airflow >= 3) where the tasks run; see docs/airflow.md.
The names load on first use (PEP 562), so Airflow's providers manager reads
:mod:`mljobs.airflow.provider` without importing operators while Airflow itself starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {"MLJobOperator": "mljobs.airflow.operator", "XCOM_JOB_ID": "mljobs.airflow.operator",
            "MLJobTrigger": "mljobs.airflow.trigger", "MLJobsHook": "mljobs.airflow.hook",
            "mljob_task": "mljobs.airflow.decorator"}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from mljobs.airflow.decorator import mljob_task
    from mljobs.airflow.hook import MLJobsHook
    from mljobs.airflow.operator import XCOM_JOB_ID, MLJobOperator
    from mljobs.airflow.trigger import MLJobTrigger


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mljobs.airflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
