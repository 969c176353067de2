"""Submitting jobs (``remote``, ``submit_*``) and finding them (``get_job``, ``list_jobs``, ``delete_job``)."""

from __future__ import annotations

import getpass
import json
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import cloudpickle

from mljobs.client import payload as pl
from mljobs.client.job import MLJob
from mljobs.client.session import Session, get_active_session
from mljobs.errors import InvalidArgumentError, LocalFileNotFoundError
from mljobs.spec import JobSpec, PayloadKind
from mljobs.units import format_bytes

if TYPE_CHECKING:  # pandas costs ~0.3 s to import: only the DataFrame-returning calls load it
    import pandas as pd

__all__ = ["submit_file", "submit_directory", "submit_from_stage", "get_job", "list_jobs", "delete_job",
           "LIST_JOBS_COLUMNS"]

log = logging.getLogger("mljobs.client")
# from this many bytes a file or directory payload goes by content hash (_submit_files)
LARGE_PAYLOAD = 4 << 20
LIST_JOBS_COLUMNS = ["name", "status", "message", "database_name", "schema_name", "owner", "compute_pool",
                     "target_instances", "instances_ran", "created_time", "completed_time", "peak_rss_bytes",
                     "cpu_seconds", "attempt", "schedule_name", "scheduled_tick", "priority", "pending_reason"]


def _options(compute_pool: str, stage_name: str, target_instances: int, min_instances: int | None,
             pip_requirements: Sequence[str] | None, external_access_integrations: Sequence[str] | None,
             env_vars: dict[str, str] | None, name: str | None, database: str | None, schema: str | None,
             session: Session, runtime_environment: str | None = None, parallel: bool = False,
             join_timeout_s: float = 720.0, max_retries: int = 0, retry_on_failure: bool = False,
             priority: int = 0) -> dict[str, Any]:
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
        parallel=parallel, join_timeout_s=join_timeout_s, max_retries=max_retries,
        retry_on_failure=retry_on_failure, priority=priority,
    )


def _submit(session: Session, spec: JobSpec, tar: bytes | None, upload: str | None = None) -> MLJob:
    files = {"payload": ("payload.tar", tar, "application/x-tar")} if tar is not None else None
    data = {"spec": json.dumps(spec.to_dict()), **({"upload": upload} if upload else {})}
    # one key per submission: if the answer is lost and the request is sent again, the server
    # returns the job the first request made instead of starting a second one
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    info = session.request("POST", "/jobs", data=data, files=files, headers=headers).json()
    return MLJob(info["id"], session, info)


def _submit_files(session: Session, spec: JobSpec, entries: pl.Entries) -> MLJob:
    """A file or directory payload: small ones as one tar in the submission; from LARGE_PAYLOAD
    bytes on, by content hash (:func:`send_large`)."""
    upload = send_large(session, spec.stage_name, entries)
    return _submit(session, spec, pl.tar_entries(entries) if upload is None else None, upload=upload)


def send_large(session: Session, stage_name: str, entries: pl.Entries) -> str | None:
    """From LARGE_PAYLOAD bytes on, send a payload's files as an upload on ``stage_name`` and return
    its id (None: small, send it as one tar). The stage keeps what it has seen; only the rest is
    streamed from disk, so the client never holds the payload in memory."""
    if sum(p.stat().st_size for _, p in entries) < LARGE_PAYLOAD:
        return None
    files = pl.manifest(entries)
    stage = quote(stage_name, safe="")
    up = session.request("POST", f"/stages/{stage}/uploads", json={"files": files}).json()
    missing = set(up["missing"])
    if missing:
        sizes = {f[0]: f[2] for f in files}
        session.request("PUT", f"/stages/{stage}/uploads/{up['id']}", timeout=600.0,
                        content=pl.tar_stream([e for e in entries if e[0] in missing], sizes),
                        headers={"Content-Type": "application/x-tar"})
    sent = sum(f[2] for f in files if f[0] in missing)
    log.info("payload: %d files (%s); %d already on @%s, %d sent (%s)", len(files), format_bytes(up["bytes"]),
             len(files) - len(missing), stage_name, len(missing), format_bytes(sent))
    return str(up["id"])


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
                join_timeout_s: float = 720.0, max_retries: int = 0, retry_on_failure: bool = False,
                priority: int = 0, session: Session | None = None) -> MLJob:
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
                    parallel, join_timeout_s, max_retries, retry_on_failure, priority)
    spec = JobSpec(payload_kind=PayloadKind.FILE, entrypoint=[path.name], args=list(args or []), **opts)
    return _submit_files(session, spec, pl.file_entries(path, imports))


def submit_directory(dir_path: str | os.PathLike[str], compute_pool: str, *, entrypoint: str | Sequence[str],
                     stage_name: str, args: Sequence[str] | None = None, target_instances: int = 1,
                     min_instances: int | None = None, pip_requirements: Sequence[str] | None = None,
                     external_access_integrations: Sequence[str] | None = None,
                     env_vars: dict[str, str] | None = None, imports: Sequence[Any] | None = None,
                     name: str | None = None, database: str | None = None, schema: str | None = None,
                     runtime_environment: str | None = None, parallel: bool = False,
                     join_timeout_s: float = 720.0, max_retries: int = 0, retry_on_failure: bool = False,
                     priority: int = 0, session: Session | None = None) -> MLJob:
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
                    parallel, join_timeout_s, max_retries, retry_on_failure, priority)
    spec = JobSpec(payload_kind=PayloadKind.DIRECTORY, entrypoint=entry, args=list(args or []), **opts)
    return _submit_files(session, spec, pl.directory_entries(root, imports))


def submit_from_stage(source: str, compute_pool: str, *, entrypoint: str | Sequence[str], stage_name: str,
                      args: Sequence[str] | None = None, target_instances: int = 1,
                      min_instances: int | None = None, pip_requirements: Sequence[str] | None = None,
                      external_access_integrations: Sequence[str] | None = None,
                      env_vars: dict[str, str] | None = None, name: str | None = None,
                      database: str | None = None, schema: str | None = None,
                      runtime_environment: str | None = None, parallel: bool = False,
                      join_timeout_s: float = 720.0, max_retries: int = 0, retry_on_failure: bool = False,
                      priority: int = 0, session: Session | None = None) -> MLJob:
    """Run a directory already on a stage (``"@stage/path/"``); ``entrypoint`` is inside it."""
    session = session or get_active_session()
    opts = _options(compute_pool, stage_name, target_instances, min_instances, pip_requirements,
                    external_access_integrations, env_vars, name, database, schema, session, runtime_environment,
                    parallel, join_timeout_s, max_retries, retry_on_failure, priority)
    spec = JobSpec(payload_kind=PayloadKind.STAGE, entrypoint=_entrypoint(entrypoint), args=list(args or []),
                   source=source, **opts)
    return _submit(session, spec, None)


def get_job(job_id: str, session: Session | None = None) -> MLJob:
    """The handle of an existing job, by id (``MLJOB_...``) or name."""
    session = session or get_active_session()
    info = session.request("GET", f"/jobs/{job_id}").json()
    return MLJob(info["id"], session, info)


def list_jobs(limit: int = 10, database: str | None = None, schema: str | None = None,
              session: Session | None = None, *, schedule: str | None = None) -> pd.DataFrame:
    """Newest jobs first, as a DataFrame (index: job id); ``limit <= 0`` lists all; ``schedule``:
    only that schedule's runs."""
    import pandas as pd

    session = session or get_active_session()
    params: dict[str, Any] = {"limit": limit, "database": (database or session.database).upper(),
                              "schema": (schema or session.schema).upper()}
    if schedule is not None:
        params["schedule"] = schedule
    rows = session.request("GET", "/jobs", params=params).json()
    df = pd.DataFrame(rows, columns=["id", *LIST_JOBS_COLUMNS])
    for col in ("created_time", "completed_time", "scheduled_tick"):
        df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
    return df.set_index("id")


def delete_job(job: MLJob | str, session: Session | None = None) -> None:
    """Delete a job (stopping it first if it runs), its logs, and its payload and result files."""
    session = session or (job._session if isinstance(job, MLJob) else get_active_session())
    session.request("DELETE", f"/jobs/{job.id if isinstance(job, MLJob) else job}")
