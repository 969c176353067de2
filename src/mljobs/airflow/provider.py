"""What Airflow's providers manager reads (entry point ``apache_airflow_provider``): ``@task.mljobs``
and the ``mljobs`` connection type. Imports nothing of Airflow, so the providers manager can read it while Airflow starts."""

from __future__ import annotations

from typing import Any

from mljobs import __version__

__all__ = ["get_provider_info"]


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "mljobs",
        "name": "mljobs",
        "description": "Run Airflow tasks as jobs on mljobs compute pools",
        "versions": [__version__],
        "task-decorators": [{"name": "mljobs", "class-name": "mljobs.airflow.decorator.mljob_task"}],
        "connection-types": [{"connection-type": "mljobs", "hook-class-name": "mljobs.airflow.hook.MLJobsHook",
                              "hook-name": "mljobs"}],
    }
