"""Bad input gets a clear error that names the bad value, and changes nothing."""

from __future__ import annotations

import threading

import pytest

import mljobs
from mljobs.client.session import Session


def _no_jobs(session) -> None:
    assert len(mljobs.list_jobs(limit=0, session=session)) == 0


def test_unknown_pool(lite):
    with pytest.raises(mljobs.NotFoundError, match="NO_SUCH_POOL"):
        mljobs.remote("NO_SUCH_POOL", stage_name="s", session=lite)(lambda: 1)()
    _no_jobs(lite)


def test_missing_file_dir_and_entrypoint(lite, tmp_path):
    with pytest.raises(mljobs.NotFoundError, match="nope.py"):
        mljobs.submit_file(tmp_path / "nope.py", "DEFAULT_POOL", stage_name="s", session=lite)
    with pytest.raises(FileNotFoundError, match="nope.py"):  # what a Python user catches
        mljobs.submit_file(tmp_path / "nope.py", "DEFAULT_POOL", stage_name="s", session=lite)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        lite.file.put(tmp_path / "missing.bin", "@s/")
    with pytest.raises(mljobs.NotFoundError, match="nodir"):
        mljobs.submit_directory(tmp_path / "nodir", "DEFAULT_POOL", entrypoint="m.py", stage_name="s", session=lite)
    (tmp_path / "d").mkdir()
    with pytest.raises(mljobs.NotFoundError, match="main.py"):
        mljobs.submit_directory(tmp_path / "d", "DEFAULT_POOL", entrypoint="main.py", stage_name="s", session=lite)
    (tmp_path / "outside.py").write_text("")
    with pytest.raises(mljobs.InvalidArgumentError, match="outside"):
        mljobs.submit_directory(tmp_path / "d", "DEFAULT_POOL", entrypoint="../outside.py", stage_name="s",
                                session=lite)
    _no_jobs(lite)


def test_star_args_refused_at_decoration(lite):
    with pytest.raises(mljobs.InvalidArgumentError, match=r"\*args"):
        @mljobs.remote("DEFAULT_POOL", stage_name="s", session=lite)
        def f(*args):
            pass
    with pytest.raises(mljobs.InvalidArgumentError, match=r"\*\*kw"):
        @mljobs.remote("DEFAULT_POOL", stage_name="s", session=lite)
        def g(a, **kw):
            pass


def test_unpicklable_argument_named(lite):
    @mljobs.remote("DEFAULT_POOL", stage_name="s", session=lite)
    def f(data, lock):
        return 1

    with pytest.raises(mljobs.PayloadError, match="argument 'lock'"):
        f([1, 2], threading.Lock())
    _no_jobs(lite)


def test_min_instances_checks(lite):
    with pytest.raises(mljobs.InvalidArgumentError, match="min_instances"):
        mljobs.remote("DEFAULT_POOL", stage_name="s", target_instances=1, min_instances=2, session=lite)(
            lambda: 1)()
    mljobs.create_compute_pool("tiny", instance_family="CPU_X64_XS", max_nodes=1, session=lite)
    with pytest.raises(mljobs.InvalidArgumentError, match="max_nodes=1"):
        mljobs.remote("tiny", stage_name="s", target_instances=3, min_instances=2, session=lite)(lambda: 1)()
    _no_jobs(lite)


def test_invalid_job_id_and_stage_path(lite):
    with pytest.raises(mljobs.NotFoundError, match="MLJOB_"):
        mljobs.get_job("not-a-job", session=lite)
    with pytest.raises(mljobs.NotFoundError, match="@NOSTAGE"):
        lite.file.list("@nostage/x/")
    with pytest.raises(mljobs.InvalidArgumentError, match="@stage_name/path"):
        lite.file.list("nostage/x")


def test_unknown_family_and_duplicate_pool(lite):
    with pytest.raises(mljobs.InvalidArgumentError, match="CPU_X64_XXL"):
        mljobs.create_compute_pool("p1", instance_family="CPU_X64_XXL", session=lite)
    mljobs.create_compute_pool("p2", instance_family="CPU_X64_S", session=lite)
    with pytest.raises(mljobs.MLJobsError, match="already exists"):
        mljobs.create_compute_pool("p2", instance_family="CPU_X64_S", session=lite)
    mljobs.create_compute_pool("p2", instance_family="CPU_X64_S", if_not_exists=True, session=lite)


def test_client_python_mismatch_refused(lite):
    from mljobs.client.jobs import _submit
    from mljobs.spec import JobSpec, PayloadKind

    spec = JobSpec("DEFAULT_POOL", "s", PayloadKind.FUNCTION, entrypoint=["f"], client_python="2.7.18",
                   client_cloudpickle="3.1.2")
    with pytest.raises(mljobs.VersionMismatchError, match=r"Python 2\.7\.18.*runtime runs Python 3\.\d+"):
        _submit(lite, spec, b"")
    _no_jobs(lite)


def test_server_that_does_not_answer():
    s = Session(url="http://127.0.0.1:9")
    with pytest.raises(mljobs.ServerUnavailableError, match="127.0.0.1:9"):
        mljobs.get_job("MLJOB_00000000_0000_0000_0000_000000000000", session=s)
