"""The ``mljobs`` command (also ``python -m mljobs``)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from mljobs import errors
from mljobs import cli_output as out
from mljobs.cli_schedules import definition_app, quota_app, schedule_app
from mljobs.config import load_settings
from mljobs.paths import HomePaths
from mljobs.status import JOB_STATUS

app = typer.Typer(help="Run machine-learning jobs on compute pools.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
server_app = typer.Typer(help="The control plane.", no_args_is_help=True)
pool_app = typer.Typer(help="Compute pools.", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs.", no_args_is_help=True)
stage_app = typer.Typer(help="Stage files (@stage/path).", no_args_is_help=True)
app.add_typer(server_app, name="server")
app.add_typer(pool_app, name="pool")
app.add_typer(jobs_app, name="jobs")
app.add_typer(stage_app, name="stage")
env_app = typer.Typer(help="The server's cache of job environments (pip requirements).", no_args_is_help=True)
integration_app = typer.Typer(help="External access integrations (named egress policies).", no_args_is_help=True)
app.add_typer(env_app, name="env")
user_app = typer.Typer(help="Users and their tokens (admins only, or the server's own machine).", no_args_is_help=True)
app.add_typer(user_app, name="user")
user_app.add_typer(quota_app, name="quota")
app.add_typer(integration_app, name="integration")
app.add_typer(schedule_app, name="schedule")
app.add_typer(definition_app, name="definition")
console = out.make_console()  # as wide as COLUMNS or the terminal; no wrapping when piped
err = out.make_console(stderr=True)
JSON_HELP = "print JSON for scripts (fixed keys, ISO 8601 UTC times)"


def _session() -> Any:
    from mljobs.client.session import get_active_session

    return get_active_session()


def _table(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    """A plain table of ``columns`` (times shown as "3 min ago")."""
    cols = [out.Column(c, (lambda k: lambda r: out.format_ago(r.get(k)))(c)) if c.endswith("_time")
            else out.Column.key(c) for c in columns]
    out.print_table(console, rows, cols, title)


def _listing(rows: list[dict[str, Any]], columns: list[str], title: str, as_json: bool) -> None:
    """A listing: a table, or with --json the records with exactly ``columns`` as keys."""
    if as_json:
        out.print_json(out.json_records(rows, columns))
    else:
        _table(rows, columns, title)


# -- server -----------------------------------------------------------------------------------
@server_app.command("start")
def server_start(host: str = typer.Option("127.0.0.1", help="address to bind"),
                 port: int = typer.Option(0, help="port (0: the previous one if free, else any)"),
                 no_isolation: bool = typer.Option(False, "--no-isolation",
                                                   help="run jobs unsandboxed, with the server's identity and view "
                                                        "(MLJOBS_ISOLATION=none; docs/isolation.md)")) -> None:
    """Run the control plane in the foreground (the SDK starts one in the background by itself)."""
    import dataclasses

    from mljobs.server.run import serve

    settings = load_settings()
    serve(dataclasses.replace(settings, isolation="none") if no_isolation else settings, host, port)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the server and every job it runs."""
    from mljobs.client.embedded import find_server
    from mljobs.server.run import read_server_info

    settings = load_settings()
    home = HomePaths(settings.home)
    url = settings.url or find_server(home)
    if not url:
        console.print(f"no mljobs server runs for {home.root}")
        return
    import httpx

    from mljobs.client.session import Session

    headers = {"authorization": f"Bearer {settings.token}"} if settings.token else {}
    try:
        resp = httpx.post(url + "/api/v1/server/shutdown", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise errors.ServerUnavailableError(f"no mljobs server answers at {url} ({e}); nothing was stopped") from None
    if resp.status_code in (401, 403):
        why = Session._error(resp)
        raise type(why)(f"the server at {url} was not stopped: {why}. Stopping it needs an admin's token: "
                        "MLJOBS_TOKEN=<admin token> mljobs server stop")
    if resp.status_code >= 400:
        raise Session._error(resp)
    # said only once seen: the local server's process gone, or a remote one no longer answering
    pid = (read_server_info(home) or {}).get("pid") if not settings.url else None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if pid:
            import psutil

            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break  # it has exited; its parent has not collected it yet
            except psutil.NoSuchProcess:
                break
        else:
            try:
                httpx.get(url + "/health", timeout=2)
            except httpx.HTTPError:
                break
        time.sleep(0.05)
    else:
        raise errors.MLJobsError(f"the server at {url} accepted the shutdown but still runs after 60 s"
                                 + (f" (pid {pid})" if pid else "") + "; its log says why")
    console.print(f"stopped the mljobs server at {url}")


@server_app.command("status")
def server_status() -> None:
    """Say whether a server answers, and where, and how it contains (``containment``) and
    sandboxes (``isolation``) jobs."""
    from mljobs.client.embedded import find_server

    settings = load_settings()
    url = settings.url or find_server(HomePaths(settings.home))
    if not url:
        console.print(f"no mljobs server runs for {settings.home}")
        raise typer.Exit(1)
    import httpx

    try:
        resp = httpx.get(url + "/health", timeout=5)
    except httpx.HTTPError as e:
        console.print(f"no mljobs server answers at {url}: {e}")
        raise typer.Exit(1) from None
    if resp.status_code != 200:
        console.print(f"the server at {url} answered {resp.status_code}: {resp.text[:300]}")
        raise typer.Exit(1)
    info = resp.json()
    console.print_json(json.dumps({"url": url, **info}))
    warning = (info.get("isolation") or {}).get("warning")
    if warning:  # to stderr: the JSON on stdout stays parseable
        typer.echo(f"warning: {warning}", err=True)


# -- pools ------------------------------------------------------------------------------------
def _pools(rows: list[dict[str, Any]], title: str, as_json: bool = False) -> None:
    if as_json:
        out.print_json(out.json_records(rows, out.POOL_KEYS))
    else:
        out.print_table(console, rows, out.POOL_COLUMNS, title)


@pool_app.command("create")
def pool_create(name: str, family: str = typer.Option(..., "--family", help="instance family, e.g. CPU_X64_S"),
                min_nodes: int = 1, max_nodes: int = 1, provider: str = "local",
                option: list[str] = typer.Option([], "--option", "-o",
                                                 help="a provider option KEY=VALUE, e.g. partition=debug "
                                                      "(a JSON value is parsed: -o 'sbatch_args=[\"--exclusive\"]')"),
                if_not_exists: bool = False,
                scheduling: Optional[str] = typer.Option(None, help="fair or fifo (default: fair once there are users)"),
                preemption: bool = typer.Option(False, help="a higher-priority job may take lower ones' instances"),
                max_priority: int = typer.Option(0, help="the highest priority a non-admin may ask for")) -> None:
    from mljobs.client.pools import create_compute_pool

    options: dict[str, Any] = {}
    for item in option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--option {item!r}: write KEY=VALUE, e.g. partition=debug")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    p = create_compute_pool(name, instance_family=family, min_nodes=min_nodes, max_nodes=max_nodes,
                            provider=provider, provider_options=options, if_not_exists=if_not_exists,
                            scheduling=scheduling, preemption=preemption, max_priority=max_priority)
    _pools([p], "compute pool")


@pool_app.command("list")
def pool_list(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    _pools(_session().request("GET", "/pools").json(), "compute pools", as_json)


@pool_app.command("describe")
def pool_describe(name: str) -> None:
    """The pool as JSON, then who holds it now (each user's running instances, queued jobs, share)."""
    from mljobs.client.pools import describe_compute_pool

    pool = describe_compute_pool(name)
    console.print_json(json.dumps(pool, default=str))
    if pool.get("users"):
        out.print_table(console, pool["users"], [
            out.Column.key("user"), out.Column.key("running_instances", "running"),
            out.Column.key("queued_jobs", "queued"), out.Column("share", lambda r: f"{100 * r['share']:.0f}%"),
            out.Column.key("max_instances", "max instances")], f"users of {pool['name']} ({pool['scheduling']})")


@pool_app.command("suspend")
def pool_suspend(name: str) -> None:
    from mljobs.client.pools import alter_compute_pool

    _pools([alter_compute_pool(name, suspend=True)], "compute pool")


@pool_app.command("resume")
def pool_resume(name: str) -> None:
    from mljobs.client.pools import alter_compute_pool

    _pools([alter_compute_pool(name, resume=True)], "compute pool")


@pool_app.command("drop")
def pool_drop(name: str) -> None:
    from mljobs.client.pools import drop_compute_pool

    drop_compute_pool(name)
    console.print(f"dropped compute pool {name.upper()}")


# -- jobs -------------------------------------------------------------------------------------
def _exit_code(status: JOB_STATUS) -> int:
    return {JOB_STATUS.DONE: 0, JOB_STATUS.FAILED: 1}.get(status, 2)


@app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(ctx: typer.Context, path: Path, pool: str = typer.Option("DEFAULT_POOL", "--pool", "-p"),
           stage: str = typer.Option("payload_stage", "--stage", "-s"),
           entrypoint: Optional[str] = typer.Option(None, "--entrypoint", "-e",
                                                    help="script inside DIR (or a command, quoted)"),
           name: Optional[str] = None, env: list[str] = typer.Option([], "--env", help="KEY=VALUE, repeatable"),
           pip: list[str] = typer.Option([], "--pip", help="a pip requirement, repeatable"),
           integration: list[str] = typer.Option([], "--integration", help="external access integration, repeatable"),
           runtime: Optional[str] = typer.Option(None, "--runtime", help="interpreter: server, 3.12 or a path"),
           instances: int = typer.Option(1, "--instances", "-n", help="target_instances: nodes of a Ray cluster"),
           min_instances: Optional[int] = typer.Option(None, "--min-instances", help="start with at least this many"),
           parallel: bool = typer.Option(False, "--parallel", help="run the entrypoint on every instance (ranks in env)"),
           join_timeout: float = typer.Option(720.0, "--join-timeout", help="seconds the head waits for min instances"),
           priority: int = typer.Option(0, "--priority", help="higher starts first (above the pool's max_priority: "
                                                              "admins only)"),
           max_retries: int = typer.Option(0, "--max-retries", help="run again when an instance is lost"),
           wait: bool = typer.Option(False, "--wait", help="stream the logs with a progress line, print the result, "
                                                           "exit with the job's status"),
           progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                                   help="with --wait: the progress line (default: on a terminal only; "
                                                        "--progress prints plain lines on stderr elsewhere)"),
           as_json: bool = typer.Option(False, "--json", help="print the job (with --wait: the result) as JSON; "
                                                              "logs go to stderr")) -> None:
    """Submit FILE or DIR; arguments after `--` reach the script's sys.argv. Prints the job id."""
    from mljobs.client.jobs import submit_directory, submit_file

    bad = [e for e in env if "=" not in e]
    if bad:
        raise errors.InvalidArgumentError(f"--env takes KEY=VALUE, got {bad}")
    opts: dict[str, Any] = dict(env_vars=dict(e.split("=", 1) for e in env), name=name, pip_requirements=pip,
                                external_access_integrations=integration, runtime_environment=runtime,
                                target_instances=instances, min_instances=min_instances, parallel=parallel,
                                join_timeout_s=join_timeout, priority=priority, max_retries=max_retries)
    args = list(ctx.args)
    if path.is_dir():
        if not entrypoint:
            raise errors.InvalidArgumentError(f"{path} is a directory: give --entrypoint SCRIPT")
        ep: Any = entrypoint.split() if " " in entrypoint else entrypoint
        job = submit_directory(path, pool, entrypoint=ep, stage_name=stage, args=args, **opts)
    else:
        job = submit_file(path, pool, stage_name=stage, args=args, **opts)
    if not wait:
        if as_json:
            out.print_json(_job_record(job._refresh()))
        else:
            print(job.id, flush=True)
        return
    _wait_and_report(job, progress, as_json)


def _wait_and_report(job: Any, progress: bool | None, as_json: bool) -> None:
    """``submit --wait``: the logs as they come (with the progress line), then how the job ended
    (on stderr), then its result on stdout; exits 0 DONE, 1 FAILED, 2 otherwise."""
    from mljobs.client import progress as live

    if as_json:  # stdout is for the JSON alone
        for line in job.stream_logs():
            print(line, file=sys.stderr, flush=True)
    else:
        print(job.id, flush=True)
        job.show_logs(follow=True, progress=progress)
    info = job._refresh()
    final = JOB_STATUS(info["status"])
    plain_lines = progress is True and not (live.in_notebook() or out.is_terminal(sys.stderr))
    if not plain_lines:  # else the progress lines ended with this already
        err.print(live.describe(info), markup=False, highlight=False)
    if final in (JOB_STATUS.DONE, JOB_STATUS.FAILED):
        if as_json:
            try:
                value, exc = job.result(0, progress=False), None
            except errors.JobFailedError as e:
                value, exc = None, e
            except errors.MLJobsError:
                raise
            except Exception as e:  # the job's own exception
                value, exc = None, e
            out.print_json({**_result_record(job, final, value, exc), "job": _job_record(info)})
            raise typer.Exit(_exit_code(final))
        _print_result(job, 0, as_json=False, label="result: ")
        raise typer.Exit(_exit_code(final))
    if as_json:
        out.print_json({**_result_record(job, final, exc=errors.JobFailedError(info["message"] or final.value)),
                        "job": _job_record(info)})
    raise typer.Exit(_exit_code(final))


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` or plain seconds."""
    t = text.strip().lower()
    try:
        return float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
    except ValueError:
        raise errors.InvalidArgumentError(f"--older-than {text!r}: give a duration like 7d, 12h, 30m or 90s") from None


@jobs_app.command("prune")
def jobs_prune(older_than: str = typer.Option(..., "--older-than", help="e.g. 7d, 12h, 30m"),
               status_: list[str] = typer.Option([], "--status", help="only jobs that ended so, repeatable")) -> None:
    """Delete finished jobs (yours; an admin's: everyone's) that ended longer ago than --older-than,
    with their logs and stage files."""
    body = {"older_than_s": _duration(older_than), "statuses": [s.upper() for s in status_] or None}
    deleted = _session().request("POST", "/jobs/prune", json=body).json()["deleted"]
    console.print(f"deleted {len(deleted)} job(s)")


@jobs_app.command("list")
def jobs_list(limit: int = typer.Option(10, help="<= 0: all"),
              as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """The latest jobs, newest first."""
    rows = _session().request("GET", "/jobs", params={"limit": limit}).json()
    if as_json:
        out.print_json(out.json_records(rows, out.JOB_KEYS))
    else:
        out.print_table(console, rows, out.JOB_COLUMNS, "jobs")


@app.command("logs")
def logs(job: str, follow: bool = typer.Option(False, "--follow", "-f"), instance: int = 0,
         limit: int = -1, verbose: bool = False) -> None:
    """Print a job's log (the head's by default)."""
    from mljobs.client.jobs import get_job

    j = get_job(job)
    j.show_logs(limit, instance, verbose=verbose, follow=follow)


def _job_record(info: dict[str, Any]) -> dict[str, Any]:
    return out.json_records([info], out.JOB_DETAIL_KEYS, {"instances": out.INSTANCE_KEYS})[0]


def _times(info: dict[str, Any]) -> str:
    """``created 3 min ago, queued 0.4s, ran 1m 12s`` (``ran 12s so far`` while it runs)."""
    parts = [f"created {out.format_ago(info.get('created_time'))}"]
    created, started = out.parse_time(info.get("created_time")), out.parse_time(info.get("started_time"))
    if created is not None and started is not None:
        parts.append(f"queued {out.format_duration(started - created)}")
    ran = out.job_duration(info)
    if ran is not None:
        parts.append(f"ran {out.format_duration(ran)}" + ("" if info.get("completed_time") else " so far"))
    if info.get("completed_time"):
        parts.append(f"ended {out.format_ago(info['completed_time'])}")
    return ", ".join(parts)


@app.command("status")
def status(job: str, as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """A job's status and message, its times and resources (and each instance's when it has several)."""
    from mljobs.client.jobs import get_job

    info = get_job(job)._refresh()
    if as_json:
        out.print_json(_job_record(info))
        return
    def say(text: str) -> None:  # not markup: messages hold brackets
        console.print(text, markup=False, highlight=False)

    say(f"{info['id']} {info['status']}" + (f": {info['message']}" if info["message"] else ""))
    say(f"  {_times(info)}")
    if info.get("peak_rss_bytes") is not None:
        say(f"  peak memory {out.format_bytes(info['peak_rss_bytes'])}, "
            f"CPU time {out.format_duration(info['cpu_seconds'] or 0)}")
    if info["target_instances"] > 1:
        for inst in info["instances"]:
            say(f"  instance {inst['instance_id']}: {inst['status']}"
                + (f" (exit code {inst['exit_code']})" if inst["exit_code"] is not None else ""))


def _result_record(job: Any, status_: JOB_STATUS, value: Any = None,
                   exc: BaseException | None = None) -> dict[str, Any]:
    """What ``result --json`` prints: the value when JSON can hold it, its repr always."""
    record: dict[str, Any] = {"id": job.id, "status": status_.value, "ok": exc is None, "result": None,
                              "result_repr": None, "error": None}
    if exc is None:
        try:
            record["result"] = json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError):  # not JSON: the repr says what it is
            record["result"] = None
        record["result_repr"] = repr(value)
    else:
        record["error"] = {"type": type(exc).__name__, "message": str(exc),
                           "traceback": str(exc.__cause__) if exc.__cause__ is not None else None}
    return record


def _print_result(job: Any, timeout: float, as_json: bool, progress: bool | None = False, label: str = "") -> None:
    """Wait for ``job``, print its result (or what it raised: exit 1); --json prints the record."""
    try:
        value = job.result(timeout, progress=progress)
    except errors.JobFailedError as e:  # it failed without an exception of its own (killed, exit code)
        _failed(job, e, as_json)
    except errors.MLJobsError:
        raise
    except Exception as e:  # the job's own exception
        _failed(job, e, as_json)
    else:
        if as_json:
            out.print_json(_result_record(job, job.status, value))
        else:
            console.print(label + repr(value), markup=False, highlight=False)


def _failed(job: Any, e: BaseException, as_json: bool) -> None:
    """Say how the job failed (its exception with the remote traceback) and exit 1."""
    if as_json:
        out.print_json(_result_record(job, job.status, exc=e))
    elif isinstance(e, errors.JobFailedError):
        err.print(f"error: {e}", markup=False, highlight=False)
    else:
        err.print(f"the job raised {type(e).__name__}: {e}", markup=False, highlight=False)
        if e.__cause__ is not None:
            err.print(str(e.__cause__), markup=False, highlight=False)
    raise typer.Exit(1) from None


@app.command("result")
def result(job: str, timeout: float = -1, as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Wait for the job and print its result (repr); exits 1 when it raised."""
    from mljobs.client.jobs import get_job

    _print_result(get_job(job), timeout, as_json)


@app.command("cancel")
def cancel(job: str) -> None:
    from mljobs.client.jobs import get_job

    j = get_job(job)
    j.cancel()
    console.print(f"{j.id} {j.status.value}")


@app.command("delete")
def delete(job: str) -> None:
    from mljobs.client.jobs import delete_job

    delete_job(job)
    console.print(f"deleted {job}")


# -- users ------------------------------------------------------------------------------------
def _live_server(settings: Any) -> str | None:
    from mljobs.client.embedded import find_server

    return settings.url or find_server(HomePaths(settings.home))


@user_app.command("create")
def user_create(name: str, admin: bool = typer.Option(False, "--admin", help="may manage users, pools and egress")) -> None:
    """Make a user and print their token (shown this once). Through the running server when one
    answers (you must be an admin); else straight into this MLJOBS_HOME's (or MLJOBS_DATABASE_URL's)
    store, which is how the first admin of a shared server is made."""
    settings = load_settings()
    if _live_server(settings):
        made = _session().request("POST", "/users", json={"name": name, "admin": admin}).json()
    else:
        from mljobs.server.auth import make_user
        from mljobs.server.store import Store

        home = HomePaths(settings.home)
        store = Store(settings.database_url) if settings.database_url else Store.sqlite(home.database)
        try:
            store.migrate()
            made = make_user(store, name, admin)
        finally:
            store.close()
    err.print(f"user {made['name']}{' (admin)' if made['admin'] else ''} created; their token (shown once, "
              "set it as MLJOBS_TOKEN):")
    print(made["token"])


@user_app.command("list")
def user_list(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    _listing(_session().request("GET", "/users").json(), ["name", "admin", "created_time"], "users", as_json)


@user_app.command("delete")
def user_delete(name: str) -> None:
    """Delete a user: their token stops working at once (their jobs stay)."""
    _session().request("DELETE", f"/users/{name}")
    console.print(f"deleted user {name}")


@app.command("whoami")
def whoami() -> None:
    """Who the server takes you for."""
    me = _session().request("GET", "/whoami").json()
    console.print(f"{me['name']}" + (" (admin)" if me["admin"] else "") + (f" as job {me['job_id']}" if me["job_id"] else ""))


@app.command("ui")
def ui(no_browser: bool = typer.Option(False, "--no-browser", help="print the URL instead of opening it")) -> None:
    """Open the web dashboard, logged in: with a token, through a one-time link that works for 60 s
    (the token itself never enters the URL or the browser's history)."""
    import webbrowser

    s = _session()
    url = s.url + "/"
    if s.token:
        url = s.url + s.request("POST", "/login-codes").json()["path"]
    if no_browser or not webbrowser.open(url):
        print(url)


# -- stages -----------------------------------------------------------------------------------
@stage_app.command("put")
def stage_put(local_path: Path, stage_path: str) -> None:
    for f in _session().file.put(local_path, stage_path):
        console.print(f"{f['name']}  {f['size']} bytes")


@stage_app.command("get")
def stage_get(stage_path: str, local_dir: Path) -> None:
    for f in _session().file.get(stage_path, local_dir):
        console.print(f)


@stage_app.command("ls")
def stage_ls(stage_path: str, as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    _listing(_session().file.list(stage_path), ["name", "size"], stage_path, as_json)


@stage_app.command("create")
def stage_create(name: str, url: Optional[str] = typer.Option(None, help="fsspec URL, e.g. s3://bucket/prefix")) -> None:
    from mljobs.client.pools import create_stage

    console.print_json(json.dumps(create_stage(name, url), default=str))


# -- integrations and environments ------------------------------------------------------------
@integration_app.command("create")
def integration_create(name: str, host: list[str] = typer.Option(..., "--host", help="allowed host, repeatable"),
                       replace: bool = False) -> None:
    from mljobs.client.pools import create_external_access_integration

    i = create_external_access_integration(name, host, replace=replace)
    _table([i], ["name", "allowed_hosts", "created_time"], "external access integration")


@integration_app.command("list")
def integration_list(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    _listing(_session().request("GET", "/integrations").json(), ["name", "allowed_hosts", "created_time"],
             "external access integrations", as_json)


@integration_app.command("drop")
def integration_drop(name: str) -> None:
    from mljobs.client.pools import drop_external_access_integration

    drop_external_access_integration(name)
    console.print(f"dropped external access integration {name.upper()}")


def _env_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "requirements": " ".join(r["requirements"]) or "-", "size": out.format_bytes(r["size_bytes"]),
             "last_used": out.format_ago(r["last_used"])} for r in rows]


ENV_COLUMNS = ["key", "python_version", "requirements", "size", "last_used", "in_use"]
ENV_KEYS = ["key", "python_version", "requirements", "size_bytes", "last_used", "in_use", "path"]


@env_app.command("list")
def env_list(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Cached environments, most recently used first."""
    rows = _session().request("GET", "/environments").json()
    if as_json:
        out.print_json(out.json_records(rows, ENV_KEYS))
    else:
        _table(_env_rows(rows), ENV_COLUMNS, "job environments")


@env_app.command("prune")
def env_prune(all_: bool = typer.Option(False, "--all", help="remove every environment not in use"),
              max_gb: Optional[float] = typer.Option(None, "--max-gb", help="shrink the cache to this size")) -> None:
    """Remove least recently used environments (never one a running job uses), and users' idle uv caches."""
    max_bytes = 0 if all_ else (int(max_gb * 2**30) if max_gb is not None else None)
    rows = _session().request("POST", "/environments/prune", json={"max_bytes": max_bytes}).json()
    _table(_env_rows(rows), ENV_COLUMNS, f"removed {len(rows)} environment(s)")


def main() -> None:
    try:
        app()
    except errors.MLJobsError as e:
        err.print(f"error: {e}", highlight=False, markup=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
