"""Submitting jobs (``remote``, ``submit_*``) and finding them (``get_job``, ``list_jobs``, ``delete_job``)."""

from __future__ import annotations

import functools
import getpass
import inspect
import json
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

import cloudpickle

from mljobs.client import payload as pl
from mljobs.client.job import MLJob
from mljobs.client.session import Session, get_active_session
from mljobs.errors import InvalidArgumentError, LocalFileNotFoundError
from mljobs.spec import JobSpec, PayloadKind

if TYPE_CHECKING:  # pandas costs ~0.3 s to import: only the DataFrame-returning calls load it
    import pandas as pd

__all__ = ["remote", "submit_file", "submit_directory", "submit_from_stage", "get_job", "list_jobs",
           "delete_job", "MLJobDefinition", "LIST_JOBS_COLUMNS"]

P = ParamSpec("P")
R = TypeVar("R")
LIST_JOBS_COLUMNS = ["name", "status", "message", "database_name", "schema_name", "owner", "compute_pool",
                     "target_instances", "instances_ran", "created_time", "completed_time", "peak_rss_bytes",
                     "cpu_seconds"]


def _options(compute_pool: str, stage_name: str, target_instances: int, min_instances: int | None,
             pip_requirements: Sequence[str] | None, external_access_integrations: Sequence[str] | None,
             env_vars: dict[str, str] | None, name: str | None, database: str | None, schema: str | None,
             session: Session, runtime_environment: str | None = None, parallel: bool = False,
             join_timeout_s: float = 720.0) -> dict[str, Any]:
    if not isinstance(compute_pool, str) or not compute_pool:
        raise InvalidArgumentError(f"compute_pool must be a pool name, got {compute_pool!r}")
    if not stage_name:
        raise InvalidArgumentError("stage_name is required, e.g. stage_name='payload_stage'")
    if isinstance(pip_requirements, str) or isinstance(external_access_integrations, str):
        raise InvalidArgumentError("pip_requirements and external_access_integrations take a list of strings")
    return dict(
        compute_pool=compute_pool, stage_name=stage_name, target_instances=target_instances,
        min_instances=min_instances, pip_requirements=list(pip_requirements or []),
        external_access_integrations=list(external_access_integrations or []), env_vars=dict(env_vars or {}),
        name=name, database=(database or session.database).upper(), schema=(schema or session.schema).upper(),
        owner=getpass.getuser(), client_python="%d.%d.%d" % sys.version_info[:3],
        client_cloudpickle=cloudpickle.__version__, runtime_environment=runtime_environment,
        parallel=parallel, join_timeout_s=join_timeout_s,
    )


def _submit(session: Session, spec: JobSpec, tar: bytes | None) -> MLJob:
    files = {"payload": ("payload.tar", tar, "application/x-tar")} if tar is not None else None
    # one key per submission: if the answer is lost and the request is sent again, the server
    # returns the job the first request made instead of starting a second one
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    info = session.request("POST", "/jobs", data={"spec": json.dumps(spec.to_dict())}, files=files,
                           headers=headers).json()
    return MLJob(info["id"], session, info)


class MLJobDefinition(Generic[P, R]):
    """What ``@remote`` returns: call it to submit the function as a job."""

    def __init__(self, fn: Callable[P, R], options: dict[str, Any], imports: Sequence[Any] | None,
                 session: Session | None) -> None:
        pl.check_function(fn)
        self.fn, self.options, self.imports, self._session = fn, options, imports, session
        self.session_param = pl.session_parameter(fn, Session)
        self.signature = inspect.signature(fn)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> MLJob:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise InvalidArgumentError(f"{self.fn.__qualname__}{self.signature}: {e}") from None
        if self.session_param and isinstance(bound.arguments.get(self.session_param), Session):
            bound.arguments[self.session_param] = None  # the job gets its own session
        session = self._session or get_active_session()
        opts = _options(session=session, **self.options)
        spec = JobSpec(payload_kind=PayloadKind.FUNCTION, entrypoint=[self.fn.__qualname__],
                       session_param=self.session_param, **opts)
        # every parameter but positional-only ones travels by keyword, so the job can fill in its session
        positional = [p.name for p in self.signature.parameters.values() if p.kind == p.POSITIONAL_ONLY]
        args = tuple(bound.arguments[n] for n in positional if n in bound.arguments)
        kwargs = {k: v for k, v in bound.arguments.items() if k not in positional}
        pickled = pl.pickle_call(self.fn, args, kwargs)
        return _submit(session, spec, pl.tar_call(pickled, self.imports))


def remote(compute_pool: str, *, stage_name: str, target_instances: int = 1, min_instances: int | None = None,
           pip_requirements: Sequence[str] | None = None, external_access_integrations: Sequence[str] | None = None,
           env_vars: dict[str, str] | None = None, imports: Sequence[Any] | None = None, name: str | None = None,
           database: str | None = None, schema: str | None = None, runtime_environment: str | None = None,
           join_timeout_s: float = 720.0,
           session: Session | None = None) -> Callable[[Callable[P, R]], MLJobDefinition[P, R]]:
    """Turn a function into a job definition: calling it submits a job and returns an MLJob.

    Args:
        compute_pool: the pool to run on.
        stage_name: the stage that keeps the payload and result.
        target_instances: instances (nodes) to run on. With more than one, every instance starts
            a Ray node (instance 0 the head) and the function runs on the head with Ray ready.
        min_instances: start once this many are available (default: target_instances).
        pip_requirements: packages to install for the job.
        external_access_integrations: egress policies the job may use.
        env_vars: environment variables for the job.
        imports: local packages or modules to ship with the function.
        name: a name for the job (default: its id).
        database, schema: the job's namespace (default: the session's).
        runtime_environment: the interpreter: by default the server's Python of the client's
            major.minor when it has one, else its own; "server", "3.12" or a path pick one.
        join_timeout_s: how long the head waits for ``min_instances`` nodes to join its Ray
            cluster before the job fails.
        session: the session to submit with (default: the active one).
    """
    options = dict(compute_pool=compute_pool, stage_name=stage_name, target_instances=target_instances,
                   min_instances=min_instances, pip_requirements=pip_requirements,
                   external_access_integrations=external_access_integrations, env_vars=env_vars, name=name,
                   database=database, schema=schema, runtime_environment=runtime_environment,
                   join_timeout_s=join_timeout_s)

    def decorator(fn: Callable[P, R]) -> MLJobDefinition[P, R]:
        return MLJobDefinition(fn, options, imports, session)

    return decorator


def _entrypoint(entrypoint: str | Sequence[str]) -> list[str]:
    if isinstance(entrypoint, (list, tuple)):
        if not entrypoint or not all(isinstance(e, str) for e in entrypoint):
            raise InvalidArgumentError(f"entrypoint command must be a non-empty list of strings, got {entrypoint!r}")
        return list(entrypoint)
    if not isinstance(entrypoint, str) or not entrypoint:
        raise InvalidArgumentError(f"entrypoint must be a path or a command list, got {entrypoint!r}")
    return [entrypoint]


def _refuse_notebook(entrypoint: str) -> None:
    """A job runs Python, not a notebook's JSON: say so at submit rather than fail in the job."""
    if entrypoint.endswith(".ipynb"):
        raise InvalidArgumentError(
            f"{entrypoint!r} is a Jupyter notebook, which a job cannot run as its entrypoint: export it "
            f"(`jupyter nbconvert --to script {entrypoint}`) and submit the .py, or run the notebook itself "
            "and send its functions with @remote")


def submit_file(file_path: str | os.PathLike[str], compute_pool: str, *, stage_name: str,
                args: Sequence[str] | None = None, target_instances: int = 1, min_instances: int | None = None,
                pip_requirements: Sequence[str] | None = None,
                external_access_integrations: Sequence[str] | None = None, env_vars: dict[str, str] | None = None,
                imports: Sequence[Any] | None = None, name: str | None = None, database: str | None = None,
                schema: str | None = None, runtime_environment: str | None = None, parallel: bool = False,
                join_timeout_s: float = 720.0, session: Session | None = None) -> MLJob:
    """Upload one script and run it; ``args`` reach ``sys.argv[1:]``; ``__return__`` is the result.

    With ``target_instances > 1`` the script runs on the head of a Ray cluster of that many nodes;
    with ``parallel=True`` it runs on every instance instead, with ``MLJOBS_INSTANCE_ID``,
    ``MLJOBS_INSTANCE_COUNT``, ``MLJOBS_HEAD_ADDRESS``, ``MLJOBS_NODE_ADDRESSES``,
    ``MLJOBS_RENDEZVOUS_PORT`` (and torch's ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``)
    set; ``MLJob.distributed_result()`` then gives every instance's outcome.
    """
    path = Path(file_path)
    if not path.is_file():
        raise LocalFileNotFoundError(f"file {str(file_path)!r} does not exist (or is not a file)")
    _refuse_notebook(path.name)
    session = session or get_active_session()
    opts = _options(compute_pool, stage_name, target_instances, min_instances, pip_requirements,
                    external_access_integrations, env_vars, name, database, schema, session, runtime_environment,
                    parallel, join_timeout_s)
    spec = JobSpec(payload_kind=PayloadKind.FILE, entrypoint=[path.name], args=list(args or []), **opts)
    return _submit(session, spec, pl.tar_file(path, imports))


def submit_directory(dir_path: str | os.PathLike[str], compute_pool: str, *, entrypoint: str | Sequence[str],
                     stage_name: str, args: Sequence[str] | None = None, target_instances: int = 1,
                     min_instances: int | None = None, pip_requirements: Sequence[str] | None = None,
                     external_access_integrations: Sequence[str] | None = None,
                     env_vars: dict[str, str] | None = None, imports: Sequence[Any] | None = None,
                     name: str | None = None, database: str | None = None, schema: str | None = None,
                     runtime_environment: str | None = None, parallel: bool = False,
                     join_timeout_s: float = 720.0, session: Session | None = None) -> MLJob:
    """Upload a directory (not ``__pycache__``/``*.pyc``) and run ``entrypoint`` inside it."""
    root = Path(dir_path)
    if not root.is_dir():
        raise LocalFileNotFoundError(f"directory {str(dir_path)!r} does not exist (or is not a directory)")
    entry = _entrypoint(entrypoint)
    if len(entry) == 1:
        target = (root / entry[0]).resolve()
        if not target.is_relative_to(root.resolve()):
            raise InvalidArgumentError(f"entrypoint {entry[0]!r} is outside the directory {str(root)!r}")
        if not target.is_file():
            raise LocalFileNotFoundError(f"entrypoint {entry[0]!r} does not exist in {str(root)!r}")
        entry = [target.relative_to(root.resolve()).as_posix()]
        _refuse_notebook(entry[0])
    session = session or get_active_session()
    opts = _options(compute_pool, stage_name, target_instances, min_instances, pip_requirements,
                    external_access_integrations, env_vars, name, database, schema, session, runtime_environment,
                    parallel, join_timeout_s)
    spec = JobSpec(payload_kind=PayloadKind.DIRECTORY, entrypoint=entry, args=list(args or []), **opts)
    return _submit(session, spec, pl.tar_directory(root, imports))


def submit_from_stage(source: str, compute_pool: str, *, entrypoint: str | Sequence[str], stage_name: str,
                      args: Sequence[str] | None = None, target_instances: int = 1,
                      min_instances: int | None = None, pip_requirements: Sequence[str] | None = None,
                      external_access_integrations: Sequence[str] | None = None,
                      env_vars: dict[str, str] | None = None, name: str | None = None,
                      database: str | None = None, schema: str | None = None,
                      runtime_environment: str | None = None, parallel: bool = False,
                      join_timeout_s: float = 720.0, session: Session | None = None) -> MLJob:
    """Run a directory already on a stage (``"@stage/path/"``); ``entrypoint`` is inside it."""
    session = session or get_active_session()
    opts = _options(compute_pool, stage_name, target_instances, min_instances, pip_requirements,
                    external_access_integrations, env_vars, name, database, schema, session, runtime_environment,
                    parallel, join_timeout_s)
    spec = JobSpec(payload_kind=PayloadKind.STAGE, entrypoint=_entrypoint(entrypoint), args=list(args or []),
                   source=source, **opts)
    return _submit(session, spec, None)


def get_job(job_id: str, session: Session | None = None) -> MLJob:
    """The handle of an existing job, by id (``MLJOB_...``) or name."""
    session = session or get_active_session()
    info = session.request("GET", f"/jobs/{job_id}").json()
    return MLJob(info["id"], session, info)


def list_jobs(limit: int = 10, database: str | None = None, schema: str | None = None,
              session: Session | None = None) -> pd.DataFrame:
    """Newest jobs first, as a DataFrame (index: job id); ``limit <= 0`` lists all."""
    import pandas as pd

    session = session or get_active_session()
    rows = session.request("GET", "/jobs", params={
        "limit": limit, "database": (database or session.database).upper(),
        "schema": (schema or session.schema).upper()}).json()
    df = pd.DataFrame(rows, columns=["id", *LIST_JOBS_COLUMNS])
    for col in ("created_time", "completed_time"):
        df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
    return df.set_index("id")


def delete_job(job: MLJob | str, session: Session | None = None) -> None:
    """Delete a job (stopping it first if it runs), its logs, and its payload and result files."""
    session = session or (job._session if isinstance(job, MLJob) else get_active_session())
    session.request("DELETE", f"/jobs/{job.id if isinstance(job, MLJob) else job}")
