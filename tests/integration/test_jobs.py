"""End to end on a real server (SQLite and PostgreSQL): submit, result, logs, errors."""

from __future__ import annotations

import pickle
import textwrap

import pytest

import mljobs
from mljobs import JOB_STATUS, RemoteError
from mljobs.errors import RemoteTraceback


class CustomError(Exception):
    pass


def test_remote_function_result_and_logs(session):
    @mljobs.remote("DEFAULT_POOL", stage_name="payload_stage", session=session)
    def hello(name: str = "world"):
        import os

        print(f"Hello {name}!")
        return {"greeting": name, "cpus": len(os.sched_getaffinity(0)), "omp": os.environ["OMP_NUM_THREADS"]}

    job = hello("developer")
    assert job.id.startswith("MLJOB_") and len(job.id) == 42
    assert job.result(timeout=60) == {"greeting": "developer", "cpus": 1, "omp": "1"}
    assert job.status == JOB_STATUS.DONE and job.status == "DONE"
    assert job.get_logs() == "Hello developer!"
    verbose = job.get_logs(verbose=True, as_list=True)
    assert any("[sys]" in line and "starting" in line for line in verbose)
    assert any(line.endswith("[out] Hello developer!") for line in verbose)
    df = mljobs.list_jobs(session=session)
    assert list(df.columns) == ["name", "status", "message", "database_name", "schema_name", "owner",
                                "compute_pool", "target_instances", "instances_ran", "created_time",
                                "completed_time", "peak_rss_bytes", "cpu_seconds", "attempt", "schedule_name",
                                "scheduled_tick", "priority", "pending_reason"]
    assert df.loc[job.id, "status"] == "DONE" and df.loc[job.id, "attempt"] == 1
    assert df.loc[job.id, "peak_rss_bytes"] > 0 and df.loc[job.id, "cpu_seconds"] >= 0


def test_exception_reraised_with_remote_traceback(session):
    @mljobs.remote("DEFAULT_POOL", stage_name="payload_stage", session=session)
    def boom(x: int):
        def inner():
            raise ValueError(f"bad value {x}")

        inner()

    job = boom(7)
    with pytest.raises(ValueError, match="bad value 7") as info:
        job.result(timeout=60)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in inner" in cause.tb and "launcher.py" not in cause.tb
    assert job.wait() == JOB_STATUS.FAILED  # wait does not raise
    assert "ValueError: bad value 7" in job.message


def test_unrebuildable_exception_becomes_remote_error(session):
    @mljobs.remote("DEFAULT_POOL", stage_name="payload_stage", session=session)
    def weird():
        class Local(Exception):
            def __init__(self, a, b):
                super().__init__(a)

        raise Local("x", "y")

    with pytest.raises(RemoteError) as info:
        weird().result(timeout=60)
    assert "Local" in info.value.type_name and "x" in info.value.message and "weird" in info.value.traceback


def test_submit_file_args_and_return(session, tmp_path):
    script = tmp_path / "my_script.py"
    script.write_text(textwrap.dedent("""
        import sys
        print("args", sys.argv[1:])
        if __name__ == "__main__":
            __return__ = sys.argv[1:]
    """))
    args = ["arg1", "--arg2_key", "arg2 value", ""]
    job = mljobs.submit_file(script, "DEFAULT_POOL", stage_name="payload_stage", args=args, session=session)
    assert job.result(timeout=60) == args


def test_submit_directory_entrypoint_hidden_files_and_pycache(session, tmp_path):
    root = tmp_path / "repo"
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("VALUE = 5\n")
    (root / "pkg" / "__pycache__" / "junk.cpython-311.pyc").write_bytes(b"junk")
    (root / ".hidden").write_text("secret")
    (root / "src").mkdir()
    (root / "src" / "main.py").write_text(textwrap.dedent("""
        import os, sys
        sys.dont_write_bytecode = True  # whatever the server's environment says: only what was uploaded
        sys.path.insert(0, os.getcwd())
        import pkg
        files = sorted(os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk(".") for f in fs)
        __return__ = (pkg.VALUE, files)
    """))
    job = mljobs.submit_directory(root, "DEFAULT_POOL", entrypoint="src/main.py", stage_name="payload_stage",
                                  session=session)
    value, files = job.result(timeout=60)
    assert value == 5
    assert ".hidden" in files and "pkg/__init__.py" in files
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


def test_entrypoint_command_list(session, tmp_path):
    root = tmp_path / "repo"
    (root / "tool").mkdir(parents=True)
    (root / "tool" / "__init__.py").write_text("")
    (root / "tool" / "__main__.py").write_text("import sys\n__return__ = ['ran', *sys.argv[1:]]\n")
    job = mljobs.submit_directory(root, "DEFAULT_POOL", entrypoint=["python", "-m", "tool"], args=["a"],
                                  stage_name="payload_stage", session=session)
    assert job.result(timeout=60) == ["ran", "a"]


def test_submit_from_stage(session, tmp_path):
    src = tmp_path / "code"
    src.mkdir()
    (src / "main.py").write_text("import sys\n__return__ = 'from stage ' + ' '.join(sys.argv[1:])\n")
    session.file.put(src, "@code_stage/repo/")
    assert [f["name"] for f in session.file.list("@code_stage/repo/")] == ["repo/main.py"]
    job = mljobs.submit_from_stage("@code_stage/repo/", "DEFAULT_POOL", entrypoint="@code_stage/repo/main.py",
                                   stage_name="payload_stage", args=["x"], session=session)
    assert job.result(timeout=60) == "from stage x"
    with pytest.raises(mljobs.NotFoundError, match="does not exist"):
        mljobs.submit_from_stage("@code_stage/nope/", "DEFAULT_POOL", entrypoint="main.py",
                                 stage_name="payload_stage", session=session)
    with pytest.raises(mljobs.InvalidArgumentError, match="outside"):
        mljobs.submit_from_stage("@code_stage/repo/", "DEFAULT_POOL", entrypoint="@code_stage/other/main.py",
                                 stage_name="payload_stage", session=session)


def test_session_parameter_injected_and_job_pickles(session):
    @mljobs.remote("DEFAULT_POOL", stage_name="payload_stage", session=session)
    def uses_session(sess: mljobs.Session, tag: str = "t"):
        import mljobs as m

        same = m.get_active_session() is m.Session.builder.getOrCreate()
        return sess.get_current_database(), sess.get_current_schema(), same, tag

    job = uses_session(None, tag="ok")
    assert job.result(timeout=60) == ("MLJOBS", "PUBLIC", True, "ok")
    again = pickle.loads(pickle.dumps(job))
    assert again.id == job.id and again.status == JOB_STATUS.DONE


def test_delete_job_removes_files(session, server):
    @mljobs.remote("DEFAULT_POOL", stage_name="payload_stage", session=session)
    def f():
        print("x")
        return 1

    job = f()
    job.result(timeout=60)
    assert session.file.list(f"@payload_stage/{job.id}/")
    assert (server.home / "logs" / job.id).exists()
    mljobs.delete_job(job, session=session)
    with pytest.raises(mljobs.NotFoundError):
        session.file.list(f"@payload_stage/{job.id}/")
    assert not (server.home / "logs" / job.id).exists()
    with pytest.raises(mljobs.NotFoundError):
        mljobs.get_job(job.id, session=session)
