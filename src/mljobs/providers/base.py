"""The provider interface: start, watch, cancel and clean up job instances.

A provider says what it can do with capability flags; a method it cannot serve raises
:class:`UnsupportedError` with what the operator should do instead.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from mljobs.errors import MLJobsError
from mljobs.spec import InstanceFamily, JobSpec, PoolSpec

__all__ = ["Provider", "InstanceLaunch", "InstanceHandle", "InstanceExit", "InstanceReport", "UnsupportedError",
           "get_provider_class", "launch_document", "check_options"]


class UnsupportedError(MLJobsError):
    """The provider cannot do this; the message says what to use instead."""


@dataclasses.dataclass
class InstanceLaunch:
    """What a provider needs to start one instance."""

    job_id: str
    instance_id: int
    instance_count: int
    spec: JobSpec
    family: InstanceFamily
    slot: int  # the instance's slot in its pool (0..max_nodes-1): picks CPUs and GPUs
    stage: Any  # mljobs.stages.Stage holding the payload under <job_id>/app/
    env: dict[str, str]  # mljobs' own variables for the payload (session, ids)
    grace_period_s: float = 3.0
    # When the job needs its own environment: {"request": EnvRequest as a dict, "cache_dir",
    # "max_bytes", "timeout_s"}; the instance builds or reuses it before the payload starts.
    environment: dict[str, Any] | None = None
    pool: PoolSpec | None = None  # the pool, with its provider_options
    # How the payload is sandboxed (mljobs.runtime.sandbox.Policy as a dict); None: it is not.
    sandbox: dict[str, Any] | None = None
    attempt: int = 1  # which run of the job this is: from 2 on, its checkpoint folder is restored first


def launch_document(launch: InstanceLaunch, env: dict[str, str], **node: Any) -> dict[str, Any]:
    """The supervisor's ``launch.json`` (see :mod:`mljobs.runtime.supervisor`): the job's part from
    ``launch``, the node's part (paths, CPUs, GPUs, network, containment) from ``node``."""
    spec = launch.spec
    env = {**env, **launch.env, **spec.env_vars, "PYTHONUNBUFFERED": "1"}  # the user's own variables win
    return {
        "job_id": launch.job_id, "instance_id": launch.instance_id, "instance_count": launch.instance_count,
        "payload_kind": spec.payload_kind.value, "entrypoint": spec.entrypoint, "args": spec.args,
        "session_param": spec.session_param, "client_python": spec.client_python,
        "client_cloudpickle": spec.client_cloudpickle, "env": env, "memory_bytes": launch.family.memory_bytes,
        "environment": launch.environment, "grace_period_s": launch.grace_period_s,
        # a remote node's agent restores the checkpoint folder for an attempt after the first, and
        # keeps it on the stage while the job has attempts left (the server does it for local ones,
        # from the copy their supervisor keeps as the folder settles: ``settle_checkpoint``)
        "attempt": launch.attempt, "keep_checkpoint": launch.attempt <= spec.max_retries, **node,
    }


def check_options(provider: str, pool: PoolSpec, known: dict[str, str]) -> None:
    """Refuse options the provider does not know, naming the ones it does (``known``: name -> what)."""
    from mljobs.errors import InvalidArgumentError

    unknown = sorted(set(pool.provider_options) - set(known))
    if unknown:
        valid = "; ".join(f"{k}: {v}" for k, v in known.items()) or "none"
        raise InvalidArgumentError(f"compute pool {pool.name}: unknown {provider} provider option(s) {unknown}; "
                                   f"valid options are {valid}")


@dataclasses.dataclass
class InstanceReport:
    """What a remote instance's agent (:mod:`mljobs.runtime.agent`) sends the control plane: its
    new log records and resource samples, where it runs, and once it has ended its exit record."""

    lines: list[str] = dataclasses.field(default_factory=list)  # mljobs.logformat records
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    address: str | None = None  # the node's address as the control plane sees it
    hostname: str | None = None
    ray: dict[str, Any] | None = None  # a head's Ray addresses
    exit: dict[str, Any] | None = None  # the supervisor's exit.json, plus "error" when the payload raised
    granted: int | None = None  # how many nodes the engine gave a job that asked for a range


@dataclasses.dataclass
class InstanceHandle:
    """How to find a running instance again, also after a server restart (stored as JSON)."""

    job_id: str
    instance_id: int
    pid: int | None = None
    pid_start: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InstanceHandle:
        return cls(**d)


@dataclasses.dataclass
class InstanceExit:
    """How an instance ended. ``lost`` means the platform lost it (no exit record)."""

    exit_code: int | None
    cancelled: bool = False
    lost: bool = False
    error: dict[str, Any] | None = None  # {"exc_type", "exc_message"} when the payload raised
    result: bytes | None = None  # the launcher's envelope, if it wrote one
    log_tail: list[str] = dataclasses.field(default_factory=list)
    released: bool = False  # a multi-node worker stopped because its head had finished
    oom: dict[str, int] | None = None  # {"used_bytes", "limit_bytes"} when it ended over its memory
    usage: dict[str, Any] | None = None  # {"cpu_seconds", "peak_rss_bytes"} over its whole run
    isolation: str | None = None  # the sandbox it ran in, as its supervisor says ("none": it was not)

    def to_record(self) -> dict[str, Any]:
        """What the store keeps (JSON): everything but the result envelope, which goes to the stage."""
        record = dataclasses.asdict(self)
        record["has_result"] = record.pop("result") is not None
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> InstanceExit:
        """An exit as the store kept it (``result`` None: it is on the stage when ``has_result``)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"result"}
        return cls(**{k: v for k, v in record.items() if k in names})


ExitCallback = Callable[[InstanceHandle], None]


class Provider(abc.ABC):
    """Supplies nodes for pools and runs instances on them."""

    name: ClassVar[str]
    supports_gpus: ClassVar[bool] = False
    supports_multinode: ClassVar[bool] = False
    # Instances run elsewhere and report over HTTP; payload and result travel through the stage,
    # so the job's stage must be one the nodes can read (s3://, or a shared folder).
    remote: ClassVar[bool] = False
    # Whether its agents run the payload in the job's sandbox (docs/isolation.md). A Ray pool's
    # payload is a Ray driver joining the node's raylet (its sockets under the node's /tmp/ray, its
    # cluster network): not sandboxed yet.
    sandboxes_payload: ClassVar[bool] = True

    @abc.abstractmethod
    def validate_pool(self, pool: PoolSpec) -> None:
        """Raise InvalidArgumentError if this provider cannot serve ``pool``."""

    @abc.abstractmethod
    def start(self, launch: InstanceLaunch) -> InstanceHandle:
        """Start one instance; returns once it is running (or raises)."""

    @abc.abstractmethod
    def watch(self, handle: InstanceHandle, on_exit: ExitCallback) -> bool:
        """Call ``on_exit(handle)`` once the instance has ended; False if it is already gone."""

    @abc.abstractmethod
    def poll(self, handle: InstanceHandle) -> InstanceExit | None:
        """The instance's exit, or None while it still runs. A handle without a pid (the instance
        was never seen running) gets the exit record the instance left, if any, else ``lost``."""

    @abc.abstractmethod
    def cancel(self, handle: InstanceHandle, grace_period_s: float) -> bool | None:
        """Stop the instance's whole process tree: SIGTERM, grace period, SIGKILL. True when the
        instance ended at once (nothing of it had started: its exit is recorded, ``poll`` returns it);
        otherwise its exit comes as usual."""

    @abc.abstractmethod
    def cleanup(self, handle: InstanceHandle, now: bool = False) -> None:
        """Remove the instance's local working files (not its log); ``now``: before returning (the
        job's next attempt reuses the folders), else whenever the provider likes."""

    def checkpoint_dir(self, handle: InstanceHandle, lost: bool = False) -> str | None:
        """Where an ended instance's checkpoint folder lies on this machine, for the server to keep
        on the stage; None where the instance's node keeps its own (or there is none). ``lost``:
        the instance did not end by itself (its supervisor lost, or stopped by the server), so
        the last settled copy is wanted rather than what it was writing."""
        return None

    def check_job(self, spec: JobSpec, pool: PoolSpec, stage_url: str) -> None:
        """Raise InvalidArgumentError if this provider cannot run ``spec`` on ``pool`` (at submit)."""

    def report(self, handle: InstanceHandle, report: InstanceReport) -> dict[str, Any]:
        """Take a remote instance's report; the reply tells its agent what the server wants."""
        raise UnsupportedError(f"instances of the {self.name} provider do not report over HTTP")

    def find(self, job_id: str, instance_id: int) -> InstanceHandle | None:
        """The handle of an instance this provider started but whose handle the server never
        stored (it stopped in between), from the provider's own records; None if there is none."""
        return None

    def never_started(self, job_id: str, instance_id: int) -> bool:
        """Whether this provider is sure it never started the instance: the server stopped between
        recording the start and asking the provider (then the server starts it after all)."""
        return False

    def release(self, handle: InstanceHandle, grace_period_s: float) -> None:
        """Tell a worker instance its head has finished: it stops its node and ends as done."""
        self.cancel(handle, grace_period_s)

    def ray_info(self, handle: InstanceHandle) -> dict[str, Any] | None:
        """A head instance's Ray addresses (``gcs_address``, ``dashboard_url``) once its node is up."""
        return None

    def finish_job(self, job_id: str) -> None:
        """Everything of the job's instances is over: free what the provider set up for it and
        make sure none of its processes is left; returns once they are gone."""

    def sweep(self, ended: Callable[[str], bool]) -> list[str]:
        """After a server start: finish the jobs (``ended(job_id)``) that left processes behind."""
        return []

    def metrics(self, handle: InstanceHandle) -> list[dict[str, Any]]:
        """A running instance's resource samples so far (see mljobs.runtime.metrics)."""
        return []

    def containment(self) -> str:
        """In words: how this provider keeps a job's processes together and limits its memory."""
        return "not described"

    def close(self) -> None:
        """Stop watching; running instances keep running."""


_PROVIDERS: dict[str, str] = {"local": "mljobs.providers.local:LocalProvider",
                               "slurm": "mljobs.providers.slurm:SlurmProvider",
                               "ray": "mljobs.providers.ray:RayProvider"}


def get_provider_class(name: str) -> type[Provider]:
    import importlib

    target = _PROVIDERS.get(name)
    if target is None:
        raise UnsupportedError(f"unknown provider {name!r}; available: {', '.join(_PROVIDERS)} "
                               "(Kubernetes is on paper: docs/kubernetes.md)")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
