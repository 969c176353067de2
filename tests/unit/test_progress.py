"""The progress line of wait/result/show_logs: its text, and where it goes."""

from __future__ import annotations

import io
import sys
import types

import pytest

from mljobs.client import progress as pr

T0 = 1_800_000_000.0  # an epoch second; records carry ISO strings of it


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _job(status: str, **kw) -> dict:
    info = {"id": "MLJOB_A", "name": "MLJOB_A", "status": status, "message": "", "target_instances": 1,
            "instances": [], "created_time": _iso(T0), "started_time": None, "completed_time": None}
    info.update(kw)
    return info


def test_describe_says_id_status_time_and_why():
    pending = _job("PENDING", message="pool busy: 1/1 nodes in use, 2 job(s) ahead in the queue")
    assert pr.describe(pending, now=T0 + 75) == \
        "MLJOB_A PENDING for 1m 15s: pool busy: 1/1 nodes in use, 2 job(s) ahead in the queue"
    running = _job("RUNNING", name="train", started_time=_iso(T0 + 5), target_instances=3,
                   instances=[{"status": "RUNNING"}, {"status": "STARTING"}, {"status": "EXITED"}])
    assert pr.describe(running, now=T0 + 7.25, phase="starting its Ray cluster", phase_since=T0 + 6) == \
        "MLJOB_A (train) RUNNING for 2.2s: 2/3 instances up; starting its Ray cluster for 1.2s"
    done = _job("DONE", started_time=_iso(T0 + 2), completed_time=_iso(T0 + 32))
    assert pr.describe(done) == "MLJOB_A DONE after 32s (queued 2.0s, ran 30s)"
    failed = _job("FAILED", started_time=_iso(T0), completed_time=_iso(T0 + 1), message="ValueError: bad")
    assert pr.describe(failed).endswith("ran 1.0s): ValueError: bad")
    cancelled = _job("CANCELLED", completed_time=_iso(T0 + 4000), message="cancelled before it started")
    assert pr.describe(cancelled) == "MLJOB_A CANCELLED after 1h 06m: cancelled before it started"


def test_human_durations_and_ages():
    assert [pr.format_duration(s) for s in (4.24, 42, 72, 7500, 3 * 86400 + 4 * 3600 + 5)] == \
        ["4.2s", "42s", "1m 12s", "2h 05m", "3d 4h"]
    ages = [pr.format_ago(_iso(T0 - ago), now=T0) for ago in (1, 40, 185, 5 * 3600 + 10, 86400 + 5, 3 * 86400)]
    assert ages == ["just now", "40s ago", "3 min ago", "5 h ago", "1 day ago", "3 days ago"]
    assert pr.format_ago(T0 - 60 * 86400, now=T0) == "2026-11-16" and pr.format_ago(None) == ""
    assert pr.parse_time("2026-11-25T11:32:48") == pr.parse_time("2026-11-25T11:32:48+00:00")


def test_phase_from_the_heads_log():
    env = ["2026-11-25T11:32:47.562614Z [sys] instance 0 of job MLJOB_A starting (cpus [0])",
           "2026-11-25T11:32:47.570351Z [sys] building environment ddbace with Python 3.11.7: humanize==4.9.0",
           "2026-11-25T11:32:47.905165Z [sys] Resolved 1 package in 96ms"]
    phase, since, started = pr._phase(env)
    assert phase == "installing its environment (humanize==4.9.0)" and not started
    assert since == pytest.approx(pr.parse_time("2026-11-25T11:32:47.570351Z"))
    built = env + ["2026-11-25T11:32:47.933066Z [sys] environment ddbace built in 0.37 s"]
    assert pr._phase(built) == (None, None, False)
    assert pr._phase(built + ["2026-11-25T11:32:48.001949Z [out] hi 1"]) == (None, None, True)
    ray = ["2026-11-25T11:32:48Z [sys] starting the Ray head node at 10.211.0.1:6379 (1 CPU, 0 GPU, 2 GiB)",
           "2026-11-25T11:32:50Z [sys] waiting for instances: 1 of 3 joined (need 3), 700 s left"]
    phase, since, started = pr._phase(ray)
    assert phase == "starting its Ray cluster (1 of 3 instances joined, need 3)" and not started
    assert since == pr.parse_time("2026-11-25T11:32:48Z")
    assert pr._phase(ray + ["2026-11-25T11:32:55Z [sys] 3 of 3 instance(s) joined after 7.0 s; running the "
                            "payload"])[2]


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_where_the_line_goes(monkeypatch):
    monkeypatch.delenv("MLJOBS_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(pr, "in_notebook", lambda: False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert pr.open_view(None, None) is None  # a pipe: nothing
    assert pr.open_view(None, False) is None
    assert isinstance(pr.open_view(None, True).view, pr._LineView)
    monkeypatch.setattr(sys, "stderr", _TTY())
    assert isinstance(pr.open_view(None, None).view, pr._TerminalView)
    monkeypatch.setenv("MLJOBS_PROGRESS", "0")
    assert pr.open_view(None, None) is None
    assert isinstance(pr.open_view(None, True).view, pr._TerminalView)
    monkeypatch.setattr(pr, "in_notebook", lambda: True)
    assert isinstance(pr.open_view(None, True).view, pr._NotebookView)
    assert pr.open_view(None, False) is None


def test_in_notebook_needs_a_kernel(monkeypatch):
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: None
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert not pr.in_notebook()
    fake.get_ipython = lambda: types.SimpleNamespace()  # a terminal IPython: no kernel
    assert not pr.in_notebook()
    fake.get_ipython = lambda: types.SimpleNamespace(kernel=object())
    assert pr.in_notebook()
