"""``mljobs schedule``, ``mljobs definition`` and ``mljobs user quota``: registered jobs, the clocks
that call them, and how much of a pool each user may hold."""

from __future__ import annotations

from typing import Any, Optional

import typer

from mljobs import cli_output as out

schedule_app = typer.Typer(help="Schedules: a registered job definition called on a clock.", no_args_is_help=True)
definition_app = typer.Typer(help="Job definitions: registered once, called many times.", no_args_is_help=True)
quota_app = typer.Typer(help="Users' quotas on pools (admins set them).", no_args_is_help=True)
console = out.make_console()
JSON_HELP = "print JSON for scripts (fixed keys, ISO 8601 UTC times)"
SCHEDULE_KEYS = ["name", "definition", "cron", "every_s", "timezone", "concurrency", "catchup", "paused", "next_tick",
                 "last_tick", "last_job_id", "last_status", "note", "owner", "created_time"]
SCHEDULE_COLUMNS = [
    out.Column.key("name"), out.Column.key("definition", drop=5),
    out.Column("when", lambda r: r["cron"] if r.get("cron") else f"every {r.get('every_s') or 0:g}s"),
    out.Column("state", lambda r: "PAUSED" if r.get("paused") else ("ENDED" if not r.get("next_tick") else "ACTIVE")),
    out.Column.key("next_tick", "next tick"), out.Column.key("last_status", "last run", drop=3),
    out.Column.key("note", max_width=60, drop=4)]
DEFINITION_KEYS = ["name", "version", "payload_kind", "compute_pool", "stage_name", "entrypoint", "args",
                   "target_instances", "parallel", "max_retries", "owner", "created_time", "updated_time"]


def _session() -> Any:
    from mljobs.client.session import get_active_session

    return get_active_session()


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False)


@schedule_app.command("create")
def schedule_create(name: str, definition: str = typer.Option(..., "--definition", "-d", help="a registered definition"),
                    cron: Optional[str] = typer.Option(None, help="5-field cron, e.g. '0 3 * * *'"),
                    every: Optional[str] = typer.Option(None, help="an interval, e.g. 30s, 15m, 1h"),
                    arg: Optional[list[str]] = typer.Option(None, "--arg", help="a script's argument (repeatable)"),
                    timezone: str = typer.Option("UTC", help="the cron expression's time zone"),
                    concurrency: str = typer.Option("forbid", help="forbid, allow or replace"),
                    catchup: bool = typer.Option(False, help="fire ticks missed while no server ran")) -> None:
    """Call a registered definition on a clock."""
    from mljobs.client.schedules import create_schedule

    s = create_schedule(name, definition, cron=cron, every=every, args=arg, timezone=timezone,
                        concurrency=concurrency, catchup=catchup, session=_session())
    _say(f"schedule {s['name']} made; next tick {s['next_tick']}")


@schedule_app.command("list")
def schedule_list(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Your schedules with their next tick and last run."""
    rows = _session().request("GET", "/schedules").json()
    if as_json:
        out.print_json(out.json_records(rows, SCHEDULE_KEYS))
    else:
        out.print_table(console, rows, SCHEDULE_COLUMNS, "schedules")


def _set(name: str, action: str) -> None:
    s = _session().request("POST", f"/schedules/{name}/{action}").json()
    state = "paused" if s["paused"] else f"active, next tick {s['next_tick']}"
    _say(f"schedule {s['name']}: {state}")


@schedule_app.command("pause")
def schedule_pause(name: str) -> None:
    """Stop firing (runs already made go on)."""
    _set(name, "pause")


@schedule_app.command("resume")
def schedule_resume(name: str) -> None:
    """Fire again from the next tick after now."""
    _set(name, "resume")


@schedule_app.command("drop")
def schedule_drop(name: str) -> None:
    """Remove the schedule (its runs stay)."""
    _session().request("DELETE", f"/schedules/{name}")
    _say(f"schedule {name.upper()} dropped")


@schedule_app.command("runs")
def schedule_runs(name: str, limit: int = typer.Option(20, help="<= 0: all"),
                  history: bool = typer.Option(False, "--history", help="also every tick fired or skipped, and why"),
                  as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """The schedule's runs, newest first (and with --history what happened at each tick)."""
    session = _session()
    session.request("GET", f"/schedules/{name}")  # a clear error for a schedule that does not exist
    rows = session.request("GET", "/jobs", params={"limit": limit, "schedule": name}).json()
    events = session.request("GET", f"/schedules/{name}/events", params={"limit": limit}).json() if history else []
    if as_json:
        out.print_json({"runs": out.json_records(rows, out.JOB_KEYS),
                        "history": out.json_records(events, ["time", "tick", "kind", "job_id", "message"])})
        return
    out.print_table(console, rows, out.JOB_COLUMNS, f"runs of {name.upper()}")
    if history:
        out.print_table(console, events, [out.Column.key("tick"), out.Column.key("kind"), out.Column.key("job_id"),
                                          out.Column.key("message", max_width=80)], "history")


@definition_app.command("list")
def definition_list(as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
                    remote: bool = typer.Option(False, "--remote", help="also @remote's own (_REMOTE_...)")) -> None:
    """Your registered job definitions."""
    rows = _session().request("GET", "/definitions", params={"remote": remote}).json()
    if as_json:
        out.print_json(out.json_records(rows, DEFINITION_KEYS))
    else:
        out.print_table(console, rows, [out.Column.key(k) for k in ("name", "version", "payload_kind", "compute_pool",
                                                                    "entrypoint", "max_retries")], "definitions")


@definition_app.command("call")
def definition_call(name: str, arg: Optional[list[str]] = typer.Option(None, "--arg", help="a script's argument")) -> None:
    """Submit a job from a registered definition (a script's, or a function that needs no arguments)."""
    from mljobs.client.definitions import get_definition

    d = get_definition(name, session=_session())
    job = d(args=list(arg)) if arg else d()
    _say(f"{job.id} {job.status.value}")


@definition_app.command("delete")
def definition_delete(name: str) -> None:
    """Remove a definition and its payload (jobs it made keep theirs)."""
    _session().request("DELETE", f"/definitions/{name}")
    _say(f"definition {name.upper()} deleted")


QUOTA_KEYS = ["owner", "pool", "max_instances", "max_queued", "max_instance_hours"]


@quota_app.command("set")
def quota_set(name: str = typer.Argument(..., help="a user, or '*' for everyone's default"),
              pool: str = typer.Option(..., "--pool", help="a pool, or '*' for every pool"),
              max_instances: Optional[int] = typer.Option(None, "--max-instances", help="running at once"),
              max_queued: Optional[int] = typer.Option(None, "--max-queued", help="queued at once"),
              max_instance_hours: Optional[float] = typer.Option(None, "--max-instance-hours",
                                                                 help="instance-hours over the last 24 h")) -> None:
    """Set a user's limits on a pool (the limits not given are removed)."""
    from mljobs.client.pools import set_user_quota

    q = set_user_quota(name, pool, max_instances=max_instances, max_queued=max_queued,
                       max_instance_hours=max_instance_hours, session=_session())
    limits = ", ".join(f"{k}={q[k]:g}" for k in QUOTA_KEYS[2:] if q[k] is not None) or "no limits"
    _say(f"quota of {q['owner']} on {q['pool']}: {limits}")


@quota_app.command("show")
def quota_show(name: str = typer.Argument("*", help="a user (default: every row)"),
               as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """A user's quotas and everyone's defaults."""
    from mljobs.client.pools import get_user_quota

    rows = get_user_quota(name, session=_session())
    if as_json:
        out.print_json(out.json_records(rows, QUOTA_KEYS))
    else:
        out.print_table(console, rows, [out.Column.key(k) for k in QUOTA_KEYS], "quotas")
