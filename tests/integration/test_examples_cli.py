"""The examples and the CLI, run as a user would, against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mljobs.client.session import Session
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
    pytest.param("examples/distributed_xgb_classifier.py", "test accuracy 0.9",
                 marks=[pytest.mark.multinode, pytest.mark.skipif(netns.unavailable_reason() is not None,
                                                                  reason=f"{netns.unavailable_reason()}")]),
])
def test_examples(sqlite_server, example, expect):
    out = _run([sys.executable, str(ROOT / example)], sqlite_server)
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout


def _report(out: subprocess.CompletedProcess) -> dict:
    """The JSON report an example prints as its last line."""
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_xgb_classifier_example(sqlite_server):
    """Loan data on a stage; the pipeline trained as a @remote function and as a directory job;
    each model and its metrics saved to the stage by the job; the models, fetched back, score the
    held-out applications here as they did in the job."""
    out = _run([sys.executable, str(ROOT / "examples/xgb_classifier/run.py"), "--rows", "3000",
                "--n-estimators", "60"], sqlite_server)
    report = _report(out)
    assert set(report) == {"remote", "directory"}
    session = Session(sqlite_server.url, home=sqlite_server.home)
    try:
        for how, r in report.items():
            assert r["train_rows"] == 1920 and r["holdout_rows"] == 600, r
            # 41 % of the synthetic loans default: a model must do much better than always saying no
            assert r["holdout_accuracy"] > 0.78 and r["holdout_roc_auc"] > 0.85, r
            assert abs(r["holdout_accuracy"] - r["valid_accuracy"]) < 0.06, r
            names = {f["name"] for f in session.file.list(f"@models/xgb/{how}/")}
            assert names == {f"xgb/{how}/model.joblib", f"xgb/{how}/metrics.json"}, names
            assert f"{how}: job {r['job']} fit 1920 rows" in out.stdout
        assert report["remote"]["holdout_accuracy"] == report["directory"]["holdout_accuracy"]  # same data, seed
        assert {f["name"] for f in session.file.list("@loan_data/")} == {"train/loans.parquet",
                                                                        "holdout/loans.parquet"}
    finally:
        session.close()
    bad = _run([sys.executable, str(ROOT / "examples/xgb_classifier/prepare_data.py"), "--rows", "5"], sqlite_server)
    assert bad.returncode == 2 and "rows=5: give at least 100 rows" in bad.stderr, bad.stderr


def test_pytorch_image_classifier_example(sqlite_server, tmp_path):
    """A CNN on 8x8 digits trained as a job: its TensorBoard event files are on the stage and hold
    the scalars it logged, the accuracy is sensible, and the model from the stage scores the same here."""
    out = _run([sys.executable, str(ROOT / "examples/pytorch_image_classifier/run.py"), "--epochs", "6"],
               sqlite_server)
    report = _report(out)
    assert report["test_accuracy"] > 0.85 and abs(report["client_accuracy"] - report["test_accuracy"]) < 1e-6, report
    assert len(report["history"]) == 6 and report["history"][-1] > report["history"][0], report
    assert report["log_dir"] == f"@tensorboard/pytorch_image_classifier/{report['job']}/"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    session = Session(sqlite_server.url, home=sqlite_server.home)
    try:
        files = session.file.get(report["log_dir"], tmp_path / "tb")
    finally:
        session.close()
    assert sorted(Path(f).name for f in files) == sorted(Path(f).name for f in report["event_files"])
    assert all(".tfevents." in Path(f).name for f in files), files
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "train/accuracy", "test/accuracy"} <= set(events.Tags()["scalars"])
    test_acc = [e.value for e in events.Scalars("test/accuracy")]
    assert len(test_acc) == 6 and abs(test_acc[-1] - report["test_accuracy"]) < 1e-6, test_acc
    assert "test/images" in events.Tags()["images"]


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
