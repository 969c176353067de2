"""Job definitions (register once, call many times), parallel functions, and retries with a
checkpoint folder, on a real server."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import mljobs
from mljobs import JOB_STATUS
from mljobs.errors import ConflictError, InvalidArgumentError, NotFoundError
from tests.conftest import wait_status


def _stage_dir(server, stage: str = "DEFS") -> Path:
    return server.home / "stages" / stage


def add(a: int, b: int = 10) -> int:
    return a + b


def test_a_function_definition_is_uploaded_once_and_called_many_times(session, server):
    defn = mljobs.MLJobDefinition.register(add, "DEFAULT_POOL", "DEFS", session=session)
    assert defn.name == "ADD" and defn.registered and defn.info["version"] == 1
    jobs = [defn(i) for i in range(20)]
    assert [j.result(timeout=120) for j in jobs] == [i + 10 for i in range(20)]
    assert defn(1, b=2).result(timeout=60) == 3
    # the function's pickle is on the stage once: every job's app/function.pkl is a link to it
    kept = list(_stage_dir(server).glob("_definitions/*/ADD/*/app/function.pkl"))
    assert len(kept) == 1, kept
    assert kept[0].stat().st_nlink >= 1 + 20
    for j in jobs[:3]:
        assert (_stage_dir(server) / j.id / "app" / "function.pkl").samefile(kept[0])
        assert mljobs.get_job(j.id, session=session)._refresh()["definition_name"] == "ADD"
    # calls are checked against the function's signature before anything is sent
    with pytest.raises(InvalidArgumentError, match="missing a required argument: 'a'"):
        defn()
    with pytest.raises(InvalidArgumentError, match="unexpected keyword argument 'c'"):
        defn(1, c=3)
    # found by name, listed, and called the same way
    again = mljobs.get_definition("add", session=session)
    assert again(5).result(timeout=60) == 15
    with pytest.raises(InvalidArgumentError, match="missing a required argument"):
        again()
    df = mljobs.list_definitions(session=session)
    assert list(df.index) == ["ADD"] and df.loc["ADD", "payload_kind"] == "function"
    # a name is not taken twice by accident; overwrite makes a new version and removes the old payload
    with pytest.raises(ConflictError, match="overwrite=True"):
        mljobs.MLJobDefinition.register(add, "DEFAULT_POOL", "DEFS", session=session)
    v2 = mljobs.MLJobDefinition.register(lambda a: a * 100, "DEFAULT_POOL", "DEFS", name="ADD", overwrite=True,
                                         session=session)
    assert v2.info["version"] == 2 and v2(3).result(timeout=60) == 300
    assert [p.parent.parent.name.split("-")[0] for p in _stage_dir(server).glob("_definitions/*/ADD/*/app/function.pkl")] == ["2"]
    assert jobs[0].result() == 10  # a job made from version 1 keeps its own payload
    v2.delete()
    with pytest.raises(NotFoundError, match="job definition ADD does not exist"):
        mljobs.get_definition("ADD", session=session)
    assert not list(_stage_dir(server).glob("_definitions/*/ADD/*"))


OFFSET = 0


def shifted(a: int) -> int:
    return a + OFFSET


def test_remote_uploads_each_version_of_its_function_once(lite, sqlite_server, monkeypatch):
    """``@remote`` registers its function lazily: 20 calls upload it once (its pickle is on the
    stage once, linked into every job); a changed global is a new version, uploaded once more;
    only a few versions are kept; large arguments travel with the function, as one upload."""
    import sys

    from mljobs.server.definitions import KEEP_REMOTE

    f = mljobs.remote("DEFAULT_POOL", stage_name="LAZY", session=lite)(shifted)
    jobs = [f(i) for i in range(20)]
    assert [j.result(timeout=120) for j in jobs] == list(range(20))
    stage = _stage_dir(sqlite_server, "LAZY")
    kept = list(stage.glob("_definitions/*/_REMOTE_SHIFTED_*/*/app/function.pkl"))
    assert len(kept) == 1, kept
    assert kept[0].stat().st_nlink >= 1 + 20
    assert all((stage / j.id / "app" / "function.pkl").samefile(kept[0]) for j in jobs)
    info = jobs[0]._refresh()
    assert info["definition_name"] is None and "_REMOTE_" not in str(info["name"])  # a job as before
    assert list(mljobs.list_definitions(session=lite).index) == []  # not listed: @remote's own
    hidden = mljobs.list_definitions(session=lite, include_remote=True)
    assert [n.startswith("_REMOTE_SHIFTED_") for n in hidden.index] == [True]  # unless asked for
    assert not f.registered  # not a named definition: schedules need one
    with pytest.raises(InvalidArgumentError, match="registered definition"):
        mljobs.create_schedule("NOPE", f, every="1h", args=(1,), session=lite)
    with pytest.raises(InvalidArgumentError, match="missing a required argument"):
        f()

    module = sys.modules[shifted.__module__]
    monkeypatch.setattr(module, "OFFSET", 100)  # the job sees the global as it is at the call
    assert f(1).result(timeout=60) == 101
    assert len(list(stage.glob("_definitions/*/_REMOTE_SHIFTED_*/*/app/function.pkl"))) == 2
    for k in range(KEEP_REMOTE):  # more versions than are kept: the oldest go
        monkeypatch.setattr(module, "OFFSET", 1000 + k)
        assert f(1).result(timeout=60) == 1001 + k
    assert len(list(stage.glob("_definitions/*/_REMOTE_SHIFTED_*"))) == KEEP_REMOTE
    assert jobs[0].result() == 0  # a job keeps its own files
    # a version removed under a client that called it: registered again on the next call
    latest = max(stage.glob("_definitions/*/_REMOTE_SHIFTED_*"), key=lambda p: p.stat().st_mtime).name
    mljobs.get_definition(latest, session=lite).delete()
    assert f(2).result(timeout=60) == 2 + 1000 + KEEP_REMOTE - 1

    @mljobs.remote("DEFAULT_POOL", stage_name="LAZY", session=lite)
    def size_of(data: bytes) -> int:
        return len(data)

    assert size_of(b"x" * (5 << 20)).result(timeout=120) == 5 << 20  # over REMOTE_CALL_BYTES: one upload
    assert not list(stage.glob("_definitions/*/_REMOTE_SIZE_OF_*"))
    assert size_of(b"small").result(timeout=60) == 5
    assert len(list(stage.glob("_definitions/*/_REMOTE_SIZE_OF_*"))) == 1
    with pytest.raises(InvalidArgumentError, match="_REMOTE_"):
        mljobs.MLJobDefinition.register(shifted, "DEFAULT_POOL", "LAZY", name="_remote_mine", session=lite)
    assert "remote-definitions" in lite.features()
    monkeypatch.setattr(lite, "features", lambda: frozenset())  # as from a server older than @remote's definitions
    monkeypatch.setattr(module, "OFFSET", 5000)
    before = len(list(stage.glob("_definitions/*/*/*/app")))
    assert f(1).result(timeout=60) == 5001  # uploaded whole, as before
    assert len(list(stage.glob("_definitions/*/*/*/app"))) == before


def test_default_args_and_script_definitions(session, tmp_path):
    script = tmp_path / "echo_args.py"
    script.write_text("import sys\n__return__ = sys.argv[1:]\n")
    defn = mljobs.MLJobDefinition.register(script, "DEFAULT_POOL", "DEFS", default_args=["--epochs", "1"],
                                           session=session)
    assert defn.name == "ECHO_ARGS"
    assert defn().result(timeout=60) == ["--epochs", "1"]
    assert defn(args=["--epochs", 7]).result(timeout=60) == ["--epochs", "7"]
    with pytest.raises(InvalidArgumentError, match="args="):
        defn("--epochs")
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "main.py").write_text("import sys, helper\n__return__ = helper.twice(sys.argv[1])\n")
    (folder / "helper.py").write_text("def twice(x):\n    return x * 2\n")
    d2 = mljobs.MLJobDefinition.register(folder, "DEFAULT_POOL", "DEFS", entrypoint="main.py", name="TWICE",
                                         session=session)
    assert d2(args=["ab"]).result(timeout=60) == "abab"
    # a function's defaults: keyword ones a call may leave out
    d3 = mljobs.MLJobDefinition.register(add, "DEFAULT_POOL", "DEFS", name="ADD_DEFAULTS",
                                         default_args={"a": 1, "b": 2}, session=session)
    assert d3().result(timeout=60) == 3
    assert d3(b=5).result(timeout=60) == 6
    with pytest.raises(InvalidArgumentError, match="default_args do not fit"):
        mljobs.MLJobDefinition.register(add, "DEFAULT_POOL", "DEFS", name="BAD", default_args={"z": 1},
                                        session=session)
    with pytest.raises(mljobs.NotFoundError, match="compute pool"):
        mljobs.MLJobDefinition.register(add, "NO_SUCH_POOL", "DEFS", name="NOPOOL", session=session)
    assert "NOPOOL" not in mljobs.list_definitions(session=session).index


def test_parallel_function_runs_on_every_instance(lite):
    mljobs.create_compute_pool("PAR", instance_family="CPU_X64_XS", max_nodes=2, if_not_exists=True, session=lite)

    @mljobs.remote("PAR", stage_name="DEFS", target_instances=2, parallel=True, session=lite)
    def rank_and_world(scale: int):
        import os

        return int(os.environ["RANK"]) * scale, int(os.environ["WORLD_SIZE"])

    job = rank_and_world(10)
    res = job.distributed_result(timeout=120)
    assert res.ok and res.results == [(0, 2), (10, 2)], res
    assert job.result() == (0, 2)  # the head's


def _pid_file(server, job_id: str) -> Path:
    return server.home / "run" / job_id / "0" / "supervisor.pid"


def resumable(n: int):
    import os
    import pathlib
    import time

    ck = pathlib.Path(os.environ["MLJOBS_CHECKPOINT_DIR"])
    attempt = int(os.environ["MLJOBS_ATTEMPT"])
    done = int((ck / "step").read_text()) if (ck / "step").exists() else 0
    if attempt == 1:
        (ck / "step").write_text("5")
        time.sleep(600)  # lost here: its supervisor is killed
    return {"attempt": attempt, "resumed_from": done, "total": done + n}


def test_a_lost_instance_is_retried_and_resumes_from_its_checkpoint(lite, sqlite_server):
    job = mljobs.remote("DEFAULT_POOL", stage_name="DEFS", max_retries=2, session=lite)(resumable)(3)
    wait_status(job, {"RUNNING"}, timeout=60)
    ck = sqlite_server.home / "work" / job.id / "0" / ".checkpoint" / "step"
    deadline = time.monotonic() + 60
    while not ck.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ck.exists(), "the first attempt never wrote its checkpoint"
    pid = int(_pid_file(sqlite_server, job.id).read_text().split()[0])
    os.kill(pid, signal.SIGKILL)  # the supervisor: the instance is lost
    assert job.result(timeout=120) == {"attempt": 2, "resumed_from": 5, "total": 8}
    info = job._refresh()
    assert info["attempt"] == 2 and info["status"] == "DONE" and info["max_retries"] == 2
    events = lite.request("GET", f"/jobs/{job.id}/events").json()
    assert [e["status"] for e in events] == ["PENDING", "RUNNING", "PENDING", "RUNNING", "DONE"], events
    assert "attempt 1 of 3 ended INTERNAL_ERROR" in events[2]["message"], events[2]
    assert "queued again as attempt 2" in job.get_logs(verbose=True)
    df = mljobs.list_jobs(session=lite)
    assert df.loc[job.id, "attempt"] == 2


def resumable_in_place(n: int):
    import os
    import pathlib
    import time

    ck = pathlib.Path(os.environ["MLJOBS_CHECKPOINT_DIR"])
    attempt = int(os.environ["MLJOBS_ATTEMPT"])
    done = int((ck / "step").read_text()) if (ck / "step").exists() else 0
    if attempt == 1:
        (ck / "step").write_text("5")
        time.sleep(6)  # long enough to settle: two looks in a row find it the same
        f = open(ck / "step", "w")  # then a new step written in place, and lost halfway
        f.write("9-partial")
        f.flush()
        time.sleep(600)
    return {"attempt": attempt, "resumed_from": done, "total": done + n}


def test_a_checkpoint_lost_mid_write_resumes_from_its_last_settled_copy(lite, sqlite_server):
    """A local instance's supervisor keeps a copy of the checkpoint folder as it settles; when the
    instance is lost while it rewrites a file in place, the next attempt gets that copy, not the
    half-written file."""
    job = mljobs.remote("DEFAULT_POOL", stage_name="DEFS", max_retries=1, session=lite)(resumable_in_place)(3)
    live = sqlite_server.home / "work" / job.id / "0" / ".checkpoint" / "step"
    settled = sqlite_server.home / "run" / job.id / "0" / "checkpoint" / "settled" / "step"

    def read(p: Path) -> str | None:
        try:
            return p.read_text()
        except OSError:
            return None

    deadline = time.monotonic() + 90
    while not (read(live) == "9-partial" and read(settled) == "5") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (read(live), read(settled)) == ("9-partial", "5")
    os.kill(int(_pid_file(sqlite_server, job.id).read_text().split()[0]), signal.SIGKILL)  # lost mid-write
    assert job.result(timeout=120) == {"attempt": 2, "resumed_from": 5, "total": 8}


def test_the_payloads_own_failure_is_not_retried_unless_asked(lite):
    @mljobs.remote("DEFAULT_POOL", stage_name="DEFS", max_retries=3, session=lite)
    def boom():
        raise ValueError("its own bug")

    job = boom()
    with pytest.raises(ValueError, match="its own bug"):
        job.result(timeout=60)
    assert job.status == JOB_STATUS.FAILED and job.attempt == 1

    @mljobs.remote("DEFAULT_POOL", stage_name="DEFS", max_retries=1, retry_on_failure=True, session=lite)
    def flaky():
        import os

        if os.environ["MLJOBS_ATTEMPT"] == "1":
            raise RuntimeError("first time unlucky")
        return "second time lucky"

    job = flaky()
    assert job.result(timeout=120) == "second time lucky" and job.attempt == 2

    @mljobs.remote("DEFAULT_POOL", stage_name="DEFS", max_retries=1, retry_on_failure=True, session=lite)
    def always():
        raise RuntimeError("never works")

    job = always()
    with pytest.raises(RuntimeError, match="never works"):
        job.result(timeout=120)
    assert job.attempt == 2 and job.status == JOB_STATUS.FAILED


def test_a_cancel_is_never_retried(lite):
    @mljobs.remote("DEFAULT_POOL", stage_name="DEFS", max_retries=3, session=lite)
    def sleepy():
        import time

        time.sleep(600)

    job = sleepy()
    wait_status(job, {"RUNNING"}, timeout=60)
    job.cancel()
    assert job.wait(60) == JOB_STATUS.CANCELLED and job.attempt == 1


def test_bad_retry_options_are_refused(lite):
    with pytest.raises(InvalidArgumentError, match="max_retries must be an int from 0 to 100"):
        mljobs.remote("DEFAULT_POOL", stage_name="DEFS", max_retries=-1, session=lite)(add)(1)
