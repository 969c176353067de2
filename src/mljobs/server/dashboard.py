"""The web dashboard: server-rendered pages on the control plane's own port, at ``/``.

Pages: jobs (filtered by status, pool and owner, refreshed by polling ``/dashboard/jobs.json``),
one job (spec, timeline, per-instance logs streamed from ``/api/v1/jobs/{id}/logs``, outcome,
Ray dashboard link, Cancel), pools and environments. Templates and one JS and one CSS file live
under ``dashboard/``; there is no front-end build.

Who is calling: the same :class:`~mljobs.server.auth.Authenticator` as the API, with the token
from an HttpOnly, SameSite=Strict cookie set by ``/login`` (a token pasted in the form, or a
one-time code from ``POST /api/v1/login-codes``, which ``mljobs ui`` asks for). Without a valid
one a page answers with the login page and no data; the embedded default (no users, loopback)
needs none. The cookie counts only for reads (GET, HEAD) of the API; a change made from a page
(Cancel) is a POST carrying a CSRF token tied to the login, from a page of this origin.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import pickle
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, Form, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from mljobs import errors
from mljobs.runtime.launcher import summarize_envelope
from mljobs.server.auth import Principal
from mljobs.server.service import ControlPlane
from mljobs.status import CANCELABLE_VALUES, JOB_STATUS, TERMINAL_VALUES
from mljobs.units import format_bytes, format_duration

__all__ = ["register", "cookie_token", "LoginCodes", "COOKIE", "LOGIN_CODE_TTL_S"]

COOKIE = "mljobs_token"
LOGIN_CODE_TTL_S = 60.0
# Every page: never cached, never framed (no clickjacking of Cancel), scripts and styles only from
# this server (a link or text a job wrote can never run as script here).
PAGE_HEADERS = {"Cache-Control": "no-store", "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "same-origin",
                "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                                           "form-action 'self'; object-src 'none'"}
RESULT_READ_CAP = 8 << 20  # a result envelope larger than this is not opened to show its summary
_HERE = Path(__file__).with_name("dashboard")
_SAFE = ("GET", "HEAD")
_STATUSES = [s.value for s in JOB_STATUS if s is not JOB_STATUS.DELETED]
_LIST_LIMIT = 200


def cookie_token(request: Request) -> str | None:
    """The dashboard login's token, for a read (GET, HEAD) only: no change ever acts on a cookie."""
    return (request.cookies.get(COOKIE) or None) if request.method in _SAFE else None


class LoginCodes:
    """One-time login codes, each standing for a token for ``LOGIN_CODE_TTL_S`` seconds (memory only)."""

    def __init__(self, ttl_s: float = LOGIN_CODE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._codes: dict[str, tuple[float, str | None]] = {}

    def issue(self, token: str | None) -> str:
        code = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            self._codes = {c: v for c, v in self._codes.items() if v[0] > now}  # drop the expired
            if len(self._codes) >= 10_000:
                raise errors.ConflictError("too many unused login codes; try again in a minute")
            self._codes[code] = (now + self.ttl_s, token)
        return code

    def redeem(self, code: str) -> tuple[bool, str | None]:
        """(valid, token); a code works once."""
        with self._lock:
            entry = self._codes.pop(code, None)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]


def _when(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    if isinstance(value, (int, float)) and value:
        return dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return ""


_EVENT_WHAT = {JOB_STATUS.PENDING.value: "submitted", JOB_STATUS.RUNNING.value: "started",
               JOB_STATUS.CANCELLING.value: "cancel requested"}


def _timeline(job: dict[str, Any], status_events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A job's life: every status it took (the store's job events), each instance's run. Jobs made
    before the store kept events get theirs from the job's own times."""
    events = [{"time": e["time"], "what": _EVENT_WHAT.get(e["status"], "ended"), "status": e["status"],
               "detail": e["message"]} for e in status_events]
    if not events:
        events.append({"time": job["created_time"], "what": "submitted", "status": "PENDING", "detail": ""})
        if job["started_time"]:
            events.append({"time": job["started_time"], "what": "started", "status": "RUNNING", "detail": ""})
        if job["completed_time"] or job["status"] in TERMINAL_VALUES:
            events.append({"time": job["completed_time"], "what": "ended", "status": job["status"],
                           "detail": job["message"]})
    for inst in job["instances"]:
        if inst["started_time"]:
            events.append({"time": inst["started_time"], "what": f"instance {inst['instance_id']} started",
                           "status": "", "detail": ""})
        if inst["ended_time"]:
            code = inst["exit_code"]
            events.append({"time": inst["ended_time"], "what": f"instance {inst['instance_id']} ended",
                           "status": "", "detail": "" if code is None else f"exit code {code}"})
    far = dt.datetime.max.replace(tzinfo=dt.timezone.utc)
    events.sort(key=lambda e: e["time"] or far)  # stable: a status and an instance at one time keep their order
    return [{**e, "time": _when(e["time"]) if e["time"] else ""} for e in events]


def _outcome(cp: ControlPlane, job: dict[str, Any], who: Principal) -> dict[str, Any]:
    """A finished job's result (its repr) or exception (type, message, remote traceback), read from
    its envelope without unpickling anything the job wrote; {} while it runs."""
    if job["status"] not in TERMINAL_VALUES:
        return {}
    out: dict[str, Any] = {"status": job["status"], "message": job["message"]}
    chunks = cp.result(job["id"], who)
    if chunks is None:
        out["note"] = "the job left no result"
        return out
    buf = bytearray()
    with contextlib.closing(chunks):  # the stage file is closed however the read ends
        for chunk in chunks:
            buf += chunk
            if len(buf) > RESULT_READ_CAP:
                out["note"] = (f"the result is larger than {RESULT_READ_CAP >> 20} MiB, too large to open here; "
                               f"`mljobs result {job['id']}` fetches it")
                return out
    try:
        env = summarize_envelope(bytes(buf))
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        out["note"] = f"the result envelope cannot be read here ({e}); `mljobs result {job['id']}` tries the client"
        return out
    if env.get("ok"):
        out["repr"] = env.get("repr")
        if out["repr"] is None:
            out["note"] = f"this job's launcher kept no repr of the result; `mljobs result {job['id']}` shows it"
    else:
        out.update(exc_type=str(env.get("exc_type", "")), exc_message=str(env.get("exc_message", "")),
                   traceback=str(env.get("traceback", ""))[-20_000:])
    return out


def _ray(cp: ControlPlane, job: dict[str, Any], who: Principal) -> dict[str, Any] | None:
    """A running multi-node (Ray) job's dashboard address; None for other jobs."""
    if job["target_instances"] < 2 or job["parallel"] or job["status"] != JOB_STATUS.RUNNING.value:
        return None
    return cp.ray_info(job["id"], who)


def _durations(j: dict[str, Any], now: dt.datetime) -> tuple[str, str]:
    """How long the job queued (until it started, or until now) and ran (until it ended, or now)."""
    created, started, ended = (None if t is None else t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
                               for t in (j["created_time"], j["started_time"], j["completed_time"]))
    if started is None:  # still queued, or ended (cancelled) before it started
        return format_duration(((ended or now) - created).total_seconds()), ""
    return (format_duration((started - created).total_seconds()),
            format_duration(((ended or now) - started).total_seconds()))


def pool_use_series(intervals: list[tuple[str, dt.datetime, dt.datetime | None]], since: dt.datetime,
                    now: dt.datetime) -> dict[str, Any]:
    """A pool's running instances over ``[since, now]``, in all and per user, from its instances'
    (owner, started, ended) times: a step series with a point at each start and end, and at both
    ends of the window."""
    events: list[tuple[float, int, str]] = []
    for owner, started, ended in intervals:
        if ended is not None and ended < since:
            continue
        events.append((max(started, since).timestamp(), 1, owner))
        if ended is not None and ended <= now:
            events.append((ended.timestamp(), -1, owner))
    users = sorted({owner for _, _, owner in events})
    counts = dict.fromkeys(users, 0)
    times, series = [since.timestamp()], {"all": [0], **{u: [0] for u in users}}
    for t, step, owner in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at one time
        counts[owner] += step
        if times[-1] == t:  # one point a time: the count after everything that happened then
            for u in users:
                series[u][-1] = counts[u]
            series["all"][-1] = sum(counts.values())
            continue
        times.append(t)
        for u in users:
            series[u].append(counts[u])
        series["all"].append(sum(counts.values()))
    times.append(now.timestamp())
    for values in series.values():
        values.append(values[-1])
    return {"times": times, "series": series}


def _summary_row(j: dict[str, Any], now: dt.datetime | None = None) -> dict[str, Any]:
    queued, ran = _durations(j, now or dt.datetime.now(dt.timezone.utc))
    return {"id": j["id"], "name": j["name"], "status": j["status"], "message": j["message"][:300],
            "owner": j["owner"], "compute_pool": j["compute_pool"], "target_instances": j["target_instances"],
            "created_time": _when(j["created_time"]), "completed_time": _when(j["completed_time"]),
            "queued": queued, "ran": ran}


def register(app: FastAPI, cp: ControlPlane, api_caller: Callable[..., Principal]) -> None:
    """Add the dashboard's pages, its JSON for polling, its login and its static files to ``app``;
    ``api_caller`` is the API's own dependency that names a bearer token's principal."""
    templates = Jinja2Templates(directory=str(_HERE / "templates"))
    templates.env.filters["when"] = _when
    templates.env.filters["size"] = format_bytes
    app.mount("/dashboard/static", StaticFiles(directory=str(_HERE / "static")), name="dashboard-static")
    codes = LoginCodes()
    keys: dict[str, bytes] = {}

    def csrf_token(token: str | None) -> str:
        if "csrf" not in keys:
            keys["csrf"] = cp.store.secret("dashboard_csrf_key").encode()
        return hmac.new(keys["csrf"], b"csrf|" + (token or "").encode(), hashlib.sha256).hexdigest()

    def caller(request: Request) -> Principal | None:
        try:
            return cp.auth.authenticate(request.cookies.get(COOKIE) or None, request.headers.get("host"))
        except errors.AuthenticationError:
            return None

    def page(request: Request, name: str, who: Principal | None, status_code: int = 200,
             **context: Any) -> HTMLResponse:
        token = request.cookies.get(COOKIE)
        return templates.TemplateResponse(request, name, {
            "who": who, "csrf": csrf_token(token) if who else "", "logged_in": bool(token), **context},
            status_code=status_code, headers=PAGE_HEADERS)

    def login_page(request: Request, error: str = "", status_code: int = 401) -> HTMLResponse:
        resp = page(request, "login.html", None, status_code, error=error, next=_next_path(request))
        if request.cookies.get(COOKIE) and caller(request) is None:
            resp.delete_cookie(COOKIE, path="/")  # a token that no longer works
        return resp

    def not_found(request: Request, who: Principal | None, message: str) -> HTMLResponse:
        return page(request, "notfound.html", who, 404, message=message)

    def same_origin(request: Request) -> bool:
        """A form post from a page of this server (browsers send Origin on POST; Sec-Fetch-Site too)."""
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin is not None and origin != own:
            return False
        return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")

    # -- pages --------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def jobs_page(request: Request, status: Annotated[list[str] | None, Query()] = None,
                  pool: str | None = None, owner: str | None = None, schedule: str | None = None) -> HTMLResponse:
        who = caller(request)
        if who is None:
            return login_page(request)
        filters = {"status": [s for s in status or [] if s], "pool": pool or "", "owner": owner or "",
                   "schedule": schedule or ""}
        error, rows = "", []
        bad = [s for s in filters["status"] if s not in _STATUSES]
        if bad:
            error = f"unknown status {bad[0]!r}: choose one of {', '.join(_STATUSES)}"
        else:
            try:
                rows = cp.list_jobs(_LIST_LIMIT, None, None, who, statuses=filters["status"] or None,
                                    pool=filters["pool"] or None, owner=filters["owner"] or None,
                                    schedule=filters["schedule"] or None)
            except errors.InvalidArgumentError as e:
                error = str(e)
        return page(request, "jobs.html", who, 400 if error else 200, jobs=[_summary_row(j) for j in rows],
                    filters=filters, statuses=_STATUSES, pools=[p["name"] for p in cp.list_pools()],
                    error=error, limit=_LIST_LIMIT, query=urlencode(
                        [("status", s) for s in filters["status"]]
                        + [(k, filters[k]) for k in ("pool", "owner", "schedule") if filters[k]]))

    @app.get("/dashboard/jobs.json", include_in_schema=False)
    def jobs_json(request: Request, status: Annotated[list[str] | None, Query()] = None,
                  pool: str | None = None, owner: str | None = None, schedule: str | None = None) -> Response:
        who = caller(request)
        if who is None:
            return JSONResponse({"error": "AuthenticationError", "detail": "log in first"}, 401)
        statuses = [s for s in status or [] if s]
        bad = [s for s in statuses if s not in _STATUSES]
        if bad:
            return JSONResponse({"error": "InvalidArgumentError",
                                 "detail": f"unknown status {bad[0]!r}: choose one of {', '.join(_STATUSES)}"}, 400)
        try:
            rows = cp.list_jobs(_LIST_LIMIT, None, None, who, statuses=statuses or None, pool=pool or None,
                                owner=owner or None, schedule=schedule or None)
        except errors.InvalidArgumentError as e:
            return JSONResponse({"error": "InvalidArgumentError", "detail": str(e)}, 400)
        return JSONResponse({"jobs": [_summary_row(j) for j in rows]}, headers={"Cache-Control": "no-store"})

    def job_context(ref: str, who: Principal) -> dict[str, Any]:
        job = cp.resolve(ref, who)
        view = cp.job_view(job)
        spec = job.spec or {}
        return {
            "job": view, "timeline": _timeline(view, cp.store.job_events(job.id)),
            "outcome": _outcome(cp, view, who), "ray": _ray(cp, view, who),
            "spec": {"payload_kind": spec.get("payload_kind"), "entrypoint": spec.get("entrypoint") or [],
                     "args": spec.get("args") or [], "pip_requirements": spec.get("pip_requirements") or [],
                     "env_var_names": sorted(spec.get("env_vars") or {}),  # names only: values may be secrets
                     "external_access_integrations": spec.get("external_access_integrations") or [],
                     "runtime_python": spec.get("runtime_python") or "",
                     "retry_on_failure": bool(spec.get("retry_on_failure"))},
            "cancelable": view["status"] in CANCELABLE_VALUES, "terminal": view["status"] in TERMINAL_VALUES,
        }

    @app.get("/jobs/{ref}", response_class=HTMLResponse, include_in_schema=False)
    def job_page(request: Request, ref: str) -> HTMLResponse:
        who = caller(request)
        if who is None:
            return login_page(request)
        try:
            ctx = job_context(ref, who)
        except errors.NotFoundError as e:
            return not_found(request, who, str(e))
        return page(request, "job.html", who, **ctx)

    @app.get("/jobs/{ref}/live", include_in_schema=False)
    def job_live(request: Request, ref: str) -> Response:
        """The job page's changing parts (status, timeline, outcome, Ray link), for polling."""
        who = caller(request)
        if who is None:
            return JSONResponse({"error": "AuthenticationError", "detail": "log in first"}, 401)
        try:
            ctx = job_context(ref, who)
        except errors.NotFoundError as e:
            return JSONResponse({"error": "NotFoundError", "detail": str(e)}, 404)
        part = templates.get_template("job_live.html").render({"request": request, "csrf": csrf_token(
            request.cookies.get(COOKIE)), **ctx})
        return JSONResponse({"status": ctx["job"]["status"], "terminal": ctx["terminal"], "html": part},
                            headers={"Cache-Control": "no-store"})

    @app.post("/jobs/{ref}/cancel", include_in_schema=False)
    def cancel(request: Request, ref: str, csrf: Annotated[str, Form()] = "") -> Response:
        who = caller(request)
        if who is None:
            return login_page(request)
        if not same_origin(request) or not hmac.compare_digest(csrf, csrf_token(request.cookies.get(COOKIE))):
            return page(request, "notfound.html", who, 403, title="Refused",
                        message="this cancel did not come from this dashboard's own page (missing or wrong CSRF "
                                "token); open the job's page and press Cancel there")
        try:
            job = cp.cancel(ref, who)
        except errors.NotFoundError as e:
            return not_found(request, who, str(e))
        return RedirectResponse(f"/jobs/{job['id']}", status_code=303)

    @app.get("/pools", response_class=HTMLResponse, include_in_schema=False)
    def pools_page(request: Request) -> HTMLResponse:
        who = caller(request)
        if who is None:
            return login_page(request)
        return page(request, "pools.html", who, pools=[cp.describe_pool(p["name"]) for p in cp.store.list_pools()])

    @app.get("/dashboard/pools/{name}/use.json", include_in_schema=False)
    def pool_use_json(request: Request, name: str, minutes: int = 60) -> Response:
        """The pool's running instances over the last ``minutes`` (at most a week), in all and per user."""
        who = caller(request)
        if who is None:
            return JSONResponse({"error": "AuthenticationError", "detail": "log in first"}, 401)
        try:
            pool = cp.store.get_pool(name)
        except errors.NotFoundError as e:
            return JSONResponse({"error": "NotFoundError", "detail": str(e)}, 404)
        now = dt.datetime.now(dt.timezone.utc)
        since = now - dt.timedelta(minutes=max(1, min(minutes, 7 * 24 * 60)))
        return JSONResponse({"pool": pool["name"], "max_nodes": pool["max_nodes"],
                             **pool_use_series(cp.store.pool_use(pool["name"], since), since, now)},
                            headers={"Cache-Control": "no-store"})

    @app.get("/schedules", response_class=HTMLResponse, include_in_schema=False)
    def schedules_page(request: Request) -> HTMLResponse:
        who = caller(request)
        if who is None:
            return login_page(request)
        return page(request, "schedules.html", who, schedules=cp.schedules.list(who),
                    definitions=cp.definitions.list(who))

    @app.get("/environments", response_class=HTMLResponse, include_in_schema=False)
    def envs_page(request: Request) -> HTMLResponse:
        who = caller(request)
        if who is None:
            return login_page(request)
        return page(request, "environments.html", who, envs=cp.list_envs())

    # -- login --------------------------------------------------------------------------------
    def logged_in(request: Request, token: str | None) -> RedirectResponse:
        resp = RedirectResponse(_next_path(request), status_code=303)
        if token:
            resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return resp

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request, code: str | None = None) -> Response:
        if code is None:
            return login_page(request, status_code=200)
        valid, token = codes.redeem(code)
        if not valid:
            return login_page(request, "this login link was used already or has expired (a link works once, for "
                                       f"{LOGIN_CODE_TTL_S:.0f} s): run `mljobs ui` again, or paste your token",
                              status_code=400)
        return logged_in(request, token)

    @app.post("/login", response_class=HTMLResponse, include_in_schema=False)
    def login(request: Request, token: Annotated[str, Form()] = "") -> Response:
        if not same_origin(request):
            return login_page(request, "this login did not come from this server's own login page", 403)
        token = token.strip()
        if not token:
            return login_page(request, "paste your token (the one `mljobs user create NAME` printed)", 400)
        try:
            cp.auth.authenticate(token)
        except errors.AuthenticationError as e:
            return login_page(request, f"that token is refused: {e}")
        return logged_in(request, token)

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    @app.post("/api/v1/login-codes", include_in_schema=True, tags=["dashboard"])
    def login_code(request: Request, who: Principal = Depends(api_caller)) -> dict[str, Any]:
        """A one-time code that logs a browser into the dashboard as the caller: open
        ``/login?code=...`` within ``expires_s`` seconds (what ``mljobs ui`` does)."""
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        code = codes.issue(token)
        return {"code": code, "path": "/login?" + urlencode({"code": code}), "expires_s": codes.ttl_s,
                "name": who.name}

    @app.exception_handler(StarletteHTTPException)
    async def _html_404(request: Request, exc: StarletteHTTPException) -> Response:
        """A page that does not exist, asked for by a browser: the 404 page (the API keeps JSON)."""
        if (exc.status_code == 404 and not request.url.path.startswith("/api/")
                and "text/html" in request.headers.get("accept", "")):
            return templates.TemplateResponse(request, "notfound.html", {
                "who": None, "csrf": "", "logged_in": bool(request.cookies.get(COOKIE)),
                "message": f"there is no page at {request.url.path}"}, status_code=404)
        return await http_exception_handler(request, exc)


def _next_path(request: Request) -> str:
    """Where to go after logging in: this page, or ``next`` if it is a path of this server."""
    target = request.query_params.get("next") or (request.url.path if request.url.path != "/login" else "/")
    return target if target.startswith("/") and not target.startswith("//") else "/"
