"""Data model shared by client, server and runtime: instance families, pools, jobs.

Plain dataclasses with a JSON round trip (``to_dict`` / ``from_dict``); no I/O here.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import uuid
from typing import Any

from mljobs.errors import InvalidArgumentError

__all__ = [
    "InstanceFamily",
    "INSTANCE_FAMILIES",
    "instance_family",
    "PayloadKind",
    "PoolState",
    "PoolSpec",
    "JobSpec",
    "new_job_id",
    "is_job_id",
    "DEFAULT_POOL",
    "DEFAULT_DATABASE",
    "DEFAULT_SCHEMA",
    "REMOTE_PREFIX",
    "REMOTE_FEATURE",
]

DEFAULT_POOL = "DEFAULT_POOL"
SCHEDULING = ("fair", "fifo")
DEFAULT_DATABASE = "MLJOBS"
DEFAULT_SCHEMA = "PUBLIC"
GIB = 1024**3
# @remote registers each version of its function as a definition of its own, named with this
# prefix (mljobs.client.definitions.remote_name), which the server keeps unlisted and prunes
# (mljobs.server.definitions); a server that does says REMOTE_FEATURE in /health's "features"
REMOTE_PREFIX = "_REMOTE_"
REMOTE_FEATURE = "remote-definitions"


@dataclasses.dataclass(frozen=True)
class InstanceFamily:
    """One node size: what each instance of a pool of this family gets."""

    name: str
    cpus: int
    memory_bytes: int
    gpus: int = 0
    gpu_type: str | None = None

    def describe(self) -> str:
        gpu = f", {self.gpus} {self.gpu_type or 'GPU'}" if self.gpus else ""
        return f"{self.cpus} CPU, {self.memory_bytes // GIB} GiB{gpu}"


INSTANCE_FAMILIES: dict[str, InstanceFamily] = {
    f.name: f
    for f in (
        InstanceFamily("CPU_X64_XS", 1, 2 * GIB),
        InstanceFamily("CPU_X64_S", 2, 8 * GIB),
        InstanceFamily("CPU_X64_M", 6, 28 * GIB),
        InstanceFamily("CPU_X64_L", 28, 116 * GIB),
        InstanceFamily("HIGHMEM_X64_S", 6, 58 * GIB),
        InstanceFamily("HIGHMEM_X64_M", 28, 240 * GIB),
        InstanceFamily("GPU_NV_S", 6, 27 * GIB, 1, "A10G"),
        InstanceFamily("GPU_NV_M", 44, 178 * GIB, 4, "A10G"),
        InstanceFamily("GPU_NV_L", 92, 1112 * GIB, 8, "A100"),
        InstanceFamily("GPU_NV_H100", 26, 240 * GIB, 1, "H100"),
    )
}


def instance_family(name: str) -> InstanceFamily:
    """Look up a family by name (case-insensitive); the error lists the known ones."""
    fam = INSTANCE_FAMILIES.get(name.upper())
    if fam is None:
        raise InvalidArgumentError(
            f"unknown instance family {name!r}; choose one of: {', '.join(INSTANCE_FAMILIES)}"
        )
    return fam


class PayloadKind(str, enum.Enum):
    FUNCTION = "function"  # a cloudpickled function with its arguments
    FILE = "file"  # one script
    DIRECTORY = "directory"  # a directory with an entrypoint
    STAGE = "stage"  # a directory already on a stage

    def __str__(self) -> str:
        return self.value


class PoolState(str, enum.Enum):
    ACTIVE = "ACTIVE"  # instances running
    IDLE = "IDLE"  # ready, nothing running
    SUSPENDED = "SUSPENDED"  # starts nothing new

    def __str__(self) -> str:
        return self.value


_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,254}$")


def check_identifier(kind: str, name: str) -> str:
    """Validate a pool, stage or integration name; names are case-insensitive, kept upper-case."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgumentError(
            f"invalid {kind} name {name!r}: use letters, digits and underscores, starting with a letter"
        )
    return name.upper()


@dataclasses.dataclass
class PoolSpec:
    name: str
    instance_family: str
    min_nodes: int = 1
    max_nodes: int = 1
    provider: str = "local"
    provider_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    scheduling: str | None = None  # "fair" or "fifo"; None: fair once the server has users
    preemption: bool = False  # a higher-priority job that cannot start takes lower ones' instances
    max_priority: int = 0  # the highest priority a non-admin may give a job on this pool

    def __post_init__(self) -> None:
        self.name = check_identifier("compute pool", self.name)
        if self.scheduling is not None and self.scheduling not in SCHEDULING:
            raise InvalidArgumentError(f"compute pool {self.name}: scheduling={self.scheduling!r}; use 'fair' (the "
                                       "least recent user first) or 'fifo' (submission order)")
        self.provider_options = dict(self.provider_options or {})
        self.instance_family = instance_family(self.instance_family).name
        if self.min_nodes < 0 or self.max_nodes < 1 or self.min_nodes > self.max_nodes:
            raise InvalidArgumentError(
                f"compute pool {self.name}: need 0 <= min_nodes <= max_nodes and max_nodes >= 1, "
                f"got min_nodes={self.min_nodes}, max_nodes={self.max_nodes}"
            )

    @property
    def family(self) -> InstanceFamily:
        return INSTANCE_FAMILIES[self.instance_family]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoolSpec:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and d[f.name] is not None})


@dataclasses.dataclass
class JobSpec:
    """Everything a submission says about a job, as the client sends it."""

    compute_pool: str
    stage_name: str
    payload_kind: PayloadKind
    entrypoint: list[str] = dataclasses.field(default_factory=list)  # ["main.py"] or a command
    args: list[str] = dataclasses.field(default_factory=list)
    name: str | None = None
    target_instances: int = 1
    min_instances: int | None = None
    pip_requirements: list[str] = dataclasses.field(default_factory=list)
    external_access_integrations: list[str] = dataclasses.field(default_factory=list)
    env_vars: dict[str, str] = dataclasses.field(default_factory=dict)
    imports: list[str] = dataclasses.field(default_factory=list)  # import roots inside app/.imports
    database: str = DEFAULT_DATABASE
    schema: str = DEFAULT_SCHEMA
    owner: str = ""
    source: str | None = None  # for STAGE payloads: "@stage/dir/"
    session_param: str | None = None  # function parameter that receives the job's session
    client_python: str = ""  # "3.11.7"
    client_cloudpickle: str = ""
    # The interpreter: None picks the client's major.minor when the server has it, else the
    # server's; "server", a version like "3.12", or an interpreter path pick one explicitly.
    runtime_environment: str | None = None
    runtime_python: str = ""  # the interpreter the server chose (filled in at submit)
    # Multi-node: run the entrypoint on every instance (ranks in env vars) instead of on the
    # head of a Ray cluster; and how long the head waits for min_instances nodes to join.
    parallel: bool = False
    join_timeout_s: float = 720.0
    # Retries: a job whose instance is lost (node lost, killed from outside, an INTERNAL_ERROR of
    # ours) runs again as its next attempt, up to max_retries times; with retry_on_failure its
    # own failures (an exception, a non-zero exit) do too. A cancel never does.
    max_retries: int = 0
    retry_on_failure: bool = False
    # Order in the pool's queue, before fair share (higher first); above the pool's max_priority
    # only for admins. On a pool with preemption, a higher one may take a lower one's instances.
    priority: int = 0

    def __post_init__(self) -> None:
        self.payload_kind = PayloadKind(self.payload_kind)
        self.compute_pool = check_identifier("compute pool", self.compute_pool)
        self.stage_name = check_stage_name(self.stage_name)
        if not isinstance(self.target_instances, int) or self.target_instances < 1:
            raise InvalidArgumentError(f"target_instances must be an int >= 1, got {self.target_instances!r}")
        if self.min_instances is not None and (
            not isinstance(self.min_instances, int) or not 1 <= self.min_instances <= self.target_instances
        ):
            raise InvalidArgumentError(
                f"min_instances must be between 1 and target_instances ({self.target_instances}), "
                f"got {self.min_instances!r}"
            )
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or not 0 <= self.max_retries <= 100:
            raise InvalidArgumentError(f"max_retries must be an int from 0 to 100, got {self.max_retries!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or not -1000 <= self.priority <= 1000:
            raise InvalidArgumentError(f"priority must be an int from -1000 to 1000, got {self.priority!r}")
        if not isinstance(self.join_timeout_s, (int, float)) or not self.join_timeout_s > 0:
            raise InvalidArgumentError(f"join_timeout_s must be a number of seconds > 0, got {self.join_timeout_s!r}")
        self.args = [str(a) for a in self.args]
        self.env_vars = {str(k): str(v) for k, v in self.env_vars.items()}
        for k in self.env_vars:
            if not k or "=" in k or "\0" in k:
                raise InvalidArgumentError(f"env_vars: invalid variable name {k!r}")

    @property
    def effective_min_instances(self) -> int:
        return self.target_instances if self.min_instances is None else self.min_instances

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["payload_kind"] = self.payload_kind.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def check_stage_name(name: str) -> str:
    """Accept ``name`` or ``@name``; returns the bare upper-case name."""
    if isinstance(name, str) and name.startswith("@"):
        name = name[1:]
    return check_identifier("stage", name.rstrip("/"))


def new_job_id() -> str:
    return "MLJOB_" + str(uuid.uuid4()).upper().replace("-", "_")


_JOB_ID_RE = re.compile(r"^MLJOB_[0-9A-F]{8}_[0-9A-F]{4}_[0-9A-F]{4}_[0-9A-F]{4}_[0-9A-F]{12}$")


def is_job_id(value: str) -> bool:
    return isinstance(value, str) and bool(_JOB_ID_RE.match(value.upper()))
