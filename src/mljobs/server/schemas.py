"""The REST API's request and response bodies (pydantic), so the OpenAPI schema says what each
route takes and gives, and a malformed body is a 422 naming the field.

A job's submission is :class:`mljobs.spec.JobSpec` itself (pydantic validates the dataclass);
the models here are the shapes of everything else.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from mljobs.server.records import JobRecord
from mljobs.spec import PayloadKind
from mljobs.status import JOB_STATUS

__all__ = ["Name", "PoolIn", "PoolAlter", "IntegrationIn", "PruneEnvsIn", "StageIn", "UserIn", "PruneJobsIn",
           "JobSummary", "JobOut", "InstanceOut", "PoolOut", "IntegrationOut", "StageOut", "StageFileOut",
           "EnvOut", "UserOut", "UserCreated", "Ok", "RayInfoOut", "HealthOut", "WhoAmI", "PrunedJobs", "MetricRow", "JobEvent",
           "DefinitionOut", "DefinitionCallIn", "ScheduleIn", "ScheduleOut", "ScheduleEvent", "QuotaIn",
           "QuotaOut"]

# Names of pools, stages and integrations; the service checks their form and says how to fix it.
Name = Annotated[str, StringConstraints(min_length=1, max_length=255)]
_NODES = Field(ge=0, le=100_000)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored


class PoolIn(_In):
    name: Name
    instance_family: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    min_nodes: Annotated[int, _NODES] = 1
    max_nodes: Annotated[int, Field(ge=1, le=100_000)] = 1
    provider: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "local"
    # checked by the provider, which names the options it knows
    provider_options: Annotated[dict[str, Any], Field(max_length=64)] = {}
    if_not_exists: bool = False
    scheduling: Annotated[str, StringConstraints(max_length=8)] | None = None  # fair, fifo; None: fair with users
    preemption: bool = False
    max_priority: Annotated[int, Field(ge=-1000, le=1000)] = 0


class PoolAlter(_In):
    suspend: bool | None = None
    resume: bool | None = None
    max_nodes: Annotated[int, Field(ge=1, le=100_000)] | None = None
    scheduling: Annotated[str, StringConstraints(max_length=8)] | None = None
    preemption: bool | None = None
    max_priority: Annotated[int, Field(ge=-1000, le=1000)] | None = None


class QuotaIn(_In):
    """A user's limits on a pool; None: no limit (the next less specific row's, if any)."""

    max_instances: Annotated[int, Field(ge=0, le=100_000)] | None = None
    max_queued: Annotated[int, Field(ge=0, le=10_000_000)] | None = None
    max_instance_hours: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)] | None = None


class QuotaOut(BaseModel):
    owner: str
    pool: str
    max_instances: int | None = None
    max_queued: int | None = None
    max_instance_hours: float | None = None


class IntegrationIn(_In):
    name: Name
    allowed_hosts: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=255)]],
                             Field(min_length=1, max_length=1000)]
    replace: bool = False
    if_not_exists: bool = False


class PruneEnvsIn(_In):
    max_bytes: Annotated[int, Field(ge=0)] | None = None  # None: down to the server's cap; 0: every idle one


class StageIn(_In):
    name: Name
    url: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None


class UserIn(_In):
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    admin: bool = False


class PruneJobsIn(_In):
    older_than_s: Annotated[float, Field(ge=0, le=36500 * 86400.0)]
    statuses: list[JOB_STATUS] | None = None


class InstanceOut(BaseModel):
    instance_id: int
    status: str
    exit_code: int | None = None
    started_time: dt.datetime | None = None
    ended_time: dt.datetime | None = None
    cpu_seconds: float | None = None
    peak_rss_bytes: int | None = None
    isolation: str | None = None  # the sandbox it ran in ("sandbox (shared, uid N (alice))", "none")


class _JobWorkedOut(BaseModel):
    """What a job's summary has beside its record's fields: what the server works out for it."""

    peak_rss_bytes: int | None = None  # the largest instance's, once instances ended
    cpu_seconds: float | None = None  # all instances' together
    pending_reason: str | None = None  # a queued job's: why it has not started


def _record_fields() -> dict[str, Any]:
    """The public fields of a job's record (:class:`mljobs.server.records.JobRecord`, the one
    list of them) as pydantic fields, its status typed as the enum."""
    hints = typing.get_type_hints(JobRecord)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(JobRecord):
        if f.name not in JobRecord.PRIVATE:
            out[f.name] = (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
    out["status"] = (JOB_STATUS, ...)
    return out


# A row of ``list_jobs``: a job's record (its fields listed once, in JobRecord) and what the server
# works out for it.
JobSummary = create_model("JobSummary", __base__=_JobWorkedOut, __module__=__name__, **_record_fields())
JobSummary.__doc__ = "A row of ``list_jobs``."


class JobOut(JobSummary):  # type: ignore[valid-type,misc]
    """One job, with its instances."""

    payload_kind: PayloadKind | None = None
    parallel: bool = False
    max_retries: int = 0
    instances: list[InstanceOut] = []


class JobWaitOut(JobOut):
    """A job as a wait returns it; asked with ``result=true``, an ended job's result comes along."""

    result: str | None = Field(None, description="the result envelope, base64 (what GET .../result returns): "
                               "only when asked for, the job ended with one, and it is at most 1 MiB")


class PoolOut(BaseModel):
    name: str
    instance_family: str
    min_nodes: int
    max_nodes: int
    provider: str
    provider_options: dict[str, Any] = {}
    suspended: bool
    created_time: dt.datetime
    owner: str | None = None
    state: str
    nodes_in_use: int
    queued: int
    running: int
    family: str
    cpus_per_node: int
    memory_bytes_per_node: int
    gpus_per_node: int
    scheduling: str = "fifo"  # in force: "fair" or "fifo"
    preemption: bool = False
    max_priority: int = 0
    users: list[dict[str, Any]] = []  # who holds it now (describe only): running, queued, usage, share


class IntegrationOut(BaseModel):
    name: str
    allowed_hosts: list[str]
    created_time: dt.datetime


class StageOut(BaseModel):
    name: str
    url: str
    created_time: dt.datetime
    owner: str | None = None


class StageFileOut(BaseModel):
    name: str
    size: int


class UploadIn(_In):
    files: list[list[Any]] = Field(description="[[path, sha256, size, mode], ...]: every file of the payload")


class UploadOut(BaseModel):
    id: str
    missing: list[str] = Field(description="the paths to send (PUT a tar of them); the stage has the others")
    files: int
    bytes: int
    reused_bytes: int


class UploadReceived(BaseModel):
    files: int
    bytes: int


class EnvOut(BaseModel):
    key: str
    requirements: list[str]
    runtime_packages: list[str] = []
    python: str
    python_version: str
    index: dict[str, Any] = {}
    created: float
    size_bytes: int
    path: str
    last_used: float
    in_use: bool


class UserOut(BaseModel):
    name: str
    admin: bool
    created_time: dt.datetime


class UserCreated(BaseModel):
    name: str
    admin: bool
    token: str  # shown this once; the server keeps only its hash


class Ok(BaseModel):
    ok: bool = True


class RayInfoOut(BaseModel):
    job_id: str
    status: JOB_STATUS
    gcs_address: str | None = None
    dashboard_url: str | None = None


class HealthOut(BaseModel):
    ok: bool
    version: str
    python: str
    cloudpickle: str
    pid: int
    home: str
    store: str
    auth: str  # "local-admin" (no users, loopback) or "tokens"
    containment: dict[str, Any] = {}  # per provider: how a job's processes are kept and ended
    isolation: dict[str, Any] = {}  # the job sandbox in force: setting, mode, and any warning
    features: list[str] = []  # what a client may rely on beyond the version: see service.FEATURES


class JobEvent(BaseModel):
    """One status a job took: when, and why (``message``)."""

    time: dt.datetime
    status: JOB_STATUS
    message: str = ""


class MetricRow(BaseModel):
    """One resource sample of one instance (``MLJob.get_metrics()`` rows)."""

    time: float
    instance: int
    cpu_percent: float | None = None
    cpu_seconds: float
    rss_bytes: int
    peak_rss_bytes: int
    gpu_util: float | None = None
    gpu_memory_bytes: int | None = None


class InstanceReportIn(_In):
    """What a remote instance's agent sends (mljobs.runtime.agent); see InstanceReport."""

    lines: Annotated[list[Annotated[str, StringConstraints(max_length=1 << 20)]], Field(max_length=100_000)] = []
    metrics: Annotated[list[dict[str, Any]], Field(max_length=10_000)] = []
    address: Annotated[str, StringConstraints(max_length=255)] | None = None
    hostname: Annotated[str, StringConstraints(max_length=255)] | None = None
    ray: dict[str, Any] | None = None
    exit: dict[str, Any] | None = None
    granted: Annotated[int, Field(ge=1, le=100_000)] | None = None


class ReportReply(BaseModel):
    action: str | None = None  # cancel | release | stop
    addresses: list[str] | None = None  # a multi-node job's nodes, once all have reported


class WhoAmI(BaseModel):
    name: str
    admin: bool
    job_id: str | None = None


class PrunedJobs(BaseModel):
    deleted: list[str]


class DefinitionOut(BaseModel):
    """A job definition: registered once, called many times."""

    name: str
    owner: str
    version: int
    payload_kind: PayloadKind
    compute_pool: str
    stage_name: str
    entrypoint: list[str]
    args: list[str]
    target_instances: int
    min_instances: int | None = None
    parallel: bool = False
    max_retries: int = 0
    session_param: str | None = None
    # a function's parameters: [{"name", "kind" (inspect's), "has_default"}]
    signature: list[dict[str, Any]] | None = None
    created_time: dt.datetime
    updated_time: dt.datetime


class DefinitionCallIn(_In):
    """One call of a definition: a script's ``args``, or a function's pickled arguments (base64)."""

    args: Annotated[list[Annotated[str, StringConstraints(max_length=100_000)]], Field(max_length=10_000)] | None = None
    call: Annotated[str, StringConstraints(max_length=32 << 20)] | None = None
    name: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None


class ScheduleIn(_In):
    name: Name
    definition: Name
    cron: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None
    every: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    args: Annotated[list[Annotated[str, StringConstraints(max_length=100_000)]], Field(max_length=10_000)] | None = None
    call: Annotated[str, StringConstraints(max_length=32 << 20)] | None = None
    timezone: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "UTC"
    concurrency: Annotated[str, StringConstraints(min_length=1, max_length=16)] = "forbid"
    catchup: bool = False
    start_at: dt.datetime | None = None
    end_at: dt.datetime | None = None


class ScheduleOut(BaseModel):
    name: str
    owner: str
    definition: str
    cron: str | None = None
    every_s: float | None = None
    timezone: str
    concurrency: str
    catchup: bool
    start_at: dt.datetime | None = None
    end_at: dt.datetime | None = None
    paused: bool
    next_tick: dt.datetime | None = None
    last_tick: dt.datetime | None = None
    last_job_id: str | None = None
    last_status: str | None = None
    note: str = ""
    created_time: dt.datetime


class ScheduleEvent(BaseModel):
    time: dt.datetime
    tick: dt.datetime | None = None
    kind: str
    job_id: str | None = None
    message: str = ""
