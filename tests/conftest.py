"""Shared fixtures: a real mljobs server per test module, on SQLite or PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

if os.environ.get("PYTEST_XDIST_WORKER"):
    # a pytest-xdist worker starts with COLUMNS=80 and LINES=24 (it has no terminal): the tests'
    # subprocesses (the CLI's tables, uv's messages) would wrap at 80 columns where a serial run's
    # do not; the worker's tests see the environment a serial run's see
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)

PG_URL = os.environ.get("MLJOBS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pg_available() -> str | None:
    """None if PostgreSQL answers, else the reason."""
    try:
        eng = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with eng.connect() as c:
            c.execute(sa.text("select 1"))
        eng.dispose()
        return None
    except Exception as e:  # noqa: BLE001
        return f"no PostgreSQL answers at {PG_URL}: {e}"


# How pytest-xdist (``-n N``, scripts/test) shares the modules out: a module's tests stay on one
# worker (its module-scoped server starts once), and these modules, which share one session-scoped
# cluster whose namespaces have fixed names, stay together on one worker.
SHARED_WORKER = {"tests/integration/test_slurm.py": "slurm", "tests/integration/test_slurm_cluster.py": "slurm"}
# The modules that take longest start first (measured: docs/testing.md), so that no long one is
# left alone at the end; the rest keep their order.
LONGEST_FIRST = ["test_airflow.py", "test_slurm_cluster.py", "test_slurm.py", "test_multinode.py",
                 "test_modeling.py", "test_examples_cli.py", "test_notebooks.py", "test_faults.py",
                 "test_ray_provider.py", "test_isolation.py", "test_environments.py"]


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SHARED_WORKER.get(module, module)

    config.option.loadscopereorder = False  # the modules' order (below), not by their number of tests
    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


class ServerProc:
    """A real `mljobs server start` process with its own MLJOBS_HOME."""

    def __init__(self, home: Path, database_url: str | None = None, extra_env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.home, self.database_url, self.extra_env = home, database_url, dict(extra_env or {})
        self.args = list(args or [])  # more `mljobs server start` options, e.g. ["--host", ADDRESS]
        self.prefix: list[str] = []  # what the command runs under, e.g. nsenter into a namespace
        self.token: str | None = None  # an admin's, for a server with users
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def env(self) -> dict[str, str]:
        env = dict(os.environ, MLJOBS_HOME=str(self.home), MLJOBS_GRACE_PERIOD_S="1")
        env.pop("MLJOBS_URL", None)
        if self.database_url:
            env["MLJOBS_DATABASE_URL"] = self.database_url
        else:
            env.pop("MLJOBS_DATABASE_URL", None)
        env.update(self.extra_env)
        return env

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a request to the server (a subclass runs it where the server is reachable)."""
        return fn(*args, **kwargs)

    def start(self) -> str:
        self.home.mkdir(parents=True, exist_ok=True)
        info = self.home / "server.json"
        info.unlink(missing_ok=True)
        log = open(self.home / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "mljobs", "server", "start", *self.args],
                                     env=self.env(), stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if info.exists():
                self.url = json.loads(info.read_text())["url"]
                import httpx

                try:
                    if self.call(httpx.get, self.url + "/health", timeout=1).status_code == 200:
                        return self.url
                except httpx.HTTPError:
                    pass
            assert self.proc.poll() is None, (self.home / "server.log").read_text()
            time.sleep(0.05)
        raise AssertionError("server did not start: " + (self.home / "server.log").read_text())

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server process only (jobs keep running)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(30)

    def stop(self) -> None:
        """Stop the server and every job (as `mljobs server stop`)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        import httpx

        try:
            self.call(httpx.post, self.url + "/api/v1/server/shutdown", timeout=30,
                      headers={"Authorization": f"Bearer {self.token}"} if self.token else None)
        except httpx.HTTPError:
            pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def leftover_processes(home: Path) -> list[psutil.Process]:
    """Processes whose environment or command line mentions this MLJOBS_HOME, or, for mljobs' own
    (a spawner's or supervisor's title replaces both), whose open files lie under it."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if str(home) in cmd or p.environ().get("MLJOBS_HOME") == str(home) or (
                    cmd.startswith("mljobs-") and any(f.path.startswith(f"{home}/") for f in p.open_files())):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def add_users(srv: ServerProc) -> dict[str, Any]:
    """On a server without users: an admin ``root`` (made by the anonymous local admin) and the
    plain users ``alice`` and ``bob``; a Session of each, by name."""
    from mljobs.client.session import Session

    root = Session(url=srv.url).request("POST", "/users", json={"name": "root", "admin": True}).json()["token"]
    srv.token = root  # its stop() asks for the shutdown as an admin (else it waits a minute, then kills it)
    sessions = {"root": Session(url=srv.url, token=root)}
    for name in ("alice", "bob"):
        token = sessions["root"].request("POST", "/users", json={"name": name}).json()["token"]
        sessions[name] = Session(url=srv.url, token=token)
    return sessions


def kill_all(pids: list[int]) -> None:
    """SIGKILL each of ``pids``; one that ended since it was listed (a short-lived process) is skipped."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def http_origin(body: Any) -> Any:
    """A local HTTP server on 127.0.0.1 standing in for a host on the internet: it answers each
    GET with ``body(handler)`` (bytes), and each POST the same once it has read the request's
    body (``handler.posted``). Call ``shutdown()`` and ``server_close()`` when done."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.posted = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            data = body(self)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


class UpstreamProxy:
    """A server's own outbound HTTP proxy, on 127.0.0.1 (as a company's is): it serves CONNECT and
    absolute-form requests to the names it knows (``names``: name -> a port on 127.0.0.1, the
    internet it reaches), answers 403 for any other, and keeps each request's first line and its
    ``Proxy-Authorization`` in ``seen``. ``close()`` when done."""

    def __init__(self, names: dict[str, int]) -> None:
        import threading

        self.names, self.seen = dict(names), []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        import threading
        from urllib.parse import urlsplit

        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                conn.close()
                return
            buf += data
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        auth = next((ln.split(":", 1)[1].strip() for ln in lines[1:] if ln.lower().startswith("proxy-authorization:")), None)
        self.seen.append((lines[0], auth))
        if method == "CONNECT":  # any port of a name it knows: the port it maps the name to
            host = target.rsplit(":", 1)[0]
            rest = b""
        else:
            parts = urlsplit(target)
            host = parts.hostname or ""
            first = f"{method} {parts.path or '/'}{'?' + parts.query if parts.query else ''} {version}"
            rest = "\r\n".join([first, *lines[1:], "", ""]).encode("latin-1") + body
        if host not in self.names:
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            conn.close()
            return
        up = socket.create_connection(("127.0.0.1", self.names[host]))
        if method == "CONNECT":
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            rest = body
        if rest:
            up.sendall(rest)

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        t = threading.Thread(target=pipe, args=(up, conn), daemon=True)
        t.start()
        pipe(conn, up)
        t.join(30)
        conn.close()
        up.close()


def host_pids(inner: list[int], job_id: str) -> list[int]:
    """Pids a job recorded (``os.getpid()``, ``Popen.pid``) as this machine numbers them: in its
    sandbox a job sees the numbers of its own PID namespace (the last of each process's NSpid).
    The namespace is found by a child of the job (the payload's own environment is set after
    its exec, so its child processes are the ones that show ``MLJOBS_JOB_ID``)."""
    procs: dict[int, tuple[str, int]] = {}  # host pid -> (its PID namespace, its pid there)
    ns_of_job = None
    for p in psutil.process_iter():
        try:
            with open(f"/proc/{p.pid}/status") as f:
                nspid = next(line for line in f if line.startswith("NSpid:")).split()[1:]
            procs[p.pid] = (os.readlink(f"/proc/{p.pid}/ns/pid"), int(nspid[-1]))
            if p.environ().get("MLJOBS_JOB_ID") == job_id:
                ns_of_job = procs[p.pid][0]
        except (psutil.Error, OSError, StopIteration):
            continue
    assert ns_of_job is not None, f"no process of job {job_id} found"
    host = {inner_pid: pid for pid, (ns, inner_pid) in procs.items() if ns == ns_of_job}
    return [host[i] for i in inner]


RAY_DAEMONS = ("gcs_server", "raylet", "plasma_store")


def mine(p: psutil.Process) -> bool:
    """Whether a process was started by this test process (or its servers and their jobs): under
    pytest-xdist every worker's processes carry its PYTEST_XDIST_WORKER or descend from it, so one
    worker's checks never see another's Ray or jobs; without xdist every process is this run's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return True
    try:  # a sandboxed job's processes get none of the server's variables: theirs by descent
        return p.environ().get("PYTEST_XDIST_WORKER") == worker or any(a.pid == os.getpid() for a in p.parents())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def ray_processes() -> list[psutil.Process]:
    """Ray's daemons and anything running from a local job's Ray folder, of this test process."""
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if (p.info["name"] in RAY_DAEMONS or "/tmp/mljr-" in cmd) and mine(p):
            out.append(p)
    return out


def job_ids_under(root: Path) -> set[str]:
    """The ids of every job that a server whose MLJOBS_HOME lies under ``root`` ran (each keeps
    its log folder)."""
    return {d.name for d in root.glob("**/logs/MLJOB_*") if d.is_dir()}


def assert_no_ray_left(basetemp: Path, timeout: float = 15.0) -> None:
    """No Ray process, job network namespace or local Ray folder of the jobs run under
    ``basetemp`` (this test process's temporary root) is left."""
    from mljobs.paths import HomePaths
    from mljobs.providers import local, netns

    deadline = time.monotonic() + timeout
    while (left := ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"Ray processes left running: {[(p.pid, p.info['cmdline']) for p in left]}"
    alone = os.environ.get("PYTEST_XDIST_WORKER") is None  # then all of them are this run's
    if netns.unavailable_reason() is None:
        ids = job_ids_under(basetemp)
        namespaces = [n for n in netns.list_job_namespaces()
                      if alone or any(n.startswith(netns.namespace(j, "")) for j in ids)]
        assert not namespaces, f"job namespaces left: {namespaces}"
    temp = {local.ray_temp_dir(HomePaths(logs.parents[1]).instance(logs.name, i).run_dir)
            for logs in basetemp.glob("**/logs/MLJOB_*") for i in range(16)}
    left_dirs = [d for d in Path("/tmp").glob("mljr-*") if alone or str(d) in temp]
    assert not left_dirs, f"Ray temp folders left behind: {left_dirs}"


def assert_no_leftovers(home: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := leftover_processes(home)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, f"processes left running: {[(p.pid, p.info['cmdline']) for p in left]}"


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    reason = pg_available()
    if reason:
        print(f"SKIP PostgreSQL half: {reason}")
        pytest.skip(reason)
    schema = "mljobs_test_" + uuid.uuid4().hex[:10]
    eng = sa.create_engine(PG_URL)
    with eng.begin() as c:
        c.execute(sa.text(f"CREATE SCHEMA {schema}"))
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with eng.begin() as c:
        c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    eng.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A running server on each store; torn down with every job, leaving no process behind."""
    home = tmp_path_factory.mktemp("mlh")
    db = request.getfixturevalue("pg_schema_url") if request.param == "postgres" else None
    srv = ServerProc(home, db)
    srv.start()
    yield srv
    srv.stop()
    assert_no_leftovers(home)


@pytest.fixture
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    home = tmp_path_factory.mktemp("mlh")
    srv = ServerProc(home)
    srv.start()
    yield srv
    srv.stop()
    assert_no_leftovers(home)


@pytest.fixture
def session(server: ServerProc):
    from mljobs.client.session import Session

    s = Session.builder.config("url", server.url).create()
    yield s
    s.close()


@pytest.fixture
def lite(sqlite_server: ServerProc):
    """A session on a SQLite server (for tests whose store does not matter)."""
    from mljobs.client.session import Session

    s = Session.builder.config("url", sqlite_server.url).create()
    yield s
    s.close()


def wait_status(job, statuses: set[str], timeout: float = 30.0, allowed: set[str] | None = None) -> str:
    """Poll until the job reaches one of ``statuses``; every status seen on the way must be allowed."""
    deadline = time.monotonic() + timeout
    allowed = (allowed or {"PENDING", "RUNNING"}) | statuses
    while time.monotonic() < deadline:
        s = job.status.value
        assert s in allowed, f"illegal in-between status {s} for {job.id}"
        if s in statuses:
            return s
        time.sleep(0.05)
    raise AssertionError(f"job {job.id} still {job.status} after {timeout}s")


S3_CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_endpoint(monkeypatch) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 standing in for a bucket; this process's fsspec reaches it
    through the variables set here."""
    import moto.server as moto_server

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    for k, v in {**S3_CREDS, "AWS_ENDPOINT_URL_S3": url}.items():
        monkeypatch.setenv(k, v)
    yield url
    server.stop()
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps one per arguments: the next server has another port


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Any]:
    """A real Slurm cluster (scripts/slurm_cluster.py: slurmctld and three slurmd, each node its own
    network namespace and host name), up for the session; state in MLJOBS_TEST_SLURM_DIR (default
    /tmp/mljobs-test-slurm). Skipped, with the reason printed, only where it cannot be made (not
    root, no nsenter/unshare/ip, Slurm missing and apt-get cannot install it); a failing start on a
    capable machine fails, as does one while a ``scripts/slurm-cluster up`` cluster runs (the
    namespace names are shared; MLJOBS_SLURM_INSTANCE=x gives the tests their own)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import slurm_cluster as sc

    reason = sc.unavailable_reason()
    cluster = sc.Cluster(os.environ.get("MLJOBS_TEST_SLURM_DIR")
                         or sc.DEFAULT_DIR.replace("mljobs-slurm", "mljobs-test-slurm"))
    if reason is None:
        try:
            cluster.install()
        except sc.InstallError as e:
            reason = str(e)
    if reason:
        print(f"SKIP Slurm tests: {reason}")
        pytest.skip(f"the Slurm tests need a Slurm cluster here: {reason}")
    cluster.up(quiet=True)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        cluster.down(quiet=True)
