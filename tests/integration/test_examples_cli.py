"""The examples and the CLI, run as a user would, against a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mljobs.providers import netns

ROOT = Path(__file__).resolve().parents[2]
MLJOBS = str(Path(sys.executable).with_name("mljobs"))  # the console script beside this interpreter


def _env(srv):
    return dict(os.environ, MLJOBS_URL=srv.url, MLJOBS_HOME=str(srv.home))


def _run(args, srv, **kw):
    return subprocess.run(args, env=_env(srv), capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("example,expect", [
    ("examples/hello_world.py", "result: Hello developer!"),
    ("examples/file_job/submit.py", "Hello world arg1 --arg2_key arg2_value"),
    ("examples/directory_job/submit.py", "8330833.5"),
    ("examples/xgb_classifier.py", "accuracy 0.9"),
    pytest.param("examples/distributed_xgb_classifier.py", "test accuracy 0.9",
                 marks=[pytest.mark.multinode, pytest.mark.skipif(netns.unavailable_reason() is not None,
                                                                  reason=f"{netns.unavailable_reason()}")]),
])
def test_examples(sqlite_server, example, expect):
    out = _run([sys.executable, str(ROOT / example)], sqlite_server)
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout


def test_cli_submit_wait_logs_result_and_stage(sqlite_server, tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text("import sys\nprint('got', sys.argv[1:])\n__return__ = 3\n")
    out = _run([sys.executable, "-m", "mljobs", "submit", str(ok), "--wait", "--", "a", "--flag"], sqlite_server)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.splitlines()[0]
    assert "got ['a', '--flag']" in out.stdout
    assert _run([MLJOBS, "result", job_id], sqlite_server).stdout.strip() == "3"
    assert "DONE" in _run([MLJOBS, "status", job_id], sqlite_server).stdout
    assert _run([MLJOBS, "logs", job_id], sqlite_server).stdout.strip() == "got ['a', '--flag']"
    bad = tmp_path / "bad.py"
    bad.write_text("raise SystemExit('boom')\n")
    out = _run([MLJOBS, "submit", str(bad), "--wait"], sqlite_server)
    assert out.returncode == 1 and "FAILED" in out.stderr
    out = _run([MLJOBS, "submit", str(bad), "--pool", "nope"], sqlite_server)
    assert out.returncode == 1 and "NOPE" in out.stderr and "does not exist" in out.stderr
    assert _run([MLJOBS, "stage", "put", str(ok), "@mystage/dir/"], sqlite_server).returncode == 0
    assert "dir/ok.py" in _run([MLJOBS, "stage", "ls", "@mystage/dir/"], sqlite_server).stdout
    assert _run([MLJOBS, "stage", "get", "@mystage/dir/ok.py", str(tmp_path / "dl")], sqlite_server).returncode == 0
    assert (tmp_path / "dl" / "ok.py").read_text() == ok.read_text()
    out = _run([MLJOBS, "pool", "create", "cli_pool", "--family", "CPU_X64_S", "--max-nodes", "2"], sqlite_server)
    assert out.returncode == 0 and "CLI_POOL" in out.stdout
    assert "SUSPENDED" in _run([MLJOBS, "pool", "suspend", "cli_pool"], sqlite_server).stdout
    assert "CLI_POOL" in _run([MLJOBS, "pool", "list"], sqlite_server).stdout
    assert _run([MLJOBS, "pool", "drop", "cli_pool"], sqlite_server).returncode == 0
    assert "MLJOB_" in _run([MLJOBS, "jobs", "list"], sqlite_server).stdout
