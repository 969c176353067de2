"""A real Airflow 3 for the tests, in a virtualenv of its own, with this checkout installed (editable).

Airflow pins fastapi below the version the server's tests run on, so it does not go into the
test environment: ``ensure_venv`` builds ``.mljobs-test/airflow-venv`` once with uv (cached; built
again when pyproject.toml changes) and ``AirflowHome`` runs ``airflow`` commands against an
``AIRFLOW_HOME`` of the test's own (SQLite), talking to an mljobs server over HTTP like any worker.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import uv

__all__ = ["ROOT", "VENV", "AIRFLOW_REQUIREMENT", "ensure_venv", "AirflowHome"]

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".mljobs-test" / "airflow-venv"
AIRFLOW_REQUIREMENT = "apache-airflow>=3.0,<4"


def _stamp() -> str:
    """What the venv was built from: a change to the requirement or pyproject.toml rebuilds it."""
    text = AIRFLOW_REQUIREMENT + sys.version + (ROOT / "pyproject.toml").read_text() + "compiled"
    return hashlib.sha256(text.encode()).hexdigest()


def ensure_venv() -> tuple[Path, float]:
    """The venv's python, and the seconds this call spent building it (0 when cached)."""
    python = VENV / "bin" / "python"
    stamp_file = VENV / ".mljobs-stamp"
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / "airflow-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait and use it
        if python.exists() and stamp_file.exists() and stamp_file.read_text() == _stamp():
            return python, 0.0
        started = time.monotonic()
        shutil.rmtree(VENV, ignore_errors=True)
        uv_bin = uv.find_uv_bin()
        run = dict(check=True, capture_output=True, text=True, timeout=900)
        try:
            subprocess.run([uv_bin, "venv", "-q", "--python", sys.executable, str(VENV)], **run)  # type: ignore[call-overload]
            # --compile-bytecode: with PYTHONDONTWRITEBYTECODE set (as on CI), every airflow command
            # and task process would compile Airflow's modules from source again
            subprocess.run([uv_bin, "pip", "install", "-q", "--compile-bytecode", "--python", str(python),
                            AIRFLOW_REQUIREMENT, "-e", str(ROOT)], **run)  # type: ignore[call-overload]
        except subprocess.CalledProcessError as e:
            shutil.rmtree(VENV, ignore_errors=True)
            raise RuntimeError(f"could not build the Airflow virtualenv {VENV} ({' '.join(e.cmd)}):\n"
                               f"{e.stdout}\n{e.stderr}") from None
        stamp_file.write_text(_stamp())
        return python, time.monotonic() - started


class AirflowHome:
    """An AIRFLOW_HOME (SQLite metadata database, a DAG folder) and the ``airflow`` command on it."""

    def __init__(self, root: Path, python: Path, mljobs_url: str) -> None:
        self.root, self.python = root, python
        self.dags = root / "dags"
        self.dags.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLJOBS_"))}
        self.env.update({
            "AIRFLOW_HOME": str(root / "home"), "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "300",
            "MLJOBS_URL": mljobs_url, "MLJOBS_HOME": str(root / "mljobs-client"),
            "PATH": f"{python.parent}:{os.environ.get('PATH', '')}",
        })
        self.env.pop("PYTHONPATH", None)

    def airflow(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.python.parent / "airflow"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, start_new_session=True)

    def migrate(self) -> None:
        """A new metadata database: ``airflow db migrate`` once per venv (5-10 s of CPU each time),
        a copy of that database for every home after it."""
        template = VENV.parent / f"airflow-{_stamp()[:16]}.db"
        db = self.root / "home" / "airflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(VENV.parent / "airflow-db.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not template.exists():
                done = self.airflow("db", "migrate")
                assert done.returncode == 0, done.stdout + done.stderr
                shutil.copyfile(db, f"{template}.part")
                os.replace(f"{template}.part", template)
                return
        shutil.copyfile(template, db)

    def start_dag_test(self, dag_id: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
        """``airflow dags test DAG`` in the background (its own process group), output to ``log``."""
        with open(log, "wb") as out:
            return subprocess.Popen([str(self.python.parent / "airflow"), "dags", "test", dag_id, *extra],
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def dag_test(self, dag_id: str, log: Path, *extra: str, timeout: float = 600) -> tuple[int, str]:
        proc = self.start_dag_test(dag_id, log, *extra)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"airflow dags test {dag_id} ran past {timeout} s:\n{log.read_text()[-5000:]}")
        return rc, log.read_text()

    # -- what the run left in the metadata database -------------------------------------------
    def _db(self) -> sa.Engine:
        return sa.create_engine(f"sqlite:///{self.root / 'home' / 'airflow.db'}")

    def latest_run_id(self, dag_id: str) -> str:
        eng = self._db()
        with eng.connect() as c:
            run_id = c.execute(sa.text("SELECT run_id FROM dag_run WHERE dag_id = :d ORDER BY id DESC LIMIT 1"),
                               {"d": dag_id}).scalar_one()
        eng.dispose()
        return run_id

    def task_states(self, dag_id: str) -> dict[str, tuple[str, int]]:
        """task_id -> (state, try_number) of the DAG's latest run."""
        eng = self._db()
        with eng.connect() as c:
            run_id = c.execute(sa.text("SELECT run_id FROM dag_run WHERE dag_id = :d ORDER BY id DESC LIMIT 1"),
                               {"d": dag_id}).scalar_one()
            rows = c.execute(sa.text("SELECT task_id, state, try_number FROM task_instance "
                                     "WHERE dag_id = :d AND run_id = :r"), {"d": dag_id, "r": run_id}).all()
        eng.dispose()
        return {r[0]: (r[1], r[2]) for r in rows}

    def xcom(self, dag_id: str, task_id: str, key: str = "return_value") -> Any:
        eng = self._db()
        with eng.connect() as c:
            value = c.execute(sa.text(
                "SELECT x.value FROM xcom x JOIN dag_run r ON r.id = x.dag_run_id WHERE x.dag_id = :d "
                "AND x.task_id = :t AND x.key = :k ORDER BY r.id DESC LIMIT 1"),
                {"d": dag_id, "t": task_id, "k": key}).scalar_one_or_none()
        eng.dispose()
        return json.loads(value) if isinstance(value, str) else value
