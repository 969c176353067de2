"""The store's typed rows: what the server reads of a job, by attribute, in one place.

A job row used to travel as a dict read by string key all over the service; a misspelt key was
a KeyError at run time, and nothing said which fields a job has. :class:`JobRecord` is that row,
and the one list of a job's fields: the API's ``JobSummary`` (and ``JobOut``) takes its fields
from it (all but :attr:`JobRecord.PRIVATE`), and is filled from :meth:`JobRecord.to_dict`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, ClassVar

from mljobs.spec import JobSpec
from mljobs.status import ACTIVE_VALUES, JOB_STATUS, TERMINAL_VALUES

__all__ = ["JobRecord", "QueuedJob"]


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """One row of the ``jobs`` table. ``spec`` is the submitted JobSpec as JSON; it is None only in
    rows listed without it (``Store.list_jobs(with_spec=False)``)."""

    id: str
    name: str
    status: str
    message: str
    database_name: str
    schema_name: str
    owner: str
    compute_pool: str
    stage_name: str
    target_instances: int
    min_instances: int
    instances_ran: int
    created_time: dt.datetime
    started_time: dt.datetime | None = None
    completed_time: dt.datetime | None = None
    idempotency_key: str | None = None
    attempt: int = 1  # which run of the job this is (a lost instance requeues it as the next)
    definition_name: str | None = None  # the definition it was called from
    schedule_name: str | None = None  # a scheduled run: its schedule and the tick it is for
    scheduled_tick: dt.datetime | None = None
    priority: int = 0
    preempted_by: str | None = None
    spec: dict[str, Any] | None = None

    # fields the API does not show (the spec has its own route; the others are the server's own)
    PRIVATE: ClassVar[frozenset[str]] = frozenset({"idempotency_key", "preempted_by", "spec"})

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> JobRecord:
        return cls(**row)

    def to_dict(self) -> dict[str, Any]:
        """The row as a dict (without ``spec`` when it was not read)."""
        d = dataclasses.asdict(self)
        if self.spec is None:
            del d["spec"]
        return d

    def job_spec(self) -> JobSpec:
        """The submitted spec as a JobSpec."""
        if self.spec is None:
            raise ValueError(f"job {self.id} was listed without its spec; read it with Store.get_job")
        return JobSpec.from_dict(self.spec)

    @property
    def job_status(self) -> JOB_STATUS:
        return JOB_STATUS(self.status)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_VALUES

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_VALUES

    @property
    def parallel(self) -> bool:
        """Every instance runs the entrypoint (no Ray): multi-node jobs submitted with parallel=True."""
        return bool((self.spec or {}).get("parallel"))

    @property
    def max_retries(self) -> int:
        """How many more attempts a lost instance may give the job (0: none)."""
        return int((self.spec or {}).get("max_retries") or 0)

    @property
    def multinode_ray(self) -> bool:
        """A multi-node job whose instances form one Ray cluster."""
        return self.target_instances > 1 and not self.parallel


@dataclasses.dataclass(frozen=True)
class QueuedJob:
    """What a start decision reads of a queued job (:meth:`Store.pending_heads`): a few columns
    of its row, so that deciding over a long queue reads no more than it needs."""

    id: str
    owner: str
    priority: int
    created_time: Any  # a datetime, or the store's text of one (SQLite): compared within one store only
    min_instances: int
    target_instances: int
