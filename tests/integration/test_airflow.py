"""mljobs.airflow in a real Airflow 3: ``airflow dags test`` (SQLite, AIRFLOW_HOME in tmp) runs DAGs
whose tasks are jobs on a real mljobs server.

Airflow lives in a virtualenv of its own (tests/airflow_env.py builds it once, with uv); its tasks
reach the server over HTTP, as a worker on another machine would. Each test checks what Airflow
recorded (task states, tries, XComs in its database), what the server recorded (the jobs, their
names and statuses), and what the task log shows (the job's own output).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mljobs
from tests.airflow_env import AirflowHome, ensure_venv
from tests.conftest import ServerProc, assert_no_leftovers, wait_status

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "xgb_classifier_airflow"


@pytest.fixture(scope="module")
def airflow_python() -> Path:
    python, built_s = ensure_venv()
    if built_s:
        print(f"built the Airflow virtualenv in {built_s:.1f} s")
    return python


@pytest.fixture
def af(airflow_python: Path, sqlite_server: ServerProc, tmp_path: Path) -> Iterator[AirflowHome]:
    home = AirflowHome(tmp_path / "airflow", airflow_python, sqlite_server.url)
    home.migrate()
    yield home


def _jobs_named(session, prefix: str):
    df = mljobs.list_jobs(limit=0, session=session)
    return df[df["name"].str.startswith(prefix)]


def _wait_for(predicate, what: str, timeout: float = 180.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


E2E_DAG = '''
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task

from mljobs.airflow import MLJobOperator, mljob_task

POOL = "DEFAULT_POOL"


def add(a: int, b: int) -> int:
    print("adding", a, b, flush=True)
    return a + b


def slow_add(a: int, b: int) -> int:
    import time
    time.sleep(3)
    print("deferred adding", a, b, flush=True)
    return a + b


def sleep_long() -> None:
    import time
    print("sleeping", flush=True)
    time.sleep(300)


def fail(x: int) -> None:
    raise ValueError(f"bad value {x}")


with DAG("mljobs_e2e", schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False):
    added = MLJobOperator(task_id="add", compute_pool=POOL, stage_name="payload_stage", python_callable=add,
                          op_args=[2], op_kwargs={"b": 3})

    @task.mljobs(compute_pool=POOL, stage_name="payload_stage")
    def double(x: int) -> int:
        print("doubling", x, flush=True)
        return 2 * x

    @mljob_task(compute_pool=POOL, stage_name="payload_stage")
    def square(x: int) -> dict:
        return {"square": x * x}

    square(double(added.output))
    MLJobOperator(task_id="script", compute_pool=POOL, stage_name="payload_stage",
                  file=str(Path(__file__).parent / "triple.py"), args=["7"])
    MLJobOperator(task_id="deferred", compute_pool=POOL, stage_name="payload_stage", python_callable=slow_add,
                  op_args=[20, 22], deferrable=True, poll_interval=2, mljobs_conn_id="mljobs_test")
    MLJobOperator(task_id="nopool", compute_pool="NO_SUCH_POOL", stage_name="payload_stage",
                  python_callable=add, op_args=[1, 1], retries=3, retry_delay=dt.timedelta(minutes=10))
    MLJobOperator(task_id="too_slow", compute_pool=POOL, stage_name="payload_stage", python_callable=sleep_long,
                  timeout=4)
    MLJobOperator(task_id="too_slow_deferred", compute_pool=POOL, stage_name="payload_stage",
                  python_callable=sleep_long, timeout=4, deferrable=True, poll_interval=1)
    MLJobOperator(task_id="fails", compute_pool=POOL, stage_name="payload_stage", python_callable=fail,
                  op_args=[13])
'''


def test_dag_runs_jobs_end_to_end(af: AirflowHome, lite, tmp_path: Path) -> None:
    """Function, @task.mljobs, @mljob_task, file and deferrable tasks return their job's value as XCom
    and copy its log; an unknown pool fails at once without retries; a timeout cancels the job (in
    the worker, and in the trigger when deferred); a job's exception fails its task with the job's
    message."""
    (af.dags / "e2e.py").write_text(E2E_DAG)
    # the deferred task finds the server through an Airflow connection, whose extra names the schema
    af.env["AIRFLOW_CONN_MLJOBS_TEST"] = af.env["MLJOBS_URL"].replace("http://", "mljobs://") + "?schema=airflow"
    (af.dags / "triple.py").write_text("import sys\nprint('tripling', sys.argv[1])\n__return__ = 3 * int(sys.argv[1])\n")
    started = time.monotonic()
    rc, out = af.dag_test("mljobs_e2e", tmp_path / "e2e.log")
    took = time.monotonic() - started
    assert rc != 0, out[-3000:]  # nopool, too_slow and fails fail the run
    states = af.task_states("mljobs_e2e")
    assert {t: s for t, (s, _) in states.items()} == {
        "add": "success", "double": "success", "square": "success", "script": "success", "deferred": "success",
        "nopool": "failed", "too_slow": "failed", "too_slow_deferred": "failed",
        "fails": "failed"}, out[-3000:]

    assert af.xcom("mljobs_e2e", "add") == 5
    assert af.xcom("mljobs_e2e", "double") == 10
    assert af.xcom("mljobs_e2e", "square") == {"square": 100}
    assert af.xcom("mljobs_e2e", "script") == 21
    assert af.xcom("mljobs_e2e", "deferred") == 42

    for task_id, line in [("add", "adding 2 3"), ("double", "doubling 5"), ("script", "tripling 7"),
                          ("deferred", "deferred adding 20 22")]:
        job_id = af.xcom("mljobs_e2e", task_id, "mljobs_job_id")
        job = mljobs.get_job(job_id, session=lite)
        assert job.status == mljobs.JOB_STATUS.DONE
        assert job.name.startswith(f"airflow.mljobs_e2e.{task_id}.")
        tag = job_id[-12:].lower()
        assert f"[{tag}] {line}" in out or f"[{tag}/0] {line}" in out, f"{task_id}'s log was not copied"

    assert mljobs.get_job(af.xcom("mljobs_e2e", "deferred", "mljobs_job_id"), session=lite)._refresh()[
        "schema_name"] == "AIRFLOW"

    # the unknown pool: named in the task's failure, one try only (its retry_delay of 10 min never came)
    assert states["nopool"][1] == 1
    assert "compute pool 'NO_SUCH_POOL' does not exist" in out
    assert took < 500
    assert _jobs_named(lite, "airflow.mljobs_e2e.nopool.").empty

    slow = mljobs.get_job(af.xcom("mljobs_e2e", "too_slow", "mljobs_job_id"), session=lite)
    assert slow.status == mljobs.JOB_STATUS.CANCELLED
    assert f"mljobs job {slow.id} did not end within timeout=4 s of its submission; cancelled it" in out

    slow = mljobs.get_job(af.xcom("mljobs_e2e", "too_slow_deferred", "mljobs_job_id"), session=lite)
    assert slow.status == mljobs.JOB_STATUS.CANCELLED  # by the trigger, when the deadline passed
    assert f"cancelled job {slow.id} because its timeout passed" in out

    failed = mljobs.get_job(af.xcom("mljobs_e2e", "fails", "mljobs_job_id"), session=lite)
    assert failed.status == mljobs.JOB_STATUS.FAILED
    assert f"mljobs job {failed.id} ended FAILED" in out and "bad value 13" in out


RETRY_DAG = '''
from __future__ import annotations

import datetime as dt

import pendulum
from airflow.sdk import DAG

from mljobs.airflow import MLJobOperator


def train(marker: str, starts: str) -> int:
    import os, time
    with open(starts, "a") as f:
        f.write(f"{os.getpid()}\\n")
    print("training starts", flush=True)
    deadline = time.monotonic() + 300
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    print("training done", flush=True)
    return 99


with DAG("mljobs_retry", schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False):
    MLJobOperator(task_id="train", compute_pool="DEFAULT_POOL", stage_name="payload_stage", python_callable=train,
                  op_args=[MARKER, STARTS], retries=3, retry_delay=dt.timedelta(seconds=5))
'''


ARGUMENTS = """
from airflow.sdk import Connection

from mljobs.airflow import MLJobOperator
from mljobs.airflow.hook import settings_from_connection
from mljobs.airflow.operator import job_name
from mljobs.errors import InvalidArgumentError


def f(x):
    return x


for kw in [dict(python_callable=f, file="x.py"), dict(), dict(directory="d"), dict(file="x.py", entrypoint="m.py"),
           dict(python_callable=f, args=["1"]), dict(file="x.py", op_args=[1]), dict(python_callable=f, timeout=-5),
           dict(python_callable=f, poll_interval="soon"), dict(python_callable=f, compute_pool=""),
           dict(python_callable=f, mljobs_conn_id="c", session_options={"url": "http://127.0.0.1:1"}),
           dict(python_callable=f, session_options={"uri": "http://127.0.0.1:1"})]:
    try:
        MLJobOperator(task_id="t", **{"compute_pool": "P", "stage_name": "s", **kw})
        print("ACCEPTED", sorted(kw))
    except InvalidArgumentError as e:
        print("REFUSED", e)
conn = Connection(conn_id="m", conn_type="mljobs", host="127.0.0.1", port=8700, password="tok",
                  extra='{"database": "D"}')
print("SETTINGS", settings_from_connection(conn))
try:
    settings_from_connection(Connection(conn_id="m", conn_type="mljobs", host="h", extra='{"token": "x"}'))
except InvalidArgumentError as e:
    print("REFUSED", e)
names = {job_name("d", "t", "r", i, 1) for i in (-1, 0, 1)} | {job_name("d", "t", "r", -1, 2)}
print("NAMES", len(names), job_name("my dag", "t", "r:1+00", -1, 1) == job_name("my dag", "t", "r:1+00", -1, 1),
      job_name("my dag", "t", "r", -1, 1).split(".")[:3])
"""


def test_bad_arguments_are_refused_when_the_dag_is_parsed(airflow_python: Path, tmp_path: Path) -> None:
    """Each bad operator argument is refused in the constructor (so at DAG parse time), naming the
    value and the fix; connections map to session settings; job names differ per map index and
    clearing, and are stable."""
    script = tmp_path / "args.py"
    script.write_text(ARGUMENTS)
    done = subprocess.run([str(airflow_python), str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AIRFLOW_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.split(" ")[0] in ("ACCEPTED", "REFUSED", "SETTINGS",
                                                                                 "NAMES")]
    assert not [line for line in lines if line.startswith("ACCEPTED")], lines
    expected = ["got ['python_callable', 'file']", "got none", "directory needs entrypoint=",
                "entrypoint= is for directory or stage_path, not file", "a python_callable takes op_args=",
                "a file takes args=[...]", "timeout must be a number of seconds > 0 or a timedelta, got -5",
                "poll_interval must be a number of seconds > 0 or a timedelta, got 'soon'",
                "compute_pool must be a pool name, got ''", "give either mljobs_conn_id or session_options",
                "unknown session option(s) ['uri']", "unknown extra field(s) ['token']"]
    refused = [line for line in lines if line.startswith("REFUSED")]
    assert len(refused) == len(expected), refused
    for line, text in zip(refused, expected):
        assert text in line, (line, text)
    assert "SETTINGS SessionSettings(url='http://127.0.0.1:8700', token='tok', database='D', schema=None" in done.stdout
    assert "NAMES 4 True ['airflow', 'my_dag', 't']" in done.stdout


TRIGGER = """
import asyncio
import os
import time

from mljobs import get_job, remote
from mljobs.airflow import MLJobTrigger


@remote("DEFAULT_POOL", stage_name="payload_stage")
def sleep_long() -> None:
    import time
    print("sleeping", flush=True)
    time.sleep(300)


async def main() -> None:
    url = os.environ["MLJOBS_URL"]
    job = sleep_long()
    while job.status.value != "RUNNING":
        await asyncio.sleep(0.1)
    trigger = MLJobTrigger(**MLJobTrigger(job.id, url, poll_interval=1).serialize()[1])  # as the triggerer makes it
    events = []

    async def collect() -> None:
        async for event in trigger.run():
            events.append(event.payload)

    task = asyncio.create_task(collect())
    await asyncio.sleep(2)
    assert not events, events  # still running: no event
    await trigger.on_kill()  # the deferred task was marked failed
    await asyncio.wait_for(task, 30)
    print("EVENT", events[0]["status"], events[0]["job_id"] == job.id)
    print("STATUS", get_job(job.id).status.value)
    done = await asyncio.wait_for(MLJobTrigger(job.id, url, deadline=time.time() - 1).run().__anext__(), 30)
    print("ENDED", done.payload["status"])  # an ended job fires at once, even past its deadline


asyncio.run(main())
"""


def test_trigger_fires_when_the_job_ends_and_on_kill_cancels_it(airflow_python: Path, sqlite_server: ServerProc,
                                                               tmp_path: Path) -> None:
    """MLJobTrigger, rebuilt from its serialized form as the triggerer does, waits without firing while
    the job runs; its on_kill (a deferred task marked failed) cancels the job, and run() then fires
    CANCELLED."""
    script = tmp_path / "trigger.py"
    script.write_text(TRIGGER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLJOBS_")}
    env.update(MLJOBS_URL=sqlite_server.url, MLJOBS_HOME=str(tmp_path / "client"), AIRFLOW_HOME=str(tmp_path / "af"))
    done = subprocess.run([str(airflow_python), str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "EVENT CANCELLED True" in done.stdout, done.stdout
    assert "STATUS CANCELLED" in done.stdout
    assert "ENDED CANCELLED" in done.stdout


@pytest.fixture
def fixed_port_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server on a port of its own choosing, so that it comes back on the same address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = ServerProc(tmp_path_factory.mktemp("mlh"), args=["--port", str(port)])
    srv.start()
    yield srv
    srv.stop()
    assert_no_leftovers(srv.home)


def test_retry_reattaches_to_the_job_of_the_failed_try(airflow_python: Path, fixed_port_server: ServerProc,
                                                       tmp_path: Path) -> None:
    """The first try fails after submitting (the control plane goes away while it waits; the job
    keeps running); the retry finds that job by its name and waits on it: one job, one run of the
    payload, the retry's XCom is its value."""
    from mljobs.client.session import Session

    sqlite_server = fixed_port_server
    af = AirflowHome(tmp_path / "airflow", airflow_python, sqlite_server.url)
    af.migrate()
    lite = Session(sqlite_server.url)
    marker, starts = tmp_path / "go", tmp_path / "starts.txt"
    (af.dags / "retry.py").write_text(RETRY_DAG.replace("MARKER", repr(str(marker))).replace("STARTS", repr(str(starts))))
    log = tmp_path / "retry.log"
    proc = af.start_dag_test("mljobs_retry", log)
    try:
        ids = _wait_for(lambda: list(_jobs_named(lite, "airflow.mljobs_retry.train.").index), "the first try's job",
                        timeout=300)
        job = mljobs.get_job(ids[0], session=lite)
        wait_status(job, {"RUNNING"}, timeout=120)
        _wait_for(lambda: starts.exists() and starts.read_text(), "the payload to start")
        url = sqlite_server.url
        sqlite_server.kill()  # the server stops, its jobs run on
        _wait_for(lambda: "no mljobs server answers" in log.read_text(), "the first try to fail", timeout=120)
        assert sqlite_server.start() == url  # the same address, which the DAG's tasks know
        reattached = f"reattaching to mljobs job {job.id} (RUNNING), which an earlier try of this task submitted"
        _wait_for(lambda: reattached in log.read_text(), "the retry to reattach", timeout=180)
        marker.touch()  # only now may the job end: the retry waits on a running job
        rc = proc.wait(300)
    finally:
        lite.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert rc == 0, out[-4000:]
    state, tries = af.task_states("mljobs_retry")["train"]
    assert state == "success" and tries >= 2, (state, tries)
    assert af.xcom("mljobs_retry", "train") == 99
    assert af.xcom("mljobs_retry", "train", "mljobs_job_id") == job.id
    assert len(_jobs_named(lite, "airflow.mljobs_retry.train.")) == 1
    assert len(starts.read_text().splitlines()) == 1, "the payload ran twice"
    assert job.status == mljobs.JOB_STATUS.DONE
    lite.close()


CLEAR_DAG = '''
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from mljobs.airflow import MLJobOperator


def stamp() -> float:
    import time
    return time.time()


with DAG("mljobs_clear", schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False):
    MLJobOperator(task_id="stamp", compute_pool="DEFAULT_POOL", stage_name="payload_stage", python_callable=stamp,
                  retries=2)
'''


def test_a_cleared_task_runs_a_new_job(af: AirflowHome, lite, tmp_path: Path) -> None:
    """Running a finished task instance again finds its job by name (DONE: its result is reused);
    clearing it (``airflow tasks clear``: Airflow raises its max_tries) gives it a new name, so it
    runs a new job."""
    (af.dags / "clear.py").write_text(CLEAR_DAG)
    rc, out = af.dag_test("mljobs_clear", tmp_path / "clear.log")
    assert rc == 0, out[-3000:]
    first = af.xcom("mljobs_clear", "stamp", "mljobs_job_id")
    run_id = af.latest_run_id("mljobs_clear")

    again = af.airflow("tasks", "test", "mljobs_clear", "stamp", run_id)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert f"reattaching to mljobs job {first} (DONE)" in again.stdout + again.stderr

    cleared = af.airflow("tasks", "clear", "-y", "mljobs_clear")
    assert cleared.returncode == 0, cleared.stdout[-2000:] + cleared.stderr[-2000:]
    rerun = af.airflow("tasks", "test", "mljobs_clear", "stamp", run_id)
    text = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, text[-3000:]
    assert "reattaching" not in text and "submitted mljobs job" in text
    jobs = _jobs_named(lite, "airflow.mljobs_clear.stamp.")
    assert len(jobs) == 2 and jobs["name"].nunique() == 2 and first in jobs.index
    assert (jobs["status"] == "DONE").all()


KILL_DAG = '''
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from mljobs.airflow import MLJobOperator


def sleep_long() -> None:
    import time
    print("sleeping", flush=True)
    time.sleep(300)


with DAG("mljobs_kill", schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False):
    MLJobOperator(task_id="sleeper", compute_pool="DEFAULT_POOL", stage_name="payload_stage",
                  python_callable=sleep_long)
'''


def test_killing_the_task_cancels_its_job(af: AirflowHome, lite, tmp_path: Path) -> None:
    """SIGTERM to the task's process (what Airflow sends to a task it kills) runs on_kill: the job
    is cancelled at once, its processes stop, and the task fails."""
    (af.dags / "kill.py").write_text(KILL_DAG)
    log = tmp_path / "kill.log"
    proc = af.start_dag_test("mljobs_kill", log)
    try:
        ids = _wait_for(lambda: list(_jobs_named(lite, "airflow.mljobs_kill.sleeper.").index), "the task's job",
                        timeout=300)
        job = mljobs.get_job(ids[0], session=lite)
        wait_status(job, {"RUNNING"}, timeout=120)
        _wait_for(lambda: "sleeping" in job.get_logs(), "the payload to start")
        os.kill(proc.pid, signal.SIGTERM)
        wait_status(job, {"CANCELLED"}, timeout=30, allowed={"RUNNING", "CANCELLING"})
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert rc != 0
    assert f"cancelled mljobs job {job.id} because the task was killed" in out
    assert af.task_states("mljobs_kill")["sleeper"][0] == "failed"


@pytest.mark.multinode
def test_example_xgb_classifier_dag(af: AirflowHome, lite, tmp_path: Path) -> None:
    """examples/xgb_classifier_airflow at a small size: prepare -> train on 2 instances (waiting in
    the triggerer) -> evaluate, each a job; the model scores well on rows training never saw."""
    for f in EXAMPLE.glob("*.py"):
        (af.dags / f.name).write_text(f.read_text())
    rc, out = af.dag_test("xgb_classifier_airflow", tmp_path / "xgb.log", "-c", '{"n_samples": 4000}', timeout=900)
    assert rc == 0, out[-5000:]
    states = af.task_states("xgb_classifier_airflow")
    assert all(s == "success" for s, _ in states.values()), states
    trained = af.xcom("xgb_classifier_airflow", "train")
    assert trained["workers"] == 2 and sum(trained["rows"]) > 0, trained
    train_job = mljobs.get_job(af.xcom("xgb_classifier_airflow", "train", "mljobs_job_id"), session=lite)
    assert train_job.instances_ran == 2
    metrics = af.xcom("xgb_classifier_airflow", "evaluate")
    assert metrics["auc"] > 0.85, metrics
    assert f"[{train_job.id[-12:].lower()}/0]" in out  # the training log, copied after the deferred wait
