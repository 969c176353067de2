"""MLJobOperator: run a function, file, directory or stage payload as an mljobs job from an Airflow task.

Retries reattach: every job an operator submits is named after the task instance (dag, task, run,
map index, and the first try of the current clearing), and a later try of that task instance looks
the name up before it submits. A job still queued or running is waited on again and a finished one
gives its result, so a worker that died after submitting does not make the job run twice; a failed
or cancelled one is submitted anew. The name travels with the submission itself, so there is no
window in which a job exists that its task could not find. Clearing a task starts a new try count
(Airflow raises ``max_tries``), hence a new name and a new job.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from mljobs.airflow.hook import MLJobsHook, SessionSettings
from mljobs.airflow.trigger import TIMED_OUT, MLJobTrigger
from mljobs.client.job import MLJob
from mljobs.client.definitions import remote
from mljobs.client.jobs import get_job, submit_directory, submit_file, submit_from_stage
from mljobs.client.session import Session
from mljobs.errors import (AuthenticationError, InvalidArgumentError, MLJobsError, NotFoundError, PayloadError,
                           PayloadTooLargeError, PermissionDeniedError, VersionMismatchError)
from mljobs.status import JOB_STATUS

__all__ = ["MLJobOperator", "XCOM_JOB_ID", "job_name"]

XCOM_JOB_ID = "mljobs_job_id"
# errors no retry can fix: the task fails at once, without waiting out its retries
_REFUSED = (InvalidArgumentError, NotFoundError, PayloadError, PayloadTooLargeError, PermissionDeniedError,
            AuthenticationError, VersionMismatchError)
_REATTACH = {JOB_STATUS.PENDING, JOB_STATUS.RUNNING, JOB_STATUS.DONE}


def job_name(dag_id: str, task_id: str, run_id: str, map_index: int, first_try: int) -> str:
    """The name of the job a task instance submits: readable, and unique to the instance and clearing."""
    key = "\x1f".join([dag_id, task_id, run_id, str(map_index), str(first_try)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{dag_id}.{task_id}")[:200]
    return f"airflow.{readable}.{digest}"


def _seconds(value: float | dt.timedelta | None, what: str) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, dt.timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise InvalidArgumentError(f"{what} must be a number of seconds > 0 or a timedelta, got {value!r}")
    return float(seconds)


class MLJobOperator(BaseOperator):
    """Submit a job to an mljobs compute pool, wait for it, and return its result (as XCom).

    Exactly one payload: ``python_callable`` (with ``op_args``/``op_kwargs``), ``file``,
    ``directory`` with ``entrypoint``, or ``stage_path`` (``"@stage/dir/"``) with ``entrypoint``;
    ``args`` reach a script's ``sys.argv``. The job's id is pushed as XCom ``mljobs_job_id``,
    its log is copied into the task's log, and the task fails with the job's own error.

    Args:
        compute_pool: the pool to run on; an unknown pool fails the task at once, naming it.
        stage_name: the stage for the job's payload and result.
        target_instances, min_instances, pip_requirements, external_access_integrations,
            env_vars, imports, runtime_environment, parallel, database, schema: as for
            :func:`mljobs.remote` and :func:`mljobs.submit_file`.
        timeout: seconds (or a timedelta) from the job's submission; past it the job is
            cancelled and the task fails.
        deferrable: wait in Airflow's triggerer (:class:`MLJobTrigger`) instead of a worker slot.
        poll_interval: seconds per status poll (a long poll: the end of the job is seen at once).
        mljobs_conn_id, session_options: where the control plane is (:class:`MLJobsHook`).
        log_lines: in deferrable mode, and for instances other than the head, the last lines of
            each instance's log copied into the task log (the head's is streamed live otherwise).
    """

    template_fields: Sequence[str] = ("compute_pool", "stage_name", "file", "directory", "stage_path",
                                      "entrypoint", "args", "op_args", "op_kwargs", "env_vars")
    template_fields_renderers = {"op_args": "py", "op_kwargs": "py", "env_vars": "json"}
    ui_color = "#d7ecff"

    def __init__(self, *, compute_pool: str, stage_name: str, python_callable: Callable[..., Any] | None = None,
                 file: str | None = None, directory: str | None = None, stage_path: str | None = None,
                 entrypoint: str | Sequence[str] | None = None, args: Sequence[str] | None = None,
                 op_args: Sequence[Any] | None = None, op_kwargs: Mapping[str, Any] | None = None,
                 target_instances: int = 1, min_instances: int | None = None,
                 pip_requirements: Sequence[str] | None = None,
                 external_access_integrations: Sequence[str] | None = None,
                 env_vars: dict[str, str] | None = None, imports: Sequence[Any] | None = None,
                 runtime_environment: str | None = None, parallel: bool = False, database: str | None = None,
                 schema: str | None = None, timeout: float | dt.timedelta | None = None, deferrable: bool = False,
                 poll_interval: float = 30.0, mljobs_conn_id: str | None = None,
                 session_options: dict[str, Any] | None = None, log_lines: int = 1000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        given = [k for k, v in (("python_callable", python_callable), ("file", file), ("directory", directory),
                                ("stage_path", stage_path)) if v is not None]
        if len(given) != 1:
            raise InvalidArgumentError(
                f"MLJobOperator {self.task_id!r}: give exactly one payload (python_callable, file, directory "
                f"or stage_path), got {given or 'none'}")
        if (directory is not None or stage_path is not None) and not entrypoint:
            raise InvalidArgumentError(f"MLJobOperator {self.task_id!r}: {given[0]} needs entrypoint=, e.g. "
                                       "entrypoint='train.py'")
        if (python_callable is not None or file is not None) and entrypoint:
            raise InvalidArgumentError(f"MLJobOperator {self.task_id!r}: entrypoint= is for directory or "
                                       f"stage_path, not {given[0]}")
        if python_callable is not None and args:
            raise InvalidArgumentError(f"MLJobOperator {self.task_id!r}: args= are a script's command line; "
                                       "a python_callable takes op_args= and op_kwargs=")
        if python_callable is None and (op_args or op_kwargs):
            raise InvalidArgumentError(f"MLJobOperator {self.task_id!r}: op_args/op_kwargs go to a "
                                       f"python_callable; a {given[0]} takes args=[...] (its sys.argv)")
        if python_callable is not None and not callable(python_callable):
            raise InvalidArgumentError(f"MLJobOperator {self.task_id!r}: python_callable must be a function, "
                                       f"got {python_callable!r}")
        if not isinstance(compute_pool, str) or not compute_pool:
            raise InvalidArgumentError(f"MLJobOperator {self.task_id!r}: compute_pool must be a pool name, "
                                       f"got {compute_pool!r}")
        if not isinstance(log_lines, int) or log_lines < 0:
            raise InvalidArgumentError(f"MLJobOperator {self.task_id!r}: log_lines must be an int >= 0, "
                                       f"got {log_lines!r}")
        self.timeout_s = _seconds(timeout, f"MLJobOperator {self.task_id!r}: timeout")
        self.poll_interval = _seconds(poll_interval, f"MLJobOperator {self.task_id!r}: poll_interval") or 30.0
        self.hook = MLJobsHook(mljobs_conn_id, session_options)  # checks the options now
        self.compute_pool, self.stage_name = compute_pool, stage_name
        self.python_callable, self.file, self.directory, self.stage_path = python_callable, file, directory, stage_path
        self.entrypoint = list(entrypoint) if isinstance(entrypoint, (list, tuple)) else entrypoint
        self.args = list(args or [])
        self.op_args, self.op_kwargs = list(op_args or []), dict(op_kwargs or {})
        self.target_instances, self.min_instances = target_instances, min_instances
        self.pip_requirements, self.external_access_integrations = pip_requirements, external_access_integrations
        self.env_vars, self.imports = dict(env_vars or {}), imports
        self.runtime_environment, self.parallel, self.database, self.schema = (runtime_environment, parallel,
                                                                                database, schema)
        self.deferrable, self.mljobs_conn_id, self.session_options = deferrable, mljobs_conn_id, session_options
        self.log_lines = log_lines
        self._job: MLJob | None = None
        self._settings: SessionSettings | None = None

    # -- running ------------------------------------------------------------------------------
    def execute(self, context: Any) -> Any:
        self._settings = self.hook.settings()
        session = self._settings.session()
        ti = context["ti"]
        name = job_name(ti.dag_id, ti.task_id, ti.run_id, ti.map_index, ti.max_tries - self.retries + 1)
        job = self._reattach(session, name) or self._submit(session, name)
        self._job = job
        ti.xcom_push(key=XCOM_JOB_ID, value=job.id)
        deadline = self._deadline(job)
        if self.deferrable:
            token = None if self.mljobs_conn_id is not None else self._settings.token or session.token
            self.defer(trigger=MLJobTrigger(job.id, session.url, self.mljobs_conn_id, token, self.poll_interval,
                                            deadline), method_name="execute_complete")
        status = self._wait(job, deadline)
        self._copy_other_instances(job)
        return self._finish(job, status)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """Resumed from :class:`MLJobTrigger`: copy the job's log, then return its result or fail."""
        settings = self.hook.settings()
        job = MLJob(event["job_id"], settings.session())
        self._copy_log_tail(job, 0)
        self._copy_other_instances(job)
        if event["status"] == TIMED_OUT:
            raise AirflowException(f"{event['message']}: timeout={self.timeout_s:g} s")
        if event["status"] not in JOB_STATUS.__members__:
            raise AirflowException(f"lost track of mljobs job {event['job_id']}: {event['message']}")
        return self._finish(job, JOB_STATUS(event["status"]))

    def on_kill(self) -> None:
        """The task is being killed (SIGTERM, execution_timeout, marked failed): cancel its job."""
        job, settings = self._job, self._settings
        if job is None or settings is None:
            return
        # a session of its own: this may run in a signal handler while the main thread is inside a request
        MLJob(job.id, settings.session()).cancel()
        self.log.info("cancelled mljobs job %s because the task was killed", job.id)

    # -- steps --------------------------------------------------------------------------------
    def _reattach(self, session: Session, name: str) -> MLJob | None:
        try:
            job = get_job(name, session=session)
        except NotFoundError:
            return None
        status = job.status
        if status == JOB_STATUS.CANCELLING:
            status = job.wait(timeout=60, progress=False)
        if status in _REATTACH:
            self.log.info("reattaching to mljobs job %s (%s), which an earlier try of this task submitted",
                          job.id, status.value)
            return job
        self.log.info("the earlier try's mljobs job %s ended %s; submitting a new one", job.id, status.value)
        return None

    def _submit(self, session: Session, name: str) -> MLJob:
        opts: dict[str, Any] = dict(
            stage_name=self.stage_name, target_instances=self.target_instances, min_instances=self.min_instances,
            pip_requirements=self.pip_requirements, external_access_integrations=self.external_access_integrations,
            env_vars=self.env_vars, imports=self.imports, name=name, database=self.database, schema=self.schema,
            runtime_environment=self.runtime_environment, session=session)
        try:
            if self.python_callable is not None:
                job = remote(self.compute_pool, **opts)(self.python_callable)(*self.op_args, **self.op_kwargs)
            elif self.file is not None:
                job = submit_file(self.file, self.compute_pool, args=self.args, parallel=self.parallel, **opts)
            elif self.directory is not None:
                job = submit_directory(self.directory, self.compute_pool, entrypoint=self.entrypoint or "",
                                       args=self.args, parallel=self.parallel, **opts)
            else:
                opts.pop("imports")
                job = submit_from_stage(self.stage_path or "", self.compute_pool, entrypoint=self.entrypoint or "",
                                        args=self.args, parallel=self.parallel, **opts)
        except _REFUSED as e:
            raise AirflowFailException(f"mljobs refused the job of task {self.task_id!r}: {e}") from e
        self.log.info("submitted mljobs job %s to pool %s (`mljobs logs %s` follows it)", job.id,
                      self.compute_pool, job.id)
        return job

    def _deadline(self, job: MLJob) -> float | None:
        """The UNIX time the job must end by: ``timeout`` after its submission (a retry does not extend it)."""
        if self.timeout_s is None:
            return None
        created = dt.datetime.fromisoformat(job._refresh()["created_time"])
        if created.tzinfo is None:
            created = created.replace(tzinfo=dt.timezone.utc)
        return created.timestamp() + self.timeout_s

    def _wait(self, job: MLJob, deadline: float | None) -> JOB_STATUS:
        copier = threading.Thread(target=self._stream_log, args=(job,), name=f"mljobs-log-{job.id}", daemon=True)
        copier.start()
        try:
            status = job.wait(timeout=-1 if deadline is None else max(deadline - time.time(), 0.0), progress=False)
        except TimeoutError:
            job.cancel()
            job.wait(timeout=60, progress=False)
            copier.join(30)
            raise AirflowException(f"mljobs job {job.id} did not end within timeout={self.timeout_s:g} s of its "
                                   "submission; cancelled it") from None
        copier.join(30)
        return status

    def _stream_log(self, job: MLJob) -> None:
        """Copy the head's log into the task log as it is written (a thread: the main one waits)."""
        try:
            for line in job.stream_logs():
                self.log.info("[%s] %s", job.id[-12:].lower(), line)
        except MLJobsError as e:
            self.log.warning("the log stream of mljobs job %s broke off: %s; `mljobs logs %s` shows it all",
                             job.id, e, job.id)

    def _copy_log_tail(self, job: MLJob, instance: int) -> None:
        if self.log_lines == 0:
            return
        lines = job.get_logs(limit=self.log_lines, instance_id=instance, as_list=True)
        self.log.info("mljobs job %s, instance %d: the last %d line(s) of its log", job.id, instance, len(lines))
        for line in lines:
            self.log.info("[%s/%d] %s", job.id[-12:].lower(), instance, line)

    def _copy_other_instances(self, job: MLJob) -> None:
        for instance in range(1, job.instances_ran):
            self._copy_log_tail(job, instance)

    def _finish(self, job: MLJob, status: JOB_STATUS) -> Any:
        if status == JOB_STATUS.DONE:
            return job.result(progress=False)
        message = job.message
        try:
            job.result(progress=False)
        except Exception as e:  # the job's own exception, remote traceback attached: the task's cause
            raise AirflowException(f"mljobs job {job.id} ended {status.value}: {message or e}; "
                                   f"`mljobs logs {job.id}` shows its log") from e
        raise AirflowException(f"mljobs job {job.id} ended {status.value}: {message}")
