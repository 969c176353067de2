"""What the ``mljobs`` command prints: tables that fit the terminal, human times, and ``--json``.

Tables are rich tables as wide as the terminal (``COLUMNS`` when set, else the terminal's width,
else 240 columns when output is piped, so that nothing wraps): when a table does not fit, its
least needed columns go first (each table names them), then cells fold. Times read as people say
them (``3 min ago``, ``1m 12s``). ``--json`` prints the same records for scripts: a fixed set of
keys in a fixed order, times as ISO 8601 in UTC, sizes in bytes and seconds as numbers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from mljobs.client.progress import format_ago, format_duration, parse_time
from mljobs.units import format_bytes

__all__ = ["Column", "make_console", "is_terminal", "print_table", "print_json", "json_records", "iso_time", "job_duration",
           "JOB_KEYS", "JOB_DETAIL_KEYS", "INSTANCE_KEYS", "POOL_KEYS", "JOB_COLUMNS", "POOL_COLUMNS",
           "format_bytes", "format_ago", "format_duration", "parse_time"]

PIPE_WIDTH = 240  # piped output, with no COLUMNS: wide enough not to wrap a job row


def make_console(stderr: bool = False) -> Console:
    """A console as wide as ``COLUMNS``, else the terminal, else PIPE_WIDTH when not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        width: int | None = int(columns)
    else:
        width = None if is_terminal(stream) else PIPE_WIDTH
    return Console(width=width, stderr=stderr)


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams are not terminals
        return False


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column: its header, how a record's cell reads, and whether it may go when narrow.

    ``drop``: 0 keeps the column always; otherwise the column with the highest number goes first
    while the table is wider than the console. ``max_width``: wrap longer cells (messages) rather
    than let them push other columns out."""

    header: str
    cell: Callable[[dict[str, Any]], Any]
    drop: int = 0
    max_width: int | None = None

    @classmethod
    def key(cls, key: str, header: str | None = None, drop: int = 0, max_width: int | None = None) -> Column:
        return cls(header or key, lambda r: r.get(key), drop, max_width)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _build(rows: Sequence[dict[str, Any]], columns: Sequence[Column], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c.header, overflow="fold", max_width=c.max_width)
    for r in rows:
        table.add_row(*(_text(c.cell(r)) for c in columns))
    return table


def print_table(console: Console, rows: Sequence[dict[str, Any]], columns: Sequence[Column], title: str) -> None:
    """Print ``rows`` as a table that fits ``console``'s width (see the module's docstring)."""
    shown = list(columns)
    table = _build(rows, shown, title)
    unbounded = console.options.update_width(1 << 20)  # the table's natural width, not the console's
    while Measurement.get(console, unbounded, table).maximum > console.width:
        droppable = [c for c in shown if c.drop]
        if not droppable:
            break  # what is left folds its cells to fit
        shown.remove(max(droppable, key=lambda c: c.drop))
        table = _build(rows, shown, title)
    console.print(table)


def iso_time(value: Any) -> str | None:
    """A server time (ISO string, or epoch seconds) as ISO 8601 in UTC; None for none."""
    t = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else parse_time(value)
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_duration(r: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds a job has run (so far, while it runs); None before it started."""
    started = parse_time(r.get("started_time"))
    if started is None:
        return None
    ended = parse_time(r.get("completed_time"))
    return (ended if ended is not None else (time.time() if now is None else now)) - started


def json_records(rows: Sequence[dict[str, Any]], keys: Sequence[str],
                 nested: dict[str, Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """``rows`` with exactly ``keys`` (missing ones None), in that order; keys ending in ``_time``
    (or ``last_used``) as ISO 8601 UTC; ``duration_s`` derived for jobs; lists of records under
    ``nested`` keys treated the same way."""
    out = []
    for r in rows:
        rec: dict[str, Any] = {}
        for k in keys:
            if k == "duration_s":
                d = job_duration(r)
                rec[k] = None if d is None else round(d, 3)
            elif k.endswith("_time") or k == "last_used":
                rec[k] = iso_time(r.get(k))
            elif nested and k in nested:
                rec[k] = json_records(r.get(k) or [], nested[k])
            else:
                rec[k] = r.get(k)
        out.append(rec)
    return out


def print_json(value: Any) -> None:
    """JSON on stdout, one document, no colour, nothing else."""
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


# -- the records the commands show ------------------------------------------------------------
JOB_KEYS = ["id", "name", "status", "message", "compute_pool", "database_name", "schema_name", "owner",
            "stage_name", "target_instances", "min_instances", "instances_ran", "created_time", "started_time",
            "completed_time", "duration_s", "peak_rss_bytes", "cpu_seconds", "attempt", "schedule_name",
            "scheduled_tick"]
INSTANCE_KEYS = ["instance_id", "status", "exit_code", "started_time", "ended_time", "cpu_seconds", "peak_rss_bytes"]
JOB_DETAIL_KEYS = [*JOB_KEYS, "payload_kind", "parallel", "max_retries", "instances"]
POOL_KEYS = ["name", "state", "instance_family", "family", "min_nodes", "max_nodes", "nodes_in_use", "queued",
             "running", "provider", "cpus_per_node", "memory_bytes_per_node", "gpus_per_node", "owner",
             "created_time"]


def _ran(r: dict[str, Any]) -> str:
    d = job_duration(r)
    return "" if d is None else format_duration(d) + ("" if r.get("completed_time") else " so far")


JOB_COLUMNS = [
    Column.key("id"),
    Column("name", lambda r: "" if r.get("name") == r.get("id") else r.get("name"), drop=5),
    Column("status", lambda r: r.get("status", "") + (f" (attempt {r['attempt']})" if (r.get("attempt") or 1) > 1
                                                      else "")),
    Column.key("compute_pool", "pool", drop=4),
    Column("instances", lambda r: f"{r.get('instances_ran')}/{r.get('target_instances')}", drop=7),
    Column("created", lambda r: format_ago(r.get("created_time")), drop=1),
    Column("ran", _ran, drop=3),
    Column("peak memory", lambda r: format_bytes(r.get("peak_rss_bytes")), drop=8),
    Column("cpu", lambda r: "" if r.get("cpu_seconds") is None else format_duration(r["cpu_seconds"]), drop=6),
    Column.key("message", drop=2, max_width=60),
]
POOL_COLUMNS = [
    Column.key("name"),
    Column.key("state"),
    Column.key("instance_family", "family"),
    Column("size", lambda r: r.get("family"), drop=4),
    Column("nodes", lambda r: f"{r.get('min_nodes')}..{r.get('max_nodes')}"),
    Column.key("nodes_in_use", "in use", drop=1),
    Column.key("queued", drop=2),
    Column.key("running", drop=3),
    Column.key("provider", drop=5),
    Column("created", lambda r: format_ago(r.get("created_time")), drop=6),
]
