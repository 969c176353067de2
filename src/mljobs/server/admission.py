"""Admission of a job: the checks a submission passes (pool, stage, egress, interpreter, Ray,
quotas) and what recording it writes (the job's row, its payload on the stage)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from typing import IO, Any

import cloudpickle

from mljobs import trace
from mljobs.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError, VersionMismatchError
from mljobs.paths import StagePaths
from mljobs.providers.base import UnsupportedError
from mljobs.runtime import egress
from mljobs.runtime import environment as envs
from mljobs.runtime.launcher import check_versions
from mljobs.server.auth import Principal
from mljobs.server import uploads
from mljobs.server.catalog import PYPI_ACCESS
from mljobs.server.records import JobRecord
from mljobs.server.store import utcnow
from mljobs.spec import JobSpec, PayloadKind, PoolSpec, check_stage_name, new_job_id
from mljobs.stages import Stage, parse_stage_path
from mljobs.status import JOB_STATUS

__all__ = ["Admission"]

log = logging.getLogger("mljobs.server")


class Admission:
    """Part of :class:`mljobs.server.service.ControlPlane` (a mixin: its state is the plane's)."""

    def _allowed_hosts(self, names: list[str]) -> list[str]:
        """The hosts a job's external access integrations allow (its sandbox's only way out)."""
        if not names:
            return []
        known = {i["name"]: i["allowed_hosts"] for i in self.store.list_integrations()}
        return [h for n in names for h in known.get(n.upper(), [])]

    def _check_egress(self, spec: JobSpec) -> None:
        """Unknown integrations are refused; in strict mode so are installs no integration allows."""
        known = {i["name"]: i["allowed_hosts"] for i in self.store.list_integrations()}
        names = [n.upper() for n in spec.external_access_integrations]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InvalidArgumentError(
                f"unknown external access integration(s) {unknown}; known: {sorted(known)}. Create one with "
                "create_external_access_integration(name, allowed_hosts=[...])")
        if not (spec.pip_requirements and (self.settings.strict_egress or self.isolation.filters_egress())):
            return  # installs follow the job's integrations too where its payload's network does
        allowed = [h for n in names for h in known[n]]
        denied = [label for host, port, label in _index_hosts(spec) if not egress.allows(allowed, host, port)]
        if denied:
            hint = ("external_access_integrations=['PYPI_ACCESS']" if set(denied) <= set(PYPI_ACCESS[1]) else
                    f"an integration that allows them: create_external_access_integration('MY_INDEX', "
                    f"allowed_hosts={denied!r}), then external_access_integrations=['MY_INDEX']")
            raise InvalidArgumentError(
                f"this server requires an external access integration to install packages: pip_requirements "
                f"{spec.pip_requirements} need host(s) {denied}, which none of the job's integrations "
                f"{names or '(none)'} allow; add {hint}")

    def _check_ray(self, spec: JobSpec) -> None:
        """A multi-node job (not parallel) runs a Ray cluster: its runtime needs Ray."""
        if importlib.util.find_spec("ray") is None:
            raise InvalidArgumentError(
                f"target_instances={spec.target_instances} runs the job on a Ray cluster, but Ray is not "
                "installed on the server; install it there with pip install 'mljobs[multinode]', or submit a "
                "file or directory with parallel=True, which runs the entrypoint on every instance without Ray")

    def _choose_interpreter(self, spec: JobSpec) -> None:
        """Fill in ``spec.runtime_python`` from ``runtime_environment`` and the client's Python."""
        want = (spec.runtime_environment or "").strip()
        client_mm = ".".join(spec.client_python.split(".")[:2])
        if want.lower() == "server":
            python = sys.executable
        elif want and os.sep in want:
            if not (os.path.isfile(want) and os.access(want, os.X_OK)):
                raise InvalidArgumentError(f"runtime_environment {want!r} is not an executable interpreter "
                                           "on the server")
            python = want
        elif want:
            found = envs.find_interpreter(want)
            if found is None:
                raise InvalidArgumentError(
                    f"runtime_environment={want!r}: the server has no Python {want} (mljobs runs on 3.10 and later); it has "
                    f"{envs.available_versions()} (or pass 'server' or an interpreter path)")
            python = found
        else:  # the client's major.minor when the server has it, else the server's own
            python = (envs.find_interpreter(client_mm) if client_mm else None) or sys.executable
        spec.runtime_python = python

    def _environment_for(self, spec: JobSpec) -> dict[str, Any] | None:
        same = envs.is_server_python(spec.runtime_python or sys.executable)
        if same and not spec.pip_requirements:
            return None
        cache = self.env_cache()
        req = envs.EnvRequest(
            requirements=envs.normalize_requirements(spec.pip_requirements),
            python=spec.runtime_python or sys.executable,
            index=envs.index_settings(spec.env_vars),
            # another interpreter gets mljobs' runtime and the client's cloudpickle, nothing else of ours
            runtime_packages=[] if same else [f"cloudpickle=={spec.client_cloudpickle or cloudpickle.__version__}"],
            ship_runtime=not same,
        )
        return {"request": req.to_dict(), "cache_dir": str(cache.root), "max_bytes": cache.max_bytes,
                "timeout_s": self.settings.install_timeout_s}

    # -- jobs: submit -------------------------------------------------------------------------
    def check_submission(self, spec: JobSpec, who: Principal | None = None) -> dict[str, Any]:
        """Refuse what cannot run (naming why and the fix); the job's pool. ``who``: the submitter
        (None: the server, a schedule's tick, already checked when the schedule was made)."""
        pool = self.store.get_pool(spec.compute_pool)
        provider = self.provider(pool["name"])
        if who is not None and not who.admin and spec.priority > pool["max_priority"]:
            raise PermissionDeniedError(
                f"priority={spec.priority} is above pool {pool['name']}'s max_priority={pool['max_priority']}, the "
                "highest a user may ask for; only an admin goes higher (or raises it: alter_compute_pool("
                f"{pool['name']!r}, max_priority=...))")
        if spec.owner:
            self.quotas.check_submit(spec.owner, pool["name"], spec.effective_min_instances)
        if spec.effective_min_instances > pool["max_nodes"]:
            raise InvalidArgumentError(
                f"the job needs at least {spec.effective_min_instances} instance(s) but pool {pool['name']} "
                f"has max_nodes={pool['max_nodes']}; lower min_instances/target_instances or raise max_nodes "
                f"with alter_compute_pool({pool['name']!r}, max_nodes=...)"
            )
        if spec.target_instances > 1 and not provider.supports_multinode:
            raise UnsupportedError(
                f"target_instances={spec.target_instances}: the {provider.name} provider does not run "
                "multi-node jobs yet; use target_instances=1"
            )
        if spec.target_instances > 1 and not spec.parallel:
            self._check_ray(spec)
        if provider.remote:  # its nodes read the stage themselves: is it one they can reach?
            stage = self.store.get_stage(check_stage_name(spec.stage_name))
            provider.check_job(spec, PoolSpec.from_dict(pool), stage["url"] if stage else str(
                self.home.stage_root(spec.stage_name)))
        if not all(isinstance(r, str) and r.strip() for r in spec.pip_requirements):
            raise InvalidArgumentError(f"pip_requirements must be requirement strings like 'humanize==4.9.0', "
                                       f"got {spec.pip_requirements!r}")
        self._check_egress(spec)
        self._choose_interpreter(spec)
        if spec.payload_kind == PayloadKind.FUNCTION:
            runtime = envs.interpreter_version(spec.runtime_python)
            problem = check_versions(
                spec.client_python, spec.client_cloudpickle, runtime_python=runtime,
                # another interpreter's environment is given the client's cloudpickle
                runtime_cloudpickle=None if envs.is_server_python(spec.runtime_python) else spec.client_cloudpickle)
            if problem:
                raise VersionMismatchError(problem)
        if not spec.entrypoint:
            raise InvalidArgumentError("the job has no entrypoint")
        return pool

    def submit(self, spec: JobSpec, payload: IO[bytes] | None, who: Principal,
               idempotency_key: str | None = None, upload: str | None = None) -> dict[str, Any]:
        """Check, store the payload on its stage, record the job PENDING, and schedule it.

        The payload is the tar ``payload``, or the files of the upload ``upload`` on the job's stage
        (:mod:`mljobs.server.uploads`: a large payload, sent by content hash).

        The job belongs to ``who``. A second submission with the same ``idempotency_key`` (a
        client retrying after a lost response) returns the job the first one made.
        """
        began = time.time()
        spec.owner = who.name
        if idempotency_key:
            done = self.store.job_by_key(who.name, idempotency_key)
            if done is not None:
                return self.job_view(done)
        pool = self.check_submission(spec, who)
        stage = self.stage(spec.stage_name, who=who)
        job_id = new_job_id()
        trace.mark(job_id, "server.submit.begin", began)
        paths = StagePaths(job_id)
        try:
            self.stage_payload(spec, stage, paths.app, payload, who, upload)
            trace.mark(job_id, "server.payload.staged")
            row = self.job_row(job_id, spec, pool, stage, idempotency_key)
            self.store.insert_job(row)
        except BaseException:
            stage.remove(paths.prefix)
            first = self.store.job_by_key(who.name, idempotency_key) if idempotency_key else None
            if first is not None:  # the same submission raced itself: the first one stands
                return self.job_view(first)
            raise
        trace.mark(job_id, "server.job.inserted")
        self.request_schedule(pool["name"])
        view = self.job_view(JobRecord.from_row(row), instances=[])  # as recorded: not read back
        trace.mark(job_id, "server.submit.end")
        return view

    def job_row(self, job_id: str, spec: JobSpec, pool: dict[str, Any], stage: Stage,
                idempotency_key: str | None = None, **extra: Any) -> dict[str, Any]:
        """The ``jobs`` row of a new PENDING job (``extra``: its definition, schedule and tick)."""
        return {
            "id": job_id, "name": spec.name or job_id, "status": JOB_STATUS.PENDING.value, "message": "",
            "database_name": spec.database, "schema_name": spec.schema, "owner": spec.owner,
            "compute_pool": pool["name"], "stage_name": stage.name,
            "target_instances": spec.target_instances, "min_instances": spec.effective_min_instances,
            "instances_ran": 0, "spec": spec.to_dict(), "created_time": utcnow(), "priority": spec.priority,
            "idempotency_key": idempotency_key or None, **extra,
        }

    def stage_payload(self, spec: JobSpec, stage: Stage, app_prefix: str, payload: IO[bytes] | None,
                      who: Principal, upload: str | None = None) -> None:
        """Put a submission's payload under ``app_prefix`` on ``stage``: the uploaded tar, or a copy
        of the stage folder it names; a directory's ``requirements.txt`` joins its requirements."""
        if spec.payload_kind == PayloadKind.STAGE:
            self._copy_stage_payload(spec, stage, app_prefix, who)
            return
        if upload is not None:
            if payload is not None or spec.payload_kind not in (PayloadKind.FILE, PayloadKind.DIRECTORY):
                raise InvalidArgumentError("an upload is the payload of a file or directory job, and its only one")
            names = uploads.take(stage, upload, app_prefix, who.name)
        elif payload is None:
            raise InvalidArgumentError("the submission carries no payload")
        else:
            names = stage.extract_tar(payload, app_prefix, self.settings.max_payload_bytes)
        entry = spec.entrypoint[0]
        if len(spec.entrypoint) == 1 and entry.endswith(".py") and entry not in names:
            raise InvalidArgumentError(
                f"entrypoint {entry!r} is not in the uploaded payload ({len(names)} files)")
        if spec.payload_kind == PayloadKind.DIRECTORY and "requirements.txt" in names:
            self._add_requirements_file(spec, stage, f"{app_prefix}requirements.txt")

    def _copy_stage_payload(self, spec: JobSpec, dst: Stage, app_prefix: str, who: Principal) -> None:
        if not spec.source:
            raise InvalidArgumentError("submit_from_stage needs a source like '@stage/path/'")
        src_name, src_path = parse_stage_path(spec.source)
        src = self.stage(src_name, create=False, who=who)
        if not src_path or not src.isdir(src_path):
            raise NotFoundError(f"source {spec.source} does not exist (or is not a folder) on stage @{src_name}; "
                                f"`mljobs stage ls @{src_name}/` lists what is there")
        entry = spec.entrypoint[0]
        if len(spec.entrypoint) == 1 and entry.startswith("@"):
            e_stage, e_path = parse_stage_path(entry)
            base = src_path.rstrip("/") + "/"
            if e_stage != src_name or not e_path.startswith(base):
                raise InvalidArgumentError(f"entrypoint {entry} is outside the source folder {spec.source}")
            spec.entrypoint = [e_path[len(base):]]
        if len(spec.entrypoint) == 1 and spec.entrypoint[0].endswith(".py") and not src.exists(
                f"{src_path.rstrip('/')}/{spec.entrypoint[0]}"):
            raise NotFoundError(f"entrypoint {spec.entrypoint[0]!r} does not exist in {spec.source}")
        src.copy_dir(src_path, dst, app_prefix)
        if dst.exists(f"{app_prefix}requirements.txt"):
            self._add_requirements_file(spec, dst, f"{app_prefix}requirements.txt")

    def _add_requirements_file(self, spec: JobSpec, stage: Stage, path: str) -> None:
        """A ``requirements.txt`` at the payload's root adds to ``pip_requirements`` (checked again)."""
        lines = stage.get_bytes(path).decode("utf-8", "replace").splitlines()
        reqs = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if reqs:
            spec.pip_requirements = [*spec.pip_requirements, *reqs]
            self._check_egress(spec)


def _index_hosts(spec: JobSpec) -> list[tuple[str, int, str]]:
    """The hosts an install for ``spec`` would reach (its indexes and any direct-URL requirements),
    as :func:`mljobs.runtime.environment.index_hosts` gives them."""
    env = spec.env_vars
    urls = [env.get("UV_DEFAULT_INDEX") or env.get("UV_INDEX_URL") or env.get("PIP_INDEX_URL") or envs.DEFAULT_INDEX]
    for var in ("PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_INDEX", "PIP_FIND_LINKS", "UV_FIND_LINKS"):
        urls += env.get(var, "").split()
    for req in spec.pip_requirements:
        r = req.strip()
        if r.startswith(("--index-url", "-i ", "--extra-index-url", "--find-links", "-f ")):
            urls.append(r.split(None, 1)[-1].lstrip("=").strip())
        elif "@" in r and "://" in r:
            urls.append(r.split("@", 1)[1].strip())
    return envs.index_hosts(urls)