"""Live progress of a job while the client waits on it (``MLJob.wait``, ``result``, ``show_logs``).

One line: the job's id, its status, how long it has been in it, and what it is doing there
(why it waits while PENDING; installing its environment or starting its Ray cluster before the
payload runs). Where it goes:

* in a notebook kernel (Jupyter, VS Code): a display updated in place (``IPython.display`` with a
  ``display_id``), left showing the final status;
* on a terminal (stderr is a TTY): a rich spinner line on stderr, gone when the wait ends;
* anywhere else (scripts, pipes, logs): nothing, unless asked with ``progress=True``, which then
  writes a plain line to stderr each time the status or the phase changes.

``MLJOBS_PROGRESS=0`` turns the automatic display off everywhere.
"""

from __future__ import annotations

import datetime as dt
import html
import os
import sys
import time
from typing import Any

from mljobs.units import format_duration

__all__ = ["open_view", "JobProgress", "in_notebook", "format_duration", "format_ago", "parse_time", "describe"]

POLL_S = 1.0  # how often a shown progress line is refreshed from the server
_LOG_TAIL = 200  # lines of the head's verbose log read to tell the phase before the payload runs


def in_notebook() -> bool:
    """Whether this code runs in an IPython kernel (a notebook), without importing IPython."""
    ipy = sys.modules.get("IPython")
    if ipy is None:
        return False
    try:
        shell = ipy.get_ipython()
    except Exception:  # noqa: BLE001
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # noqa: BLE001 - closed or replaced streams
        return False


def format_ago(value: Any, now: float | None = None) -> str:
    """How long ago a server timestamp (ISO, or epoch seconds) was: ``just now``, ``40s ago``,
    ``3 min ago``, ``5 h ago``, ``2 days ago``; past 30 days the date. Empty for no time."""
    t = float(value) if isinstance(value, (int, float)) else parse_time(value)
    if t is None:
        return ""
    ago = (time.time() if now is None else now) - t
    if ago < 5:
        return "just now"
    if ago < 60:
        return f"{ago:.0f}s ago"
    if ago < 3600:
        return f"{int(ago // 60)} min ago"
    if ago < 86400:
        return f"{int(ago // 3600)} h ago"
    if ago < 30 * 86400:
        days = int(ago // 86400)
        return f"{days} day{'s' if days > 1 else ''} ago"
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d")


def parse_time(value: Any) -> float | None:
    """A server timestamp (ISO; UTC when it names no zone) as epoch seconds; None for none."""
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


def _phase(lines: list[str]) -> tuple[str | None, float | None, bool]:
    """What the head does before its payload runs, from its verbose log lines.

    Returns (phase, when it began, whether the payload has started)."""
    phase: str | None = None
    since: float | None = None
    for line in lines:
        stamp, _, rest = line.partition(" ")
        stream, _, text = rest.partition("] ")
        stream = stream.lstrip("[")
        if stream in ("out", "err"):
            return None, None, True
        if text.startswith("building environment "):
            reqs = text.partition(": ")[2]
            phase = "installing its environment" + (f" ({_shorten(reqs, 80)})" if reqs else "")
            since = parse_time(stamp)
        elif text.startswith("environment ") and (" built in " in text or "reused from the cache" in text):
            phase, since = None, None
        elif text.startswith("starting the Ray head node"):
            phase, since = "starting its Ray cluster", parse_time(stamp)
        elif text.startswith("waiting for instances: "):
            joined = text.removeprefix("waiting for instances: ").split(",")[0]  # "1 of 3 joined (need 3)"
            phase = f"starting its Ray cluster ({joined.replace(' joined (', ' instances joined, ').rstrip(')')})"
            since = since or parse_time(stamp)
        elif text.startswith("joining the Ray cluster"):
            phase, since = "joining its Ray cluster", parse_time(stamp)
        elif "running the payload" in text:
            return None, None, True
    return phase, since, False


def _shorten(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def describe(info: dict[str, Any], now: float | None = None, phase: str | None = None,
             phase_since: float | None = None) -> str:
    """The progress line for a job record (``GET /jobs/{id}``), at epoch time ``now``."""
    now = time.time() if now is None else now
    status = str(info.get("status", "?"))
    who = info["id"] + (f" ({info['name']})" if info.get("name") and info["name"] != info["id"] else "")
    created, started = parse_time(info.get("created_time")), parse_time(info.get("started_time"))
    completed = parse_time(info.get("completed_time"))
    message = info.get("message") or ""
    if completed is not None:  # terminal: how long it queued and ran
        parts = [f"{who} {status} after {format_duration(completed - (created or completed))}"]
        if started is not None and created is not None:
            parts.append(f"(queued {format_duration(started - created)}, ran {format_duration(completed - started)})")
        line = " ".join(parts)
        return _shorten(line + (f": {message}" if message and status != "DONE" else ""), 240)
    since = created if status == "PENDING" else started if status == "RUNNING" else None
    line = f"{who} {status}" + (f" for {format_duration(now - since)}" if since is not None else "")
    details = []
    if status == "PENDING":
        if message:
            details.append(message)
    elif status == "RUNNING":
        target = int(info.get("target_instances") or 1)
        if target > 1:
            live = sum(1 for i in info.get("instances") or [] if i.get("status") in ("STARTING", "RUNNING"))
            details.append(f"{live}/{target} instances up")
        if phase:
            label, paren, rest = phase.partition(" (")
            took = f" for {format_duration(now - phase_since)}" if phase_since else ""
            details.append(label + took + (paren + rest if paren else ""))
        if message:
            details.append(message)
    elif message:
        details.append(message)
    return _shorten(line + (": " + "; ".join(details) if details else ""))


_COLORS = {"PENDING": "#b26b00", "RUNNING": "#1f6feb", "DONE": "#1a7f37", "FAILED": "#cf222e",
           "INTERNAL_ERROR": "#cf222e", "CANCELLING": "#6e7781", "CANCELLED": "#6e7781", "DELETED": "#6e7781"}


class JobProgress:
    """The state behind a job's progress line: the last record, and the head's phase."""

    def __init__(self, job: Any, view: _View) -> None:
        self.job, self.view = job, view
        self.info: dict[str, Any] | None = None
        self.phase: str | None = None
        self.phase_since: float | None = None
        self._payload_started = False

    # -- what the job does ------------------------------------------------------------------
    def observe(self, info: dict[str, Any]) -> None:
        """A fresh job record; reads the head's log for the phase while the payload has not run."""
        self.info = info
        if info["status"] == "RUNNING" and not self._payload_started:
            try:
                text = self.job._session.request("GET", f"/jobs/{self.job.id}/logs",
                                                 params={"limit": _LOG_TAIL, "instance": 0, "verbose": True},
                                                 timeout=10).text
            except Exception:  # noqa: BLE001 - the phase is a nicety; the status is what counts
                text = ""
            self.phase, self.phase_since, self._payload_started = _phase(text.splitlines())
        elif info["status"] != "RUNNING":
            self.phase = self.phase_since = None
        self.render()

    def text(self) -> str:
        return describe(self.info, phase=self.phase, phase_since=self.phase_since) if self.info else ""

    def render(self) -> None:
        if self.info is not None:
            self.view.show(self)

    def print(self, line: str) -> None:
        self.view.print(line)

    def close(self, info: dict[str, Any] | None = None) -> None:
        """The wait ended (``info``: the final record) or was interrupted (None)."""
        if info is not None:
            self.info = info
            self.phase = None
        self.view.close(self, final=info is not None)

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.view.close(self, final=False)


class _View:
    def show(self, p: JobProgress) -> None:
        raise NotImplementedError

    def print(self, line: str) -> None:
        print(line, flush=True)

    def close(self, p: JobProgress, final: bool) -> None:
        pass


class _NotebookView(_View):
    """A display updated in place; it keeps the final status when the wait ends."""

    def __init__(self) -> None:
        self._handle: Any = None
        self._last: str | None = None
        self._closed = False

    def _bundle(self, p: JobProgress, final: bool) -> dict[str, str]:
        text = p.text()
        status = str(p.info["status"]) if p.info else ""
        mark = "" if final else "⏳ "
        body = html.escape(text).replace(html.escape(status), f'<b style="color:{_COLORS.get(status, "inherit")}">'
                                         f"{html.escape(status)}</b>", 1)
        return {"text/plain": mark + text,
                "text/html": f'<div style="font-family:monospace;white-space:pre-wrap">{mark}{body}</div>'}

    def show(self, p: JobProgress, final: bool = False) -> None:
        if self._closed:
            return
        bundle = self._bundle(p, final)
        if bundle["text/plain"] == self._last:
            return
        from IPython.display import display

        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)
        self._last = bundle["text/plain"]

    def close(self, p: JobProgress, final: bool) -> None:
        if final and self._handle is not None and p.info is not None:
            self.show(p, final=True)
        self._closed = True


class _TerminalView(_View):
    """A rich spinner on stderr whose elapsed time ticks on its own; gone when the wait ends."""

    def __init__(self) -> None:
        self._live: Any = None
        self._p: JobProgress | None = None

    def _renderable(self) -> Any:
        from rich.text import Text

        self._spinner.update(text=Text(self._p.text() if self._p else "", no_wrap=True, overflow="ellipsis"))
        return self._spinner

    def show(self, p: JobProgress) -> None:
        self._p = p
        if self._live is None:
            from rich.console import Console
            from rich.live import Live
            from rich.spinner import Spinner

            self._spinner = Spinner("dots", style="status.spinner")
            console = Console(stderr=True, force_jupyter=False)
            self._live = Live(console=console, transient=True, redirect_stdout=False, redirect_stderr=False,
                              refresh_per_second=8, get_renderable=self._renderable)
            self._live.start()

    def print(self, line: str) -> None:
        if self._live is not None and _isatty(sys.stdout):  # the same screen: above the spinner
            from rich.text import Text

            self._live.console.print(Text.from_ansi(line), soft_wrap=True, highlight=False, markup=False)
        else:
            print(line, flush=True)

    def close(self, p: JobProgress, final: bool) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class _LineView(_View):
    """progress=True where nothing is interactive: one plain stderr line per change of state."""

    def __init__(self) -> None:
        self._said: tuple[Any, ...] | None = None

    def show(self, p: JobProgress, final: bool = False) -> None:
        info = p.info or {}
        key = (info.get("status"), p.phase, info.get("message"))  # a final line already said is not repeated
        if key != self._said:
            print("mljobs: " + p.text(), file=sys.stderr, flush=True)
            self._said = key

    def close(self, p: JobProgress, final: bool) -> None:
        if final and self._said is not None:
            self.show(p, final=True)


def open_view(job: Any, progress: bool | None) -> JobProgress | None:
    """The progress of ``job`` where it can be shown; None when it is not to be shown.

    ``progress``: None shows it in a notebook or on a terminal (stderr a TTY), unless
    ``MLJOBS_PROGRESS=0``; True shows it everywhere (plain lines on stderr where nothing is
    interactive); False never.
    """
    if progress is False:
        return None
    if progress is None and os.environ.get("MLJOBS_PROGRESS", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    if in_notebook():
        return JobProgress(job, _NotebookView())
    if _isatty(sys.stderr) and os.environ.get("TERM") != "dumb":
        return JobProgress(job, _TerminalView())
    if progress:
        return JobProgress(job, _LineView())
    return None
