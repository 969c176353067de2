"""mljobs: run machine-learning jobs on compute pools from any Python environment.

The public API is loaded on first use (PEP 562), so the runtime's own processes, which import
``mljobs.runtime``, do not pay for the client's imports (httpx, pandas).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "remote": "mljobs.client.definitions", "submit_file": "mljobs.client.jobs",
    "submit_directory": "mljobs.client.jobs", "submit_from_stage": "mljobs.client.jobs",
    "get_job": "mljobs.client.jobs", "list_jobs": "mljobs.client.jobs", "delete_job": "mljobs.client.jobs",
    "MLJobDefinition": "mljobs.client.definitions", "get_definition": "mljobs.client.definitions",
    "list_definitions": "mljobs.client.definitions", "create_schedule": "mljobs.client.schedules",
    "list_schedules": "mljobs.client.schedules", "pause_schedule": "mljobs.client.schedules",
    "resume_schedule": "mljobs.client.schedules", "drop_schedule": "mljobs.client.schedules",
    "get_schedule": "mljobs.client.schedules", "schedule_events": "mljobs.client.schedules", "MLJob": "mljobs.client.job",
    "DistributedResult": "mljobs.client.job", "InstancesUnavailableError": "mljobs.errors",
    "Session": "mljobs.client.session", "get_active_session": "mljobs.client.session",
    "create_compute_pool": "mljobs.client.pools", "alter_compute_pool": "mljobs.client.pools",
    "drop_compute_pool": "mljobs.client.pools", "list_compute_pools": "mljobs.client.pools",
    "describe_compute_pool": "mljobs.client.pools", "create_stage": "mljobs.client.pools",
    "create_external_access_integration": "mljobs.client.pools",
    "list_external_access_integrations": "mljobs.client.pools",
    "drop_external_access_integration": "mljobs.client.pools", "list_environments": "mljobs.client.pools",
    "set_user_quota": "mljobs.client.pools", "get_user_quota": "mljobs.client.pools",
    "QuotaExceededError": "mljobs.errors",
    "prune_environments": "mljobs.client.pools", "EnvironmentBuildError": "mljobs.errors",
    "JOB_STATUS": "mljobs.status", "INSTANCE_FAMILIES": "mljobs.spec", "InstanceFamily": "mljobs.spec",
    "MLJobsError": "mljobs.errors", "RemoteError": "mljobs.errors", "JobFailedError": "mljobs.errors",
    "ServerUnavailableError": "mljobs.errors", "VersionMismatchError": "mljobs.errors",
    "InvalidArgumentError": "mljobs.errors", "NotFoundError": "mljobs.errors", "PayloadError": "mljobs.errors",
    "LocalFileNotFoundError": "mljobs.errors", "AuthenticationError": "mljobs.errors",
    "PermissionDeniedError": "mljobs.errors", "PayloadTooLargeError": "mljobs.errors",
}
__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from mljobs.client.job import DistributedResult, MLJob
    from mljobs.client.definitions import MLJobDefinition, get_definition, list_definitions, remote
    from mljobs.client.jobs import delete_job, get_job, list_jobs, submit_directory, submit_file, submit_from_stage
    from mljobs.client.schedules import (create_schedule, drop_schedule, get_schedule, list_schedules,
                                         pause_schedule, resume_schedule, schedule_events)
    from mljobs.client.pools import (alter_compute_pool, create_compute_pool, create_external_access_integration,
                                     create_stage, describe_compute_pool, drop_compute_pool,
                                     drop_external_access_integration, get_user_quota, list_compute_pools,
                                     list_environments, list_external_access_integrations, prune_environments,
                                     set_user_quota)
    from mljobs.client.session import Session, get_active_session
    from mljobs.errors import (AuthenticationError, EnvironmentBuildError, InstancesUnavailableError,
                               InvalidArgumentError, JobFailedError, LocalFileNotFoundError, MLJobsError,
                               NotFoundError, PayloadError, PayloadTooLargeError, PermissionDeniedError,
                               QuotaExceededError, RemoteError, ServerUnavailableError, VersionMismatchError)
    from mljobs.spec import INSTANCE_FAMILIES, InstanceFamily
    from mljobs.status import JOB_STATUS


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mljobs' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
