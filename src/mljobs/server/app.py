"""REST routes of the control plane (FastAPI). Logic lives in :mod:`mljobs.server.service`."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from mljobs import errors
from mljobs.providers.base import UnsupportedError
from mljobs.server.logs import follow_lines, read_lines
from mljobs.server.service import ControlPlane
from mljobs.spec import JobSpec
from mljobs.stages import parse_stage_path
from mljobs.status import TERMINAL

__all__ = ["create_app"]

_STATUS = {
    errors.InvalidArgumentError: 400, errors.PayloadError: 400, errors.VersionMismatchError: 400,
    UnsupportedError: 400, errors.NotFoundError: 404, errors.ConflictError: 409,
    errors.InvalidTransitionError: 409,
}
_TERMINAL = {s.value for s in TERMINAL}


class PoolIn(BaseModel):
    name: str
    instance_family: str
    min_nodes: int = 1
    max_nodes: int = 1
    provider: str = "local"
    if_not_exists: bool = False


class PoolAlter(BaseModel):
    suspend: bool | None = None
    resume: bool | None = None
    max_nodes: int | None = None


class IntegrationIn(BaseModel):
    name: str
    allowed_hosts: list[str]
    replace: bool = False
    if_not_exists: bool = False


class PruneIn(BaseModel):
    max_bytes: int | None = None  # None: down to the server's cap; 0: every idle environment


class StageIn(BaseModel):
    name: str
    url: str | None = None


def create_app(cp: ControlPlane, on_shutdown: Any = None) -> FastAPI:
    app = FastAPI(title="mljobs control plane", version=cp.info()["version"])
    api = "/api/v1"

    @app.exception_handler(errors.MLJobsError)
    async def _mljobs_error(_: Request, exc: errors.MLJobsError) -> JSONResponse:
        code = next((c for t, c in _STATUS.items() if isinstance(exc, t)), 500)
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=code)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        token = cp.settings.token
        if token and request.url.path.startswith(api) and request.headers.get("authorization") != f"Bearer {token}":
            return JSONResponse({"detail": "missing or wrong token (set MLJOBS_TOKEN)", "error": "AuthError"}, 401)
        return await call_next(request)

    @app.on_event("startup")
    async def _bind() -> None:
        cp.notifier.bind(asyncio.get_running_loop())

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True, **cp.info()}

    @app.post(api + "/server/shutdown")
    def shutdown() -> dict[str, Any]:
        if on_shutdown is None:
            raise errors.ConflictError("this server cannot be stopped over the API")
        on_shutdown()
        return {"ok": True}

    # -- jobs ---------------------------------------------------------------------------------
    @app.post(api + "/jobs")
    def submit(spec: str = Form(...), payload: UploadFile | None = File(None)) -> dict[str, Any]:
        try:
            job_spec = JobSpec.from_dict(json.loads(spec))
        except (TypeError, json.JSONDecodeError) as e:
            raise errors.InvalidArgumentError(f"invalid job spec: {e}") from None
        return cp.submit(job_spec, payload.file if payload is not None else None)

    @app.get(api + "/jobs")
    def list_jobs(limit: int = 10, database: str | None = None, schema: str | None = None) -> list[dict[str, Any]]:
        return cp.list_jobs(limit, database, schema)

    @app.get(api + "/jobs/{ref}")
    def get_job(ref: str) -> dict[str, Any]:
        return cp.get_job(ref)

    @app.get(api + "/jobs/{ref}/wait")
    async def wait(ref: str, timeout: float = 30.0) -> dict[str, Any]:
        """Return the job once it is terminal, or when ``timeout`` s pass (long poll)."""
        job = await run_in_threadpool(cp.resolve, ref)
        deadline = time.monotonic() + min(max(timeout, 0.0), 300.0)
        while True:
            fut = cp.notifier.register(job["id"])
            view = await run_in_threadpool(cp.get_job, job["id"])
            left = deadline - time.monotonic()
            if view["status"] in _TERMINAL or left <= 0:
                cp.notifier.discard(job["id"], fut)
                return view
            await cp.notifier.wait(job["id"], fut, left)

    @app.post(api + "/jobs/{ref}/cancel")
    def cancel(ref: str) -> dict[str, Any]:
        return cp.cancel(ref)

    @app.delete(api + "/jobs/{ref}")
    def delete(ref: str) -> dict[str, Any]:
        cp.delete(ref)
        return {"ok": True}

    @app.get(api + "/jobs/{ref}/results/{instance_id}")
    def instance_result(ref: str, instance_id: int) -> Response:
        data = cp.result(ref, instance_id)
        if data is None:
            return JSONResponse({"detail": f"instance {instance_id} of job {ref} left no result",
                                 "error": "NotFoundError"}, 404)
        return Response(data, media_type="application/octet-stream")

    @app.get(api + "/jobs/{ref}/metrics")
    def job_metrics(ref: str) -> list[dict[str, Any]]:
        """Resource samples of every instance (mljobs.server.metrics.COLUMNS); [] if it never ran."""
        return cp.job_metrics(ref)

    @app.get(api + "/jobs/{ref}/ray")
    def ray_info(ref: str) -> dict[str, Any]:
        return cp.ray_info(ref)

    @app.get(api + "/jobs/{ref}/result")
    def result(ref: str) -> Response:
        data = cp.result(ref)
        if data is None:
            job = cp.resolve(ref)
            return JSONResponse({"detail": f"job {job['id']} ended {job['status']} without a result: "
                                 f"{job['message']}", "error": "JobFailedError", "status": job["status"]}, 404)
        return Response(data, media_type="application/octet-stream")

    @app.get(api + "/jobs/{ref}/logs")
    async def logs(ref: str, instance: int = 0, limit: int = -1, verbose: bool = False,
                   follow: bool = False) -> Response:
        job = await run_in_threadpool(cp.resolve, ref)
        if not 0 <= instance < max(job["target_instances"], 1):
            raise errors.InvalidArgumentError(
                f"instance {instance} does not exist: job {job['id']} has instances 0..{job['target_instances'] - 1}")
        path = cp.home.log_file(job["id"], instance)
        if not follow:
            lines = await run_in_threadpool(read_lines, path, limit, verbose)
            return Response("".join(line + "\n" for line in lines), media_type="text/plain; charset=utf-8")

        def finished() -> bool:
            return cp.store.get_job(job["id"])["status"] in _TERMINAL

        return StreamingResponse(follow_lines(path, finished, verbose, limit), media_type="text/plain; charset=utf-8")

    # -- pools --------------------------------------------------------------------------------
    @app.post(api + "/pools")
    def create_pool(body: PoolIn) -> dict[str, Any]:
        return cp.create_pool(body.name, instance_family=body.instance_family, min_nodes=body.min_nodes,
                              max_nodes=body.max_nodes, provider=body.provider, if_not_exists=body.if_not_exists)

    @app.get(api + "/pools")
    def list_pools() -> list[dict[str, Any]]:
        return cp.list_pools()

    @app.get(api + "/pools/{name}")
    def describe_pool(name: str) -> dict[str, Any]:
        return cp.describe_pool(name)

    @app.patch(api + "/pools/{name}")
    def alter_pool(name: str, body: PoolAlter) -> dict[str, Any]:
        return cp.alter_pool(name, suspend=body.suspend, resume=body.resume, max_nodes=body.max_nodes)

    @app.delete(api + "/pools/{name}")
    def drop_pool(name: str) -> dict[str, Any]:
        cp.drop_pool(name)
        return {"ok": True}

    # -- external access integrations and job environments -----------------------------------
    @app.post(api + "/integrations")
    def create_integration(body: IntegrationIn) -> dict[str, Any]:
        return cp.create_integration(body.name, body.allowed_hosts, replace=body.replace,
                                     if_not_exists=body.if_not_exists)

    @app.get(api + "/integrations")
    def list_integrations() -> list[dict[str, Any]]:
        return cp.list_integrations()

    @app.delete(api + "/integrations/{name}")
    def drop_integration(name: str) -> dict[str, Any]:
        cp.drop_integration(name)
        return {"ok": True}

    @app.get(api + "/environments")
    def list_environments() -> list[dict[str, Any]]:
        return cp.list_envs()

    @app.post(api + "/environments/prune")
    def prune_environments(body: PruneIn) -> list[dict[str, Any]]:
        return cp.prune_envs(body.max_bytes)

    # -- stages -------------------------------------------------------------------------------
    @app.get(api + "/stages")
    def list_stages() -> list[dict[str, Any]]:
        return cp.store.list_stages()

    @app.post(api + "/stages")
    def create_stage(body: StageIn) -> dict[str, Any]:
        return cp.create_stage(body.name, body.url)

    @app.put(api + "/stages/{name}/files/{path:path}")
    async def put_file(name: str, path: str, request: Request) -> dict[str, Any]:
        stage_name, rel = parse_stage_path(f"@{name}/{path}")
        if not rel or rel.endswith("/"):
            raise errors.InvalidArgumentError(f"@{name}/{path}: a file path is needed")
        data = await request.body()
        stage = await run_in_threadpool(cp.stage, stage_name)
        await run_in_threadpool(stage.put_bytes, rel, data)
        return {"name": rel, "size": len(data)}

    @app.get(api + "/stages/{name}/files/{path:path}")
    def get_file(name: str, path: str) -> Response:
        stage_name, rel = parse_stage_path(f"@{name}/{path}")
        return Response(cp.stage(stage_name, create=False).get_bytes(rel), media_type="application/octet-stream")

    @app.get(api + "/stages/{name}/list")
    def list_files(name: str, path: str = "") -> list[dict[str, Any]]:
        stage_name, rel = parse_stage_path(f"@{name}/{path}")
        return cp.stage(stage_name, create=False).list(rel)

    return app
