"""REST routes of the control plane (FastAPI). Logic lives in :mod:`mljobs.server.service`.

Every body is typed (:mod:`mljobs.server.schemas`, and :class:`mljobs.spec.JobSpec` for a
submission), every route but ``/health`` names its caller (:mod:`mljobs.server.auth`), and files
(payloads, stage files, results, logs) stream in both directions.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, File, Form, Header, Path, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter, ValidationError

from mljobs import __version__, errors, logformat, trace
from mljobs.providers.base import InstanceReport, UnsupportedError
from mljobs.server import schemas as S
from mljobs.server import dashboard, uploads
from mljobs.server.auth import Principal
from mljobs.server.definitions import decode_call
from mljobs.server.logs import follow_lines, iter_lines, tail_lines
from mljobs.server.service import ControlPlane
from mljobs.spec import JobSpec, is_job_id
from mljobs.stages import parse_stage_path
from mljobs.status import JOB_STATUS, TERMINAL_VALUES

__all__ = ["create_app"]

_STATUS = {
    errors.AuthenticationError: 401, errors.PermissionDeniedError: 403, errors.PayloadTooLargeError: 413,
    errors.StoreBusyError: 503, errors.InvalidArgumentError: 400, errors.PayloadError: 400,
    errors.VersionMismatchError: 400, UnsupportedError: 400, errors.NotFoundError: 404,
    errors.ConflictError: 409, errors.InvalidTransitionError: 409, errors.QuotaExceededError: 429,
}
_JOB_SPEC = TypeAdapter(JobSpec)
_SPEC_FIELDS = {f.name for f in dataclasses.fields(JobSpec)}
_OCTETS = "application/octet-stream"
_TEXT = "text/plain; charset=utf-8"
_Limit = Annotated[int, Query(ge=-(2**31), le=10_000_000, description="<= 0: all")]


def _error(code: int, exc: Exception, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
    return JSONResponse({"detail": str(exc), "error": type(exc).__name__, **extra}, status_code=code,
                        headers=headers)


def _field_errors(e: ValidationError, prefix: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{**err, "loc": [*prefix, *err["loc"]]} for err in e.errors(include_url=False, include_context=False,
                                                                         include_input=False)]


def _describe(errs: Any) -> str:
    """``spec.env_vars: Input should be a valid dictionary; ...`` from pydantic's error list."""
    parts = []
    for err in list(errs)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header"))
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


_bearer = HTTPBearer(auto_error=False, description="a user's token (`mljobs user create`) or a job's own")


def _caller(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    """The request's principal (a route dependency: routes say ``who: Who``).

    A bearer token first; else, for reads only (GET, HEAD), the dashboard's login cookie, so the
    dashboard's pages stream logs from the same routes. A change (POST, PUT, PATCH, DELETE)
    never acts on a cookie.
    """
    token = creds.credentials if creds else dashboard.cookie_token(request)
    return request.app.state.cp.auth.authenticate(token, request.headers.get("host"))


Who = Annotated[Principal, Depends(_caller)]


def create_app(cp: ControlPlane, on_shutdown: Any = None) -> FastAPI:
    app = FastAPI(title="mljobs control plane", version=__version__)
    app.state.cp = cp
    api = "/api/v1"

    @app.exception_handler(errors.MLJobsError)
    async def _mljobs_error(_: Request, exc: errors.MLJobsError) -> JSONResponse:
        return _error(next((c for t, c in _STATUS.items() if isinstance(exc, t)), 500), exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": errs, "error": "InvalidArgumentError", "message": _describe(errs)}, 422)

    @app.exception_handler(sa.exc.OperationalError)
    async def _store_busy(_: Request, exc: sa.exc.OperationalError) -> JSONResponse:
        return _error(503, errors.StoreBusyError(
            f"the server's store is unavailable ({exc.orig}); nothing was changed, try again shortly"))

    app.add_middleware(_UploadCap, max_bytes=cp.settings.max_payload_bytes)

    @app.on_event("startup")
    async def _bind() -> None:
        cp.notifier.bind(asyncio.get_running_loop())

    @app.get("/health", response_model=S.HealthOut)
    def health() -> dict[str, Any]:
        return {"ok": True, **cp.info()}

    @app.get(api + "/whoami", response_model=S.WhoAmI)
    def whoami(who: Who) -> dict[str, Any]:
        return {"name": who.name, "admin": who.admin, "job_id": who.job_id}

    @app.post(api + "/server/shutdown", response_model=S.Ok)
    def shutdown(who: Who) -> dict[str, Any]:
        who.require_admin("stopping the server")
        if on_shutdown is None:
            raise errors.ConflictError("this server cannot be stopped over the API")
        on_shutdown()
        return {"ok": True}

    # -- users --------------------------------------------------------------------------------
    @app.post(api + "/users", response_model=S.UserCreated)
    def create_user(body: S.UserIn, who: Who) -> dict[str, Any]:
        return cp.create_user(body.name, body.admin, who)

    @app.put(api + "/users/{name}/quotas/{pool}", response_model=S.QuotaOut)
    def set_quota(name: str, pool: str, body: S.QuotaIn, who: Who) -> dict[str, Any]:
        who.require_admin("setting quotas")
        return cp.quotas.set(name, pool, body.model_dump())

    @app.get(api + "/users/{name}/quotas", response_model=list[S.QuotaOut])
    def get_quotas(name: str, who: Who) -> list[dict[str, Any]]:
        if name != who.name:
            who.require_admin("reading another user's quotas")
        return cp.quotas.of(None if name == "*" else name)

    @app.get(api + "/users", response_model=list[S.UserOut])
    def list_users(who: Who) -> list[dict[str, Any]]:
        return cp.list_users(who)

    @app.delete(api + "/users/{name}", response_model=S.Ok)
    def delete_user(name: str, who: Who) -> dict[str, Any]:
        cp.delete_user(name, who)
        return {"ok": True}

    # -- jobs ---------------------------------------------------------------------------------
    @app.post(api + "/jobs", response_model=S.JobOut)
    def submit(who: Who, spec: Annotated[str, Form(description="the job's JobSpec, as JSON")],
               payload: Annotated[UploadFile | None, File(description="a tar of the job's files")] = None,
               upload: Annotated[str | None, Form(max_length=64, description="instead of payload: the id of an "
                                                  "upload on the job's stage (POST /stages/{name}/uploads)")] = None,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> dict[str, Any]:
        try:
            job_spec = _JOB_SPEC.validate_json(spec)
        except ValidationError as e:
            raise RequestValidationError(_field_errors(e, ("body", "spec"))) from None
        unknown = sorted(set(json.loads(spec)) - _SPEC_FIELDS)  # valid JSON object by now
        if unknown:  # a misspelt option is an error, not silently ignored
            raise RequestValidationError([{"loc": ["body", "spec", k], "msg": "Extra inputs are not permitted",
                                           "type": "extra_forbidden"} for k in unknown])
        return cp.submit(job_spec, payload.file if payload is not None else None, who, idempotency_key, upload)

    @app.get(api + "/jobs", response_model=list[S.JobSummary])
    def list_jobs(who: Who, limit: _Limit = 10, database: Annotated[str | None, Query(max_length=255)] = None,
                  schema: Annotated[str | None, Query(max_length=255)] = None,
                  status: Annotated[list[JOB_STATUS] | None, Query(description="only these; repeatable")] = None,
                  pool: Annotated[str | None, Query(max_length=255)] = None,
                  owner: Annotated[str | None, Query(max_length=255)] = None,
                  schedule: Annotated[str | None, Query(max_length=255)] = None) -> list[dict[str, Any]]:
        return cp.list_jobs(limit, database, schema, who, statuses=[s.value for s in status] if status else None,
                            pool=pool, owner=owner, schedule=schedule)

    # -- definitions and schedules -------------------------------------------------------------
    @app.post(api + "/definitions", response_model=S.DefinitionOut)
    def register_definition(
            who: Who, name: Annotated[str, Form(min_length=1, max_length=255)],
            spec: Annotated[str, Form(description="the JobSpec every call starts from, as JSON")],
            overwrite: Annotated[bool, Form()] = False,
            signature: Annotated[str | None, Form(description="a function's parameters, as JSON")] = None,
            payload: Annotated[UploadFile | None, File(description="a tar of the definition's files")] = None,
            upload: Annotated[str | None, Form(max_length=64, description="or a large payload's upload on its "
                                                                             "stage (POST /stages/{name}/uploads)")] = None,
    ) -> dict[str, Any]:
        try:
            job_spec = _JOB_SPEC.validate_json(spec)
        except ValidationError as e:
            raise RequestValidationError(_field_errors(e, ("body", "spec"))) from None
        try:
            params = json.loads(signature) if signature else None
        except ValueError:
            raise errors.InvalidArgumentError("signature must be JSON") from None
        if params is not None and not (isinstance(params, list) and all(isinstance(p, dict) for p in params)):
            raise errors.InvalidArgumentError("signature must be a list of parameters")
        return cp.definitions.register(job_spec, payload.file if payload is not None else None, name, overwrite,
                                       params, who, upload)

    @app.get(api + "/definitions", response_model=list[S.DefinitionOut])
    def list_definitions(who: Who, remote: Annotated[bool, Query(
            description="also @remote's own definitions (_REMOTE_...), which are not listed otherwise")] = False,
                         ) -> list[dict[str, Any]]:
        return cp.definitions.list(who, remote)

    @app.get(api + "/definitions/{name}", response_model=S.DefinitionOut)
    def get_definition(name: str, who: Who) -> dict[str, Any]:
        return cp.definitions.get(name, who)

    @app.delete(api + "/definitions/{name}", response_model=S.Ok)
    def delete_definition(name: str, who: Who) -> dict[str, Any]:
        cp.definitions.delete(name, who)
        return {"ok": True}

    @app.post(api + "/definitions/{name}/jobs", response_model=S.JobOut)
    def call_definition(name: str, body: S.DefinitionCallIn, who: Who,
                        idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> dict[str, Any]:
        return cp.definitions.call(name, who, args=body.args, call=decode_call(body.call), job_name=body.name,
                                   idempotency_key=idempotency_key)

    @app.post(api + "/schedules", response_model=S.ScheduleOut)
    def create_schedule(body: S.ScheduleIn, who: Who) -> dict[str, Any]:
        return cp.schedules.create(body, decode_call(body.call), who)

    @app.get(api + "/schedules", response_model=list[S.ScheduleOut])
    def list_schedules(who: Who) -> list[dict[str, Any]]:
        return cp.schedules.list(who)

    @app.get(api + "/schedules/{name}", response_model=S.ScheduleOut)
    def get_schedule(name: str, who: Who) -> dict[str, Any]:
        return cp.schedules.get(name, who)

    @app.post(api + "/schedules/{name}/pause", response_model=S.ScheduleOut)
    def pause_schedule(name: str, who: Who) -> dict[str, Any]:
        return cp.schedules.set_paused(name, True, who)

    @app.post(api + "/schedules/{name}/resume", response_model=S.ScheduleOut)
    def resume_schedule(name: str, who: Who) -> dict[str, Any]:
        return cp.schedules.set_paused(name, False, who)

    @app.delete(api + "/schedules/{name}", response_model=S.Ok)
    def drop_schedule(name: str, who: Who) -> dict[str, Any]:
        cp.schedules.drop(name, who)
        return {"ok": True}

    @app.get(api + "/schedules/{name}/events", response_model=list[S.ScheduleEvent])
    def schedule_events(name: str, who: Who, limit: _Limit = 100) -> list[dict[str, Any]]:
        return cp.schedules.events(name, who, limit)

    @app.post(api + "/jobs/prune", response_model=S.PrunedJobs)
    def prune_jobs(body: S.PruneJobsIn, who: Who) -> dict[str, Any]:
        statuses = [s.value for s in body.statuses] if body.statuses else None
        return {"deleted": cp.prune_jobs(body.older_than_s, statuses, who)}

    @app.get(api + "/jobs/{ref}", response_model=S.JobOut)
    def get_job(ref: str, who: Who) -> dict[str, Any]:
        return cp.get_job(ref, who)

    @app.get(api + "/jobs/{ref}/wait", response_model=S.JobWaitOut, response_model_exclude_none=True)
    async def wait(ref: str, who: Who, timeout: Annotated[float, Query(ge=0, le=300, allow_inf_nan=False)] = 30.0,
                   result: Annotated[bool, Query(description="an ended job's result envelope (up to 1 MiB) "
                                                 "comes along, saving a request")] = False) -> dict[str, Any]:
        """Return the job once it is terminal, or when ``timeout`` s pass (long poll). Each look
        reads the job's row only; its instances are read for the answer."""
        # Registered before the state is read, so no change is missed: by id at once, where the
        # lookup's own read is then the first look; by name once the name is resolved.
        early = cp.notifier.register(ref.upper()) if is_job_id(ref) else None
        try:
            job = await run_in_threadpool(cp.resolve, ref, who)
        except BaseException:
            if early is not None:
                cp.notifier.discard(ref.upper(), early)
            raise
        deadline = time.monotonic() + timeout
        fut = early
        while True:
            if fut is None:
                fut = cp.notifier.register(job.id)
                job = await run_in_threadpool(cp.store.get_job, job.id)
            left = deadline - time.monotonic()
            if job.status in TERMINAL_VALUES or left <= 0:
                cp.notifier.discard(job.id, fut)
                view = await run_in_threadpool(cp.job_view, job)
                if result and view["status"] in TERMINAL_VALUES:
                    data = await run_in_threadpool(cp.small_result, job.id, view["stage_name"])
                    view["result"] = base64.b64encode(data).decode() if data is not None else None
                trace.mark(job.id, "server.wait.answered")
                return view
            await cp.notifier.wait(job.id, fut, left)
            fut = None

    @app.post(api + "/jobs/{ref}/cancel", response_model=S.JobOut)
    def cancel(ref: str, who: Who) -> dict[str, Any]:
        return cp.cancel(ref, who)

    @app.delete(api + "/jobs/{ref}", response_model=S.Ok)
    def delete(ref: str, who: Who) -> dict[str, Any]:
        cp.delete(ref, who)
        return {"ok": True}

    @app.get(api + "/jobs/{ref}/results/{instance_id}", response_class=StreamingResponse,
             responses={200: {"content": {_OCTETS: {}}}})
    def instance_result(ref: str, instance_id: Annotated[int, Path(ge=0, le=100_000)], who: Who) -> Any:
        chunks = cp.result(ref, who, instance_id)
        if chunks is None:
            return _error(404, errors.NotFoundError(f"instance {instance_id} of job {ref} left no result"))
        return StreamingResponse(chunks, media_type=_OCTETS)

    @app.get(api + "/jobs/{ref}/events", response_model=list[S.JobEvent])
    def job_events(ref: str, who: Who) -> list[dict[str, Any]]:
        """Every status the job took, oldest first, with its time and message."""
        return cp.job_events(ref, who)

    @app.get(api + "/jobs/{ref}/metrics", response_model=list[S.MetricRow], response_model_exclude_unset=True)
    def job_metrics(ref: str, who: Who) -> list[dict[str, Any]]:
        """Resource samples of every instance; [] if it never ran."""
        return cp.job_metrics(ref, who)

    @app.post(api + "/jobs/{job_id}/instances/{instance_id}/report", response_model=S.ReportReply)
    def instance_report(job_id: str, instance_id: Annotated[int, Path(ge=0, le=100_000)], body: S.InstanceReportIn,
                        who: Who) -> dict[str, Any]:
        """A remote instance's log records, samples, heartbeat or exit (its job's own token)."""
        return cp.instance_report(job_id, instance_id, InstanceReport(**body.model_dump()), who)

    @app.get(api + "/jobs/{ref}/ray", response_model=S.RayInfoOut)
    def ray_info(ref: str, who: Who) -> dict[str, Any]:
        return cp.ray_info(ref, who)

    @app.get(api + "/jobs/{ref}/result", response_class=StreamingResponse,
             responses={200: {"content": {_OCTETS: {}}}})
    def result(ref: str, who: Who) -> Any:
        chunks = cp.result(ref, who)
        if chunks is None:
            job = cp.resolve(ref, who)
            exc = errors.JobFailedError(f"job {job.id} ended {job.status} without a result: {job.message}")
            return _error(404, exc, status=job.status)
        return StreamingResponse(chunks, media_type=_OCTETS)

    @app.get(api + "/jobs/{ref}/logs", response_class=StreamingResponse, responses={200: {"content": {_TEXT: {}}}})
    async def logs(ref: str, who: Who, instance: Annotated[int, Query(ge=0, le=100_000)] = 0, limit: _Limit = -1,
                   verbose: bool = False, follow: bool = False,
                   before: Annotated[int | None, Query(ge=0, description="page back: the lines that end before "
                                                       "this byte offset (a response's X-Log-Start)")] = None
                   ) -> StreamingResponse:
        """An instance's log: all of it, its last ``limit`` lines, or (``follow``) those and then
        every line written until the job ends. A tail (``limit`` > 0) says in ``X-Log-Start`` the
        byte offset where its first line starts (0: nothing earlier), to page back with ``before``."""
        if before is not None and (follow or limit <= 0):
            raise errors.InvalidArgumentError(
                f"before={before} pages back through a log: it needs a limit > 0 (got {limit}) and no follow")
        job = await run_in_threadpool(cp.resolve, ref, who)
        if instance >= max(job.target_instances, 1):
            raise errors.InvalidArgumentError(
                f"instance {instance} does not exist: job {job.id} has instances 0..{job.target_instances - 1}")
        path = cp.home.log_file(job.id, instance)
        tail = None
        headers: dict[str, str] = {}
        if limit > 0:
            lines, start, end = await run_in_threadpool(tail_lines, path, limit, verbose, before)
            tail, headers = (lines, end), {"X-Log-Start": str(start), "X-Log-End": str(end)}
        if not follow:
            body = iter(tail[0]) if tail is not None else iter_lines(path, limit, verbose)
            return StreamingResponse(body, media_type=_TEXT, headers=headers)

        def finished() -> bool:
            status = cp.store.job_owner_status(job.id)
            return status is None or status[1] in TERMINAL_VALUES

        keepalive = min(cp.settings.log_keepalive_s, logformat.KEEPALIVE_S)
        return StreamingResponse(follow_lines(path, finished, verbose, limit, keepalive_s=keepalive, tail=tail),
                                 media_type=_TEXT, headers=headers)

    # -- pools --------------------------------------------------------------------------------
    @app.post(api + "/pools", response_model=S.PoolOut)
    def create_pool(body: S.PoolIn, who: Who) -> dict[str, Any]:
        return cp.create_pool(body.name, instance_family=body.instance_family, min_nodes=body.min_nodes,
                              max_nodes=body.max_nodes, provider=body.provider,
                              provider_options=body.provider_options, if_not_exists=body.if_not_exists, who=who,
                              scheduling=body.scheduling, preemption=body.preemption, max_priority=body.max_priority)

    @app.get(api + "/pools", response_model=list[S.PoolOut])
    def list_pools(who: Who) -> list[dict[str, Any]]:
        return cp.list_pools()

    @app.get(api + "/pools/{name}", response_model=S.PoolOut)
    def describe_pool(name: str, who: Who) -> dict[str, Any]:
        return cp.describe_pool(name)

    @app.patch(api + "/pools/{name}", response_model=S.PoolOut)
    def alter_pool(name: str, body: S.PoolAlter, who: Who) -> dict[str, Any]:
        return cp.alter_pool(name, suspend=body.suspend, resume=body.resume, max_nodes=body.max_nodes, who=who,
                             scheduling=body.scheduling, preemption=body.preemption, max_priority=body.max_priority)

    @app.delete(api + "/pools/{name}", response_model=S.Ok)
    def drop_pool(name: str, who: Who) -> dict[str, Any]:
        cp.drop_pool(name, who)
        return {"ok": True}

    # -- external access integrations and job environments -----------------------------------
    @app.post(api + "/integrations", response_model=S.IntegrationOut)
    def create_integration(body: S.IntegrationIn, who: Who) -> dict[str, Any]:
        return cp.create_integration(body.name, body.allowed_hosts, replace=body.replace,
                                     if_not_exists=body.if_not_exists, who=who)

    @app.get(api + "/integrations", response_model=list[S.IntegrationOut])
    def list_integrations(who: Who) -> list[dict[str, Any]]:
        return cp.list_integrations()

    @app.delete(api + "/integrations/{name}", response_model=S.Ok)
    def drop_integration(name: str, who: Who) -> dict[str, Any]:
        cp.drop_integration(name, who)
        return {"ok": True}

    @app.get(api + "/environments", response_model=list[S.EnvOut])
    def list_environments(who: Who) -> list[dict[str, Any]]:
        return cp.list_envs()

    @app.post(api + "/environments/prune", response_model=list[S.EnvOut])
    def prune_environments(body: S.PruneEnvsIn, who: Who) -> list[dict[str, Any]]:
        return cp.prune_envs(body.max_bytes, who)

    # -- stages -------------------------------------------------------------------------------
    @app.get(api + "/stages", response_model=list[S.StageOut])
    def list_stages(who: Who) -> list[dict[str, Any]]:
        return [s for s in cp.store.list_stages() if who.may_use(s["owner"])]

    @app.post(api + "/stages", response_model=S.StageOut)
    def create_stage(body: S.StageIn, who: Who) -> dict[str, Any]:
        return cp.create_stage(body.name, body.url, who)

    @app.put(api + "/stages/{name}/files/{path:path}", response_model=S.StageFileOut)
    async def put_file(name: str, path: str, request: Request, who: Who) -> dict[str, Any]:
        """Write one stage file from the request body, streamed (never held whole)."""
        stage_name, rel = parse_stage_path(f"@{name}/{path}")
        if not rel or rel.endswith("/"):
            raise errors.InvalidArgumentError(f"@{name}/{path}: a file path is needed")
        if rel.split("/")[0] == ".mljobs":  # uploads' content-addressed blobs: written only by uploads.py
            raise errors.InvalidArgumentError(f"@{name}/{path}: .mljobs/ on a stage is mljobs' own; "
                                              "write files under another folder")
        stage = await run_in_threadpool(cp.stage, stage_name, True, who)
        reader = _BodyReader(request, asyncio.get_running_loop())
        size = await run_in_threadpool(stage.put_stream, rel, reader, cp.settings.max_payload_bytes)
        return {"name": rel, "size": size}

    @app.post(api + "/stages/{name}/uploads", response_model=S.UploadOut)
    def begin_upload(name: str, body: S.UploadIn, who: Who) -> dict[str, Any]:
        """A large payload's manifest: the upload keeps what the stage has; the answer lists what to send."""
        entries = uploads.parse_manifest(body.files)
        stage = cp.stage(name, True, who)
        return uploads.begin(stage, entries, who.name, cp.settings.max_payload_bytes)

    @app.put(api + "/stages/{name}/uploads/{upload_id}", response_model=S.UploadReceived)
    async def send_upload(name: str, upload_id: str, request: Request, who: Who) -> dict[str, Any]:
        """A tar of the upload's missing files, streamed (never held whole)."""
        stage = await run_in_threadpool(cp.stage, name, False, who)
        reader = _BodyReader(request, asyncio.get_running_loop())
        return await run_in_threadpool(uploads.receive, stage, upload_id, reader, who.name)

    @app.get(api + "/stages/{name}/files/{path:path}", response_class=StreamingResponse,
             responses={200: {"content": {_OCTETS: {}}}})
    def get_file(name: str, path: str, who: Who) -> StreamingResponse:
        stage_name, rel = parse_stage_path(f"@{name}/{path}")
        stage = cp.stage(stage_name, create=False, who=who)
        return StreamingResponse(stage.iter_chunks(rel), media_type=_OCTETS)

    @app.get(api + "/stages/{name}/list", response_model=list[S.StageFileOut])
    def list_files(name: str, who: Who, path: Annotated[str, Query(max_length=4096)] = "") -> list[dict[str, Any]]:
        stage_name, rel = parse_stage_path(f"@{name}/{path}")
        return cp.stage(stage_name, create=False, who=who).list(rel)

    dashboard.register(app, cp, _caller)
    return app


class _UploadCap:
    """Refuse an upload whose declared size is over the cap before reading any of it. Plain ASGI
    (not ``@app.middleware("http")``, whose wrapper costs every request a task and a stream)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT"):
            size = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
            if size.isdigit() and int(size) > self.max_bytes + (1 << 20):
                response = _error(413, errors.PayloadTooLargeError(
                    f"the request has {int(size)} bytes, more than the server accepts ({self.max_bytes}); "
                    "an admin raises the cap with MLJOBS_MAX_PAYLOAD_MB"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyReader:
    """A request body as a blocking file (``read``) for a worker thread, fed from the event loop
    one chunk at a time, so an upload is written as it arrives and never held whole."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop) -> None:
        self._stream = request.stream().__aiter__()
        self._loop = loop
        self._buf = bytearray()
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._buf) < n):
            fut = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
            chunk = fut.result()
            if chunk is None:
                self._eof = True
            else:
                self._buf += chunk
        if n < 0 or n >= len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
        else:
            out = bytes(self._buf[:n])
            del self._buf[:n]
        return out

    async def _next(self) -> bytes | None:
        try:
            return await self._stream.__anext__()
        except StopAsyncIteration:
            return None
