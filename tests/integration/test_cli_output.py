"""What the CLI prints, run as a subprocess against a real server: ``submit --wait`` with its
progress and result, ``--json`` for scripts (fixed keys, ISO times), tables that fit ``COLUMNS``,
and human times ("3 min ago", "1m 12s")."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from mljobs.cli_output import INSTANCE_KEYS, JOB_DETAIL_KEYS, JOB_KEYS, POOL_KEYS

MLJOBS = str(Path(sys.executable).with_name("mljobs"))
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _run(args, srv, columns: int | None = None, timeout: float = 180):
    env = dict(os.environ, MLJOBS_URL=srv.url, MLJOBS_HOME=str(srv.home))
    env.pop("COLUMNS", None)
    env.pop("MLJOBS_PROGRESS", None)
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([MLJOBS, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _json(out):
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def _iso_ok(value):
    assert ISO.match(value), value
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_submit_wait_progress_json_and_tables(sqlite_server, tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text("import sys, time\nprint('got', sys.argv[1:], flush=True)\ntime.sleep(1.5)\n"
                  "__return__ = {'n': 3, 'name': sys.argv[1]}\n")
    # --wait: the logs, the progress as plain lines (stderr is a pipe, so only with --progress), the
    # end in words, and the result last
    out = _run(["submit", str(ok), "--wait", "--progress", "--", "x"], sqlite_server)
    assert out.returncode == 0, out.stderr
    job_id, *rest = out.stdout.splitlines()
    assert rest == ["got ['x']", "result: {'n': 3, 'name': 'x'}"], out.stdout
    lines = out.stderr.splitlines()
    assert re.fullmatch(rf"mljobs: {job_id} (PENDING|RUNNING) for [\d.]+s", lines[0]), out.stderr
    ended = [line for line in lines if " DONE after " in line]
    assert len(ended) == 1 and re.fullmatch(rf"mljobs: {job_id} DONE after [\d.]+s \(queued [\d.]+s, ran "
                                            r"[\d.]+s\)", ended[0]), out.stderr
    # without --progress a pipe gets no progress, but still how it ended
    quiet = _run(["submit", str(ok), "--wait", "--", "y"], sqlite_server)
    assert quiet.returncode == 0 and not quiet.stderr.startswith("mljobs:"), quiet.stderr
    assert re.fullmatch(r"MLJOB_\S+ DONE after [\d.]+s \(queued [\d.]+s, ran [\d.]+s\)\n", quiet.stderr), quiet.stderr

    # --json: stdout holds one JSON document and nothing else (logs go to stderr)
    rec = _json(_run(["submit", str(ok), "--wait", "--json", "--", "z"], sqlite_server))
    assert (rec["ok"], rec["status"], rec["result"], rec["error"]) == (True, "DONE", {"n": 3, "name": "z"}, None)
    assert list(rec["job"]) == JOB_DETAIL_KEYS and rec["job"]["id"] == rec["id"]
    assert rec["job"]["duration_s"] >= 1.5
    bad = tmp_path / "bad.py"
    bad.write_text("raise ValueError('bad value 7')\n")
    failed = _run(["submit", str(bad), "--wait", "--json"], sqlite_server)
    rec = _json(failed)
    assert failed.returncode == 1 and rec["ok"] is False and rec["status"] == "FAILED", rec
    assert rec["error"]["type"] == "ValueError" and "bad value 7" in rec["error"]["message"], rec
    assert "raise ValueError('bad value 7')" in rec["error"]["traceback"], rec
    submitted = _json(_run(["submit", str(ok), "--json", "--", "w"], sqlite_server))
    assert list(submitted) == JOB_DETAIL_KEYS and submitted["status"] in ("PENDING", "RUNNING", "DONE")
    assert _json(_run(["result", submitted["id"], "--json"], sqlite_server))["result"] == {"n": 3, "name": "w"}

    # list / status / result / pool list --json: fixed keys in a fixed order, ISO 8601 UTC times
    jobs = _json(_run(["jobs", "list", "--json", "--limit", "0"], sqlite_server))
    assert len(jobs) == 5 and all(list(j) == JOB_KEYS for j in jobs)
    mine = next(j for j in jobs if j["id"] == job_id)
    created, ended_at = _iso_ok(mine["created_time"]), _iso_ok(mine["completed_time"])
    assert mine["status"] == "DONE" and 1.5 <= mine["duration_s"] <= (ended_at - created).total_seconds() + 0.01
    status = _json(_run(["status", job_id, "--json"], sqlite_server))
    assert list(status) == JOB_DETAIL_KEYS and status["payload_kind"] == "file"
    assert [list(i) for i in status["instances"]] == [INSTANCE_KEYS] and status["instances"][0]["exit_code"] == 0
    _iso_ok(status["instances"][0]["ended_time"])
    res = _json(_run(["result", job_id, "--json"], sqlite_server))
    assert res == {"id": job_id, "status": "DONE", "ok": True, "result": {"n": 3, "name": "x"},
                   "result_repr": "{'n': 3, 'name': 'x'}", "error": None}
    pools = _json(_run(["pool", "list", "--json"], sqlite_server))
    assert all(list(p) == POOL_KEYS for p in pools) and "DEFAULT_POOL" in [p["name"] for p in pools]
    _iso_ok(pools[0]["created_time"])
    staged = _json(_run(["stage", "ls", "@payload_stage/", "--json"], sqlite_server))
    assert staged and all(list(f) == ["name", "size"] for f in staged)

    # human times: how long ago, and how long it ran
    human = _run(["status", job_id], sqlite_server)
    assert re.search(r"created (just now|\d+s ago|\d+ min ago), queued [\d.]+s, ran [\d.]+s, ended ", human.stdout), \
        human.stdout
    wide = _run(["jobs", "list"], sqlite_server, columns=200)
    assert wide.returncode == 0 and job_id in wide.stdout and "peak memory" in wide.stdout, wide.stdout
    assert re.search(r"just now|\d+s ago|\d+ min ago", wide.stdout) and re.search(r"│ [\d.]+s\s+│", wide.stdout)
    assert max(len(line) for line in wide.stdout.splitlines()) <= 200

    # narrow terminals: every line fits; the least needed columns went first
    for columns in (100, 60):
        for args in (["jobs", "list"], ["pool", "list"], ["stage", "ls", "@payload_stage/"]):
            narrow = _run(args, sqlite_server, columns=columns)
            assert narrow.returncode == 0, narrow.stderr
            widths = [len(line) for line in narrow.stdout.splitlines()]
            assert max(widths) <= columns, (args, columns, narrow.stdout)
        listed = _run(["jobs", "list"], sqlite_server, columns=columns).stdout
        assert "peak memory" not in listed and "DONE" in listed, listed
    assert job_id in _run(["jobs", "list"], sqlite_server, columns=100).stdout  # the id column stays whole
