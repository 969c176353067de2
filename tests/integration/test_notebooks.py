"""Notebooks: the example notebooks and notebook-defined jobs, run in a real IPython kernel
(nbclient) against a real server, and the progress line of wait/result/show_logs in a kernel, on
a terminal and in a plain pipe.

The kernel is this interpreter, from a kernelspec the test writes into a temporary JUPYTER_PATH;
every Jupyter and IPython folder points into tmp_path, so nothing is written to the real home.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from mljobs.paths import HomePaths
from mljobs.providers import netns
from mljobs.providers.local import ray_temp_dir

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[2]
KERNEL = "mljobs-test-python"
JOB_ID = re.compile(r"MLJOB_[0-9A-F_]{36}")


@pytest.fixture
def kernel(sqlite_server, tmp_path, monkeypatch):
    """A kernelspec for this interpreter, talking to the test server; Jupyter's folders in tmp.

    The kernel gets the server's MLJOBS_HOME too, so the server fixture's leftover check also
    fails a kernel that outlived its notebook."""
    jupyter = tmp_path / "jupyter"
    spec = jupyter / "path" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mljobs tests", "language": "python",
        "env": {"MLJOBS_URL": sqlite_server.url, "MLJOBS_HOME": str(sqlite_server.home)},
    }))
    for var, sub in (("JUPYTER_PATH", "path"), ("JUPYTER_DATA_DIR", "data"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTER_CONFIG_DIR", "config"), ("IPYTHONDIR", "ipython")):
        monkeypatch.setenv(var, str(jupyter / sub))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    yield sqlite_server
    runtime = str(jupyter / "runtime")
    left = [p for p in psutil.process_iter(["pid", "cmdline"]) if runtime in " ".join(p.info["cmdline"] or [])]
    for p in left:
        p.kill()
    assert not left, f"kernels left running: {[p.info['cmdline'] for p in left]}"


def execute(nb: Any, cwd: Path, timeout: int = 600) -> list[str]:
    """Run every cell of ``nb`` (in place) in the test kernel, from ``cwd``; returns the text of
    every display the kernel sent, updates included, in order (the notebook keeps only the last)."""
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, startup_timeout=120,
                                     resources={"metadata": {"path": str(cwd)}})
    seen: list[str] = []
    process = client.process_message

    def record(msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        if msg["msg_type"] in ("display_data", "update_display_data"):
            seen.append(msg["content"]["data"].get("text/plain", ""))
        return process(msg, cell, cell_index)

    client.process_message = record
    client.execute()
    return seen


def outputs(cell: Any, kind: str) -> str:
    """The text of a cell's outputs: ``stdout``/``stderr`` streams or ``display`` (display data
    and results, as text/plain)."""
    out = []
    for o in cell.get("outputs", []):
        if kind in ("stdout", "stderr") and o["output_type"] == "stream" and o["name"] == kind:
            out.append(o["text"])
        elif kind == "display" and o["output_type"] in ("display_data", "execute_result"):
            out.append(o["data"].get("text/plain", ""))
    return "".join(out) if kind != "display" else "\n".join(out)


def _displays(cell: Any) -> list[str]:
    return [o["data"].get("text/plain", "") for o in cell.get("outputs", []) if o["output_type"] == "display_data"]


def test_xgb_classifier_notebook(kernel):
    """The example notebook end to end: one training job with its progress line, ten jobs at once
    with a notebook-defined class coming back as itself, and list_jobs."""
    path = ROOT / "examples" / "xgb_classifier_nb" / "xgb_classifier.ipynb"
    nb = nbformat.read(path, as_version=4)
    execute(nb, path.parent)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(outputs(c, "stderr") for c in code), [outputs(c, "stderr") for c in code]
    result_cell = next(c for c in code if "job.result(" in c.source)
    printed = outputs(result_cell, "stdout")
    assert " accuracy 0.9" in printed, printed
    job_id = JOB_ID.search(printed).group(0)
    shown = _displays(result_cell)  # the progress line, left at the final status
    assert len(shown) == 1 and shown[0].startswith(f"{job_id} DONE after "), shown
    sweep = next(c for c in code if "sweep_point(depth)" in c.source)
    assert re.search(r"10 jobs; best max_depth \d+: cv accuracy 0\.9\d+ True", outputs(sweep, "stdout")), \
        outputs(sweep, "stdout")
    listed = outputs(code[-1], "display")
    assert listed.count("DONE") == 11 and "DEMO_POOL_SWEEP" in listed and job_id in listed, listed


NOTEBOOK_JOBS = [
    # 0: a helper module beside the notebook, and a pool of one node
    """
    import pathlib, sqlite3
    from mljobs import create_compute_pool, remote
    from mljobs.errors import PayloadError

    pathlib.Path("nb_helpers.py").write_text("SCALE = 3\\ndef scale(x):\\n    return x * SCALE\\n")
    import nb_helpers

    create_compute_pool("NB_ONE", instance_family="CPU_X64_XS", max_nodes=1)
    """,
    # 1: a class, an exception, a global and a helper, all of the notebook
    """
    class Point:
        def __init__(self, x):
            self.x = x

    class NotebookError(Exception):
        pass

    OFFSET = 10

    def shift(p):
        return Point(nb_helpers.scale(p.x) + OFFSET)

    @remote("NB_ONE", stage_name="st")
    def move(p: Point, seconds: float = 0.0) -> Point:
        import time
        time.sleep(seconds)
        print("moving", p.x, flush=True)
        return shift(p)

    @remote("NB_ONE", stage_name="st")
    def fail():
        raise NotebookError("raised in the job")
    """,
    # 2: a job queued behind another: its progress line says why it waits
    """
    blocker = move(Point(1), 3.0)
    queued = move(Point(2), 1.5)
    print("queued", queued.id)
    moved = queued.result(timeout=120)
    print("moved", type(moved).__name__, moved.x, isinstance(moved, Point))
    """,
    # 3: the job's exception is the notebook's own class
    """
    try:
        fail().result(timeout=60)
    except NotebookError as e:
        print("caught NotebookError:", e)
    """,
    # 4: what cannot work is refused at submit, saying why
    """
    conn = sqlite3.connect(":memory:")

    @remote("NB_ONE", stage_name="st")
    def query():
        return conn.execute("select 1").fetchall()

    @remote("NB_ONE", stage_name="st")
    def shell():
        out = !echo hi
        return out

    for fn in (query, shell):
        try:
            fn()
        except PayloadError as e:
            print("refused:", e)
    """,
    # 5: show_logs(follow=True): the log lines, and the progress line above them
    """
    followed = move(Point(5), 1.5)
    followed.show_logs(follow=True)
    """,
    # 6: progress=False shows nothing
    """
    quiet = move(Point(6), 1.0)
    print(quiet.result(progress=False).x)
    """,
]


def test_notebook_functions_and_progress(kernel, tmp_path):
    """Functions, classes, exceptions and helper modules of a notebook run as jobs; magics and
    unpicklable globals are refused with the reason; wait/result/show_logs show a live line."""
    work = tmp_path / "nb"
    work.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(textwrap.dedent(c).strip())
                                         for c in NOTEBOOK_JOBS])
    seen = execute(nb, work, timeout=300)
    cells = nb.cells
    assert not any(outputs(c, "stderr") for c in cells), [outputs(c, "stderr") for c in cells]

    queued = re.search(r"queued (MLJOB_\S+)", outputs(cells[2], "stdout")).group(1)
    assert "moved Point 16 True" in outputs(cells[2], "stdout")
    lines = [s for s in seen if s.lstrip("⏳ ").startswith(queued)]
    assert any(re.search(r"PENDING for [\d.]+s: pool busy: 1/1 nodes in use", s) for s in lines), lines
    assert any(" RUNNING for " in s for s in lines), lines
    assert lines[-1].startswith(f"{queued} DONE after ") and "(queued " in lines[-1], lines
    assert _displays(cells[2]) == [lines[-1]]  # one line, updated in place

    assert "caught NotebookError: raised in the job" in outputs(cells[3], "stdout")

    refused = outputs(cells[4], "stdout")
    assert "function 'query' cannot be pickled: it uses the global 'conn' (sqlite3.Connection)" in refused
    assert "function 'shell' uses IPython magics or shell escapes" in refused

    assert outputs(cells[5], "stdout") == "moving 5\n"
    followed = _displays(cells[5])
    assert len(followed) == 1 and JOB_ID.match(followed[0]) and " DONE after " in followed[0], followed

    assert outputs(cells[6], "stdout") == "28\n" and not _displays(cells[6])


PLAIN_SCRIPT = """
import sys
from mljobs import create_compute_pool, remote

create_compute_pool("ONE", instance_family="CPU_X64_XS", max_nodes=1, if_not_exists=True)

@remote("ONE", stage_name="st")
def nap(x):
    import time
    time.sleep(1.0)
    print("napped", x, flush=True)
    return x

first, second = nap(1), nap(2)
print("result", second.result())  # queued behind the first
print("waited", first.wait().value)
third = nap(3)
third.show_logs(follow=True)
print("---", file=sys.stderr, flush=True)
print("forced", nap(4).result(progress=True))
"""


def _tty_run(script: str, env: dict[str, str], timeout: float = 120) -> tuple[str, str, int]:
    """Run ``python -c script`` with stderr on a pseudo-terminal and stdout on a pipe."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=slave,
                            stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    tty = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                tty += chunk
            elif proc.poll() is not None:
                break
        out = proc.stdout.read().decode()
        proc.wait(30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out, tty.decode(errors="replace"), proc.returncode


def test_progress_only_where_interactive(sqlite_server):
    """A pipe gets nothing but the script's own output (progress=True: plain lines on stderr);
    a terminal gets a spinner line on stderr, and stdout stays the same."""
    env = dict(os.environ, MLJOBS_URL=sqlite_server.url, MLJOBS_HOME=str(sqlite_server.home), TERM="xterm",
               COLUMNS="200")
    env.pop("MLJOBS_PROGRESS", None)
    expected = "result 2\nwaited DONE\nnapped 3\nforced 4\n"

    plain = subprocess.run([sys.executable, "-c", PLAIN_SCRIPT], env=env, capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == expected
    before, _, forced = plain.stderr.partition("---\n")
    # not a TTY, not a notebook: no progress; only the pending notes logged as before
    assert all(re.match(r"mljobs: job MLJOB_\S+ is PENDING: pool busy", line) for line in before.splitlines()), before
    forced_lines = forced.splitlines()
    assert len(forced_lines) >= 2 and all(JOB_ID.match(line, len("mljobs: ")) for line in forced_lines), forced
    assert re.search(r" (PENDING|RUNNING) for [\d.]+s", forced_lines[0]), forced
    assert " DONE after " in forced_lines[-1], forced

    out, tty, code = _tty_run(PLAIN_SCRIPT, env)
    assert code == 0, tty
    assert out == expected  # stdout unchanged
    assert "\x1b[" in tty and JOB_ID.search(tty), tty  # a rich line, redrawn in place
    assert re.search(r"MLJOB_\S+ PENDING for [\d.]+s: pool busy: 1/1 nodes in use", tty), tty
    assert re.search(r"MLJOB_\S+ RUNNING for [\d.]+s", tty), tty
    assert "mljobs: job" not in tty  # the line replaces the pending notes


needs_netns = pytest.mark.skipif(netns.unavailable_reason() is not None,
                                 reason=f"multi-node notebooks need network namespaces: {netns.unavailable_reason()}")


@pytest.mark.multinode
@needs_netns
def test_distributed_xgb_classifier_notebook(kernel):
    """The 3-instance notebook: Parquet on a stage, XGBEstimator on the job's Ray cluster, the
    Booster scored here; the job leaves no namespace, Ray process or Ray folder behind."""
    path = ROOT / "examples" / "distributed_xgb_classifier_nb" / "distributed_xgb_classifier.ipynb"
    nb = nbformat.read(path, as_version=4)
    seen = execute(nb, path.parent, timeout=900)
    code = [c for c in nb.cells if c.cell_type == "code"]
    printed = "".join(outputs(c, "stdout") for c in code)
    job_id = JOB_ID.search(printed).group(0)
    assert f"job {job_id} on 3 nodes" in printed
    assert re.search(rf"{job_id} test accuracy 0\.9\d*", printed), printed
    assert "Available nodes: 3" in printed and "trained on 3 workers" in printed, printed
    assert any(s.lstrip("⏳ ").startswith(f"{job_id} RUNNING for ") and "3/3 instances up" in s for s in seen), seen
    assert any(s.startswith(f"{job_id} DONE after ") for s in seen), seen
    assert not netns.list_job_namespaces(job_id)
    paths = HomePaths(kernel.home)
    left = [d for i in range(3) if os.path.exists(d := ray_temp_dir(paths.instance(job_id, i).run_dir))]
    assert not left, f"Ray temp folders left behind: {left}"


def test_notebook_entrypoint_refused(lite, tmp_path):
    """A notebook file is not a Python entrypoint: refused at submit, saying what to do instead."""
    from mljobs import submit_directory, submit_file
    from mljobs.errors import InvalidArgumentError

    nb = tmp_path / "train.ipynb"
    nb.write_text(nbformat.writes(nbformat.v4.new_notebook()))
    with pytest.raises(InvalidArgumentError, match="nbconvert --to script train.ipynb"):
        submit_file(nb, "DEFAULT_POOL", stage_name="st", session=lite)
    with pytest.raises(InvalidArgumentError, match="is a Jupyter notebook"):
        submit_directory(tmp_path, "DEFAULT_POOL", entrypoint="train.ipynb", stage_name="st", session=lite)
