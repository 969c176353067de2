"""Job environments: real installs with uv from the package index, the cache, egress policies,
and interpreter matching for a client on another Python.

Packages are small, pure Python, pinned, and absent from the base environment (humanize,
tabulate); idna (an httpx dependency) is in the base at another version, to show the job's pin wins.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import mljobs
from mljobs import JOB_STATUS
from mljobs.errors import EnvironmentBuildError, InvalidArgumentError, VersionMismatchError
from mljobs.runtime.environment import find_interpreter, uv_binary
from tests.conftest import ServerProc, assert_no_leftovers, wait_status

pytestmark = pytest.mark.timeout(300)


def _versions_job(session, **kw):
    @mljobs.remote("DEFAULT_POOL", stage_name="envs", session=session, **kw)
    def versions():
        import os

        import humanize
        import idna

        print("humanize", humanize.__version__)
        return humanize.__version__, idna.__version__, os.environ.get("GREETING"), humanize.intcomma(1234567)

    return versions()


def test_install_then_cache_hit_with_pin_over_base_and_env_vars(lite):
    import idna

    pin = "3.6" if idna.__version__ != "3.6" else "3.7"  # the base has another idna: the job's pin must win
    reqs = ["humanize==4.9.0", f"idna=={pin}"]
    first = _versions_job(lite, pip_requirements=reqs, env_vars={"GREETING": "hi"})
    assert first.result(timeout=240) == ("4.9.0", pin, "hi", "1,234,567")
    verbose = first.get_logs(verbose=True)
    assert "built in" in verbose and "humanize==4.9.0" in verbose  # uv's output is in the verbose log
    assert first.get_logs() == "humanize 4.9.0"  # ...and not in the payload's own log
    second = _versions_job(lite, pip_requirements=[f"IDNA=={pin}", "Humanize==4.9.0"], env_vars={"GREETING": "again"})
    assert second.result(timeout=60) == ("4.9.0", pin, "again", "1,234,567")
    assert "reused from the cache" in second.get_logs(verbose=True)  # same set, other order and case
    envs = mljobs.list_environments(session=lite)
    assert len(envs) == 1 and envs.iloc[0]["requirements"] == ["humanize==4.9.0", f"idna=={pin}"]

    @mljobs.remote("DEFAULT_POOL", stage_name="envs", session=lite)
    def plain():
        import idna

        return idna.__version__

    assert plain().result(timeout=60) == idna.__version__  # jobs without requirements keep the base
    cli = subprocess.run([sys.executable, "-m", "mljobs", "env", "list"], capture_output=True, text=True,
                         env={**os.environ, "MLJOBS_URL": lite.url}, timeout=60)
    assert cli.returncode == 0 and envs.iloc[0]["key"] in cli.stdout and "humanize==4.9.0" in cli.stdout
    assert mljobs.prune_environments(0, session=lite) == [envs.iloc[0]["key"]]
    assert mljobs.list_environments(session=lite).empty


def test_concurrent_jobs_build_one_environment(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlh")
    srv = ServerProc(home)
    srv.start()
    try:
        s = mljobs.Session(url=srv.url)
        mljobs.create_compute_pool("TWO", instance_family="CPU_X64_XS", max_nodes=2, session=s)

        @mljobs.remote("TWO", stage_name="envs", session=s, pip_requirements=["tabulate==0.9.0"])
        def table(i: int):
            from tabulate import tabulate

            return tabulate([[i]], tablefmt="plain")

        jobs = [table(i) for i in range(2)]
        assert [j.result(timeout=240) for j in jobs] == ["0", "1"]
        logs = [j.get_logs(verbose=True) for j in jobs]
        assert sum("built in" in text for text in logs) == 1
        assert sum("reused from the cache" in text for text in logs) == 1
        assert not [p for p in (home / "envs").iterdir() if p.name.startswith(".build")]
    finally:
        srv.stop()
        assert_no_leftovers(home)


def test_missing_requirement_fails_with_the_resolver_reason(lite):
    @mljobs.remote("DEFAULT_POOL", stage_name="envs", session=lite,
                   pip_requirements=["mljobs-no-such-package-4711==1.0"])
    def never():
        return 1

    job = never()
    assert job.wait(timeout=120) == JOB_STATUS.FAILED
    first_line = job.message.splitlines()[0]
    assert "mljobs-no-such-package-4711==1.0" in first_line and "not found in the package registry" in first_line
    with pytest.raises(EnvironmentBuildError, match="could not install pip requirement"):
        job.result()
    assert mljobs.list_environments(session=lite).empty  # nothing half-built is kept


def test_requirements_txt_in_a_directory_job(lite, tmp_path):
    (tmp_path / "requirements.txt").write_text("# the job's own\nhumanize==4.9.0\n")
    (tmp_path / "main.py").write_text("import humanize\n__return__ = humanize.naturalsize(2048)\n")
    job = mljobs.submit_directory(tmp_path, "DEFAULT_POOL", entrypoint="main.py", stage_name="envs", session=lite)
    assert job.result(timeout=240) == "2.0 kB"


class _HangingIndex(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the handler's own name
        self.seen.append(self.path)
        threading.Event().wait(60)  # never answers: the install hangs until cancelled

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def hanging_index() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HangingIndex)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/simple"
    httpd.shutdown()
    httpd.server_close()


def test_pip_index_url_is_used_and_cancel_stops_the_install(lite, hanging_index):
    @mljobs.remote("DEFAULT_POOL", stage_name="envs", session=lite, pip_requirements=["humanize==4.9.1"],
                   env_vars={"PIP_INDEX_URL": hanging_index, "UV_HTTP_TIMEOUT": "120"})
    def private():
        return 1

    job = private()
    wait_status(job, {"RUNNING"})
    for _ in range(200):
        if _HangingIndex.seen:
            break
        threading.Event().wait(0.05)
    assert any("humanize" in p for p in _HangingIndex.seen)  # uv asked the job's own index
    job.cancel()
    assert job.wait(timeout=30) == JOB_STATUS.CANCELLED
    uv = [p for p in psutil.process_iter(["cmdline"]) if hanging_index in " ".join(p.info["cmdline"] or [])
          or "humanize==4.9.1" in " ".join(p.info["cmdline"] or [])]
    assert not uv


def test_integrations_and_unknown_names(lite):
    names = set(mljobs.list_external_access_integrations(session=lite)["name"])
    assert names == {"PYPI_ACCESS"}
    mljobs.create_external_access_integration("corp_index", ["pypi.corp.example", "*.files.example"], session=lite)
    df = mljobs.list_external_access_integrations(session=lite).set_index("name")
    assert df.loc["CORP_INDEX", "allowed_hosts"] == ["pypi.corp.example", "*.files.example"]
    with pytest.raises(InvalidArgumentError, match="allowed_hosts"):
        mljobs.create_external_access_integration("bad", ["https://x.example/simple"], session=lite)
    with pytest.raises(mljobs.MLJobsError, match="built in"):
        mljobs.drop_external_access_integration("PYPI_ACCESS", session=lite)
    mljobs.drop_external_access_integration("corp_index", session=lite)

    @mljobs.remote("DEFAULT_POOL", stage_name="envs", session=lite, external_access_integrations=["nope_eai"])
    def f():
        return 1

    before = len(mljobs.list_jobs(0, session=lite))
    with pytest.raises(InvalidArgumentError, match="NOPE_EAI"):
        f()
    assert len(mljobs.list_jobs(0, session=lite)) == before  # refused at submit, nothing recorded


def test_strict_server_requires_an_integration_for_installs(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlh")
    srv = ServerProc(home, extra_env={"MLJOBS_STRICT_EGRESS": "1"})
    srv.start()
    try:
        s = mljobs.Session(url=srv.url)

        def submit(**kw):
            @mljobs.remote("DEFAULT_POOL", stage_name="envs", session=s, **kw)
            def g():
                import humanize

                return humanize.__version__

            return g()

        with pytest.raises(InvalidArgumentError, match=r"external_access_integrations=\['PYPI_ACCESS'\]"):
            submit(pip_requirements=["humanize==4.9.0"])
        private = {"PIP_INDEX_URL": "https://pypi.corp.example/simple"}
        with pytest.raises(InvalidArgumentError, match="pypi.corp.example"):
            submit(pip_requirements=["humanize==4.9.0"], env_vars=private, external_access_integrations=["PYPI_ACCESS"])
        assert len(mljobs.list_jobs(0, session=s)) == 0
        mljobs.create_external_access_integration("CORP", ["*.corp.example"], session=s)
        pending = submit(pip_requirements=["humanize==4.9.0"], env_vars=private, external_access_integrations=["corp"])
        pending.cancel()  # accepted (the host is allowed); not run, the index is made up
        assert submit(pip_requirements=["humanize==4.9.0"],
                      external_access_integrations=["PYPI_ACCESS"]).result(timeout=240) == "4.9.0"


        @mljobs.remote("DEFAULT_POOL", stage_name="envs", session=s)
        def no_requirements():
            return "ran"

        assert no_requirements().result(timeout=60) == "ran"  # no install: no integration needed
    finally:
        srv.stop()
        assert_no_leftovers(home)


# -- a client on another Python ----------------------------------------------------------------
PY310 = find_interpreter("3.10")


@pytest.fixture(scope="module")
def client310(tmp_path_factory) -> Iterator[Path]:
    """A Python 3.10 client environment: this checkout's mljobs on PYTHONPATH, its client deps by uv."""
    if PY310 is None:
        pytest.fail("no Python 3.10 on this machine; the matched-interpreter tests need one (pyenv install 3.10)")
    import cloudpickle

    venv = tmp_path_factory.mktemp("client310") / "venv"
    uv = uv_binary()
    subprocess.run([uv, "venv", "--quiet", "--python", PY310, str(venv)], check=True)
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
                    f"cloudpickle=={cloudpickle.__version__}", "httpx>=0.27", "tomli>=2.0", "fsspec>=2024.2"], check=True, timeout=240)
    yield venv / "bin" / "python"
    shutil.rmtree(venv, ignore_errors=True)


def _run310(python: Path, url: str, body: str) -> subprocess.CompletedProcess[str]:
    src = Path(mljobs.__file__).resolve().parents[1]
    script = textwrap.dedent("""
        import sys, mljobs
        s = mljobs.Session(url=sys.argv[1])
    """) + textwrap.dedent(body)
    return subprocess.run([str(python), "-c", script, url], capture_output=True, text=True, timeout=240,
                          env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})


def test_client_on_310_gets_a_310_runtime(lite, sqlite_server, client310):
    out = _run310(client310, sqlite_server.url, """
        @mljobs.remote("DEFAULT_POOL", stage_name="envs", session=s)
        def where():
            import sys
            return "%d.%d" % sys.version_info[:2]

        print(where().result(timeout=200))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "3.10"


def test_client_on_310_forced_onto_the_server_python_is_refused(lite, sqlite_server, client310):
    out = _run310(client310, sqlite_server.url, """
        from mljobs.errors import VersionMismatchError

        @mljobs.remote("DEFAULT_POOL", stage_name="envs", session=s, runtime_environment="server")
        def f():
            return 1

        try:
            f()
        except VersionMismatchError as e:
            print("REFUSED", e)
    """)
    assert out.returncode == 0, out.stderr
    assert "REFUSED the client runs Python 3.10" in out.stdout and "runtime runs Python 3.11" in out.stdout
    assert len(mljobs.list_jobs(0, session=lite)) == 0
    with pytest.raises(InvalidArgumentError, match="has no Python 3.99"):
        mljobs.submit_file(__file__, "DEFAULT_POOL", stage_name="envs", runtime_environment="3.99", session=lite)
    assert VersionMismatchError  # the refusal type, raised in the 3.10 client above


def test_an_environment_over_the_server_python_is_whole_inside_the_job(lite):
    """A cached environment layered on the server's interpreter is activated in the job's own
    (forked) process, not by starting its interpreter: the job still sees it as a started one
    would, its subprocesses (through sys.executable and PATH) included."""

    @mljobs.remote("DEFAULT_POOL", stage_name="envs", session=lite, pip_requirements=["humanize==4.9.0"])
    def inside():
        import os
        import subprocess
        import sys

        import humanize

        child = subprocess.run([sys.executable, "-c", "import humanize, sys; print(humanize.__version__, sys.prefix)"],
                               capture_output=True, text=True, check=True).stdout.split()
        on_path = subprocess.run(["python", "-c", "import humanize; print(humanize.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        with open("/proc/self/cmdline", "rb") as f:
            title = f.read().split(b"\0")[0].decode()  # a started interpreter would show `python -m ...`
        return humanize.__version__, sys.executable, os.environ.get("VIRTUAL_ENV"), sys.prefix, child, on_path, title

    for _ in range(2):  # built, then reused from the cache
        version, executable, venv, prefix, child, on_path, title = inside().result(timeout=240)
        assert version == "4.9.0" and venv and executable == os.path.join(venv, "bin", "python")
        assert prefix == venv and child == ["4.9.0", venv] and on_path == "4.9.0"
        assert title.startswith("mljobs-payload "), title
