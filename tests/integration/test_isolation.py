"""Isolation on a real server: each job runs in a bubblewrap sandbox (docs/isolation.md).

A server with users runs jobs in *shared* sandboxes: no server state, no other user's files, its own
processes only, a uid of the job owner's own, none of the server's environment. A server without
users runs *personal* ones: the person's files as they see them, the server's state hidden.
bubblewrap is a system package; ``scripts/test`` installs it, and these tests fail without it.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import mljobs
from mljobs.client.session import Session
from mljobs.providers import netns
from mljobs.runtime import sandbox
from tests.conftest import ServerProc, UpstreamProxy, add_users, assert_no_leftovers, http_origin

SECRET = "server-secret-4711"


def _stop(srv: ServerProc, token: str | None) -> None:
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    httpx.post(srv.url + "/api/v1/server/shutdown", headers=headers, timeout=30)
    assert srv.proc is not None
    srv.proc.wait(60)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A server (as root, which these tests run as) with an admin and the users alice and bob."""
    assert sandbox.probe() is None, f"these tests need bubblewrap: {sandbox.probe()}"
    home = tmp_path_factory.mktemp("mlh")
    srv = ServerProc(home, extra_env={"MLJOBS_SERVER_SECRET_FOR_TEST": SECRET, "MLJOBS_JOB_UIDS": "310000-310099"})
    srv.start()
    sessions = add_users(srv)
    yield srv, sessions
    for s in sessions.values():
        s.close()
    _stop(srv, sessions["root"].token)
    assert_no_leftovers(home)
    assert not list((home / "spares").glob("*")), "sandboxed spares' folders left behind"


def _probe(paths: list[str], server_pid: int) -> dict:
    """What a job sees and may do (runs inside the job)."""
    import os

    def can_read(p):
        try:
            with open(p, "rb") as f:
                f.read(1)
            return True
        except OSError:
            return False

    def can_write(d):
        try:
            with open(os.path.join(d, "planted"), "w") as f:
                f.write("x")
            return True
        except OSError:
            return False

    import pwd

    home = os.environ.get("MLJOBS_HOME_FOR_PROBE", "")
    try:
        pw_name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        pw_name = None
    return {
        "pw_name": pw_name,
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
        "readable": [p for p in paths if can_read(p)],
        "home_listing": sorted(os.listdir(home)) if home and os.path.isdir(home) else None,
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "server_visible": os.path.exists(f"/proc/{server_pid}/environ") and can_read(f"/proc/{server_pid}/environ"),
        "env": dict(os.environ),
        "home_writable": bool(home) and can_write(home),
        "cwd_writable": can_write(os.getcwd()),
        "tmp_writable": can_write("/tmp"),
        "root_listing": sorted(os.listdir("/")),
    }


def _run(session: Session, fn, *args, stage: str, env: dict | None = None):
    job = mljobs.remote("DEFAULT_POOL", stage_name=stage, session=session, env_vars=env)(fn)(*args)
    return job, job.result(timeout=120)


def _files_of(home: Path, job_id: str) -> list[str]:
    """Files under ``home`` whose path names ``job_id``. Other tests' jobs on the shared server
    come and go while this walks, so a folder that vanishes mid-walk is skipped, not an error."""
    return [os.path.join(d, f) for d, _, files in os.walk(home) for f in files
            if job_id in os.path.join(d, f) and os.path.isfile(os.path.join(d, f))]


def test_a_users_job_reaches_nothing_of_the_server_or_other_users(shared, tmp_path):
    srv, s = shared
    home = srv.home
    script = tmp_path / "bobs.py"
    script.write_text("__return__ = 'bob-result-0815'\n# bob-stage-secret\n")
    bob_job = mljobs.submit_file(str(script), "DEFAULT_POOL", stage_name="bob_stage", session=s["bob"])
    assert bob_job.result(timeout=120) == "bob-result-0815"
    bobs = _files_of(home, bob_job.id)
    assert any("BOB_STAGE" in p for p in bobs), bobs  # his payload and result, on his stage
    store = [str(home / n) for n in os.listdir(home) if n.startswith("mljobs.db")]
    assert store
    server_pid = srv.proc.pid
    paths = store + bobs + [str(home / "server.json"), str(home / "server.log")]

    alice_job, seen = _run(s["alice"], _probe, paths, server_pid, stage="alice_stage",
                           env={"MLJOBS_HOME_FOR_PROBE": str(home)})
    assert seen["readable"] == [], "the job read the server's state or bob's files"
    assert seen["home_listing"] == ["envs", "job"], "only its own folders (and the read-only env cache) are there"
    assert not seen["home_writable"] and not (home / "planted").exists(), "the job wrote into the server's state"
    assert seen["cwd_writable"] and seen["tmp_writable"]
    assert not seen["server_visible"] and max(seen["pids"]) < 10, seen["pids"]  # its own PID namespace
    assert SECRET not in repr(seen["env"]) and "MLJOBS_SERVER_SECRET_FOR_TEST" not in seen["env"]
    assert seen["env"]["MLJOBS_TOKEN"].startswith("mlj_")  # it still reaches the control plane as alice
    assert seen["env"]["USER"] == seen["pw_name"] == "alice"  # getpass and getpwuid both know the uid
    assert 310000 <= seen["uid"] <= 310099 and seen["uid"] == seen["euid"] == seen["gid"], seen["uid"]
    # "/" holds the system, and the way to the interpreter and the job's folders: nothing else of the host
    bound = [*sandbox.SYSTEM_DIRS, "/dev", "/proc", "/tmp", *sandbox.interpreter_paths(), str(home)]
    assert set(seen["root_listing"]) <= {p.split("/")[1] for p in bound}, seen["root_listing"]
    assert set(os.listdir("/")) - set(seen["root_listing"]), "the host's / has more than the sandbox's"

    _, bob_seen = _run(s["bob"], _probe, [], server_pid, stage="bob_stage")
    assert bob_seen["uid"] != seen["uid"] and 310000 <= bob_seen["uid"] <= 310099  # a uid per user, kept
    _, again = _run(s["alice"], _probe, [], server_pid, stage="alice_stage")
    assert again["uid"] == seen["uid"]
    assert bob_seen["pw_name"] == "bob" and again["pw_name"] == "alice"  # a spare's passwd is rewritten per job

    info = s["alice"].request("GET", f"/jobs/{alice_job.id}").json()
    assert info["instances"][0]["isolation"] == f"sandbox (shared, uid {seen['uid']} (alice), egress by integrations)"
    health = s["alice"].server_info()
    assert health["isolation"]["mode"] == "shared" and health["isolation"]["sandbox"] == "bubblewrap"


def _get(urls: list[str]) -> dict:
    """Each URL through the job's HTTP_PROXY, even a loopback one (the origin standing in for the
    internet is on the host's loopback, which NO_PROXY keeps for the instance's own), then the
    first URL directly: its body, or the error's code."""
    import http.client
    import os
    import urllib.parse
    import urllib.request

    proxy = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
    out = {"no_proxy": os.environ["NO_PROXY"]}
    for url in urls:  # an absolute-form request to the proxy (urllib's own would honour NO_PROXY)
        c = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=20)
        c.request("GET", url)
        r = c.getresponse()
        out[url] = r.read().decode() if r.status == 200 else f"HTTPError: {r.status}"
        c.close()
    try:
        out["direct"] = urllib.request.urlopen(urls[0], timeout=20).read().decode()
    except Exception as e:  # noqa: BLE001
        out["direct"] = type(e).__name__
    return out


def _two_nodes(paths: list[str], server_pid: int, urls: list[str]) -> dict:
    """On a multi-node job's head, with Ray ready: what it sees and reaches, and the other node's."""
    import ray

    ray.init(address="auto")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    other = next(n["NodeID"] for n in nodes if n["NodeManagerAddress"] != ray.util.get_node_ip_address())
    strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(other, soft=False)
    there = ray.get(ray.remote(num_cpus=0, scheduling_strategy=strategy)(_probe).remote(paths, server_pid))
    there_gets = ray.get(ray.remote(num_cpus=0, scheduling_strategy=strategy)(_get).remote(urls))
    return {"nodes": len(nodes), "here": _probe(paths, server_pid), "there": there, "gets": [_get(urls), there_gets]}


@pytest.mark.skipif(netns.unavailable_reason() is not None, reason="multi-node jobs in namespaces need root and iproute2")
def test_a_multi_node_jobs_instances_are_sandboxed_and_reach_one_another(shared):
    """Each instance of a shared server's multi-node job runs in a sandbox of its own, in its
    network namespace on the job's bridge: Ray joins them, neither sees the server's state, and
    each reaches what the job's integrations allow, through its supervisor's proxy, and nothing else."""
    srv, s = shared
    home = srv.home
    store = [str(home / n) for n in os.listdir(home) if n.startswith("mljobs.db")]
    net = http_origin(lambda h: f"hello from {h.path}".encode())
    allowed = f"http://127.0.0.1:{net.server_address[1]}/data"
    blocked = "http://blocked.invalid/x"
    mljobs.create_external_access_integration("MNNET", allowed_hosts=[f"127.0.0.1:{net.server_address[1]}"],
                                              session=s["root"])
    mljobs.create_compute_pool("TWO", instance_family="CPU_X64_XS", max_nodes=2, session=s["root"])
    try:
        job = mljobs.remote("TWO", stage_name="alice_stage", target_instances=2, session=s["alice"],
                            external_access_integrations=["MNNET"])(_two_nodes)(
            store + [str(home / "server.json")], srv.proc.pid, [allowed, blocked])
        seen = job.result(timeout=300)
    finally:
        net.shutdown()
        net.server_close()
        mljobs.drop_external_access_integration("MNNET", session=s["root"])
    assert seen["nodes"] == 2  # the instances reached one another
    for view in (seen["here"], seen["there"]):
        assert view["readable"] == [], "an instance read the server's state"
        assert not view["server_visible"] and SECRET not in repr(view["env"])
        assert 310000 <= view["uid"] <= 310099 and view["pw_name"] == "alice"
    for gets in seen["gets"]:  # on both nodes: the peers directly (Ray's traffic), the rest through the proxy
        assert (gets[allowed], gets[blocked], gets["direct"]) == ("hello from /data", "HTTPError: 403", "URLError"), gets
        bypass = gets["no_proxy"].split(",")
        assert bypass[:3] == ["127.0.0.1", "localhost", "::1"] and len(bypass) == 6 and bypass[-1].endswith(".0/24")
    info = s["alice"].request("GET", f"/jobs/{job.id}").json()
    assert [i["isolation"] for i in info["instances"]] == [
        f"sandbox (shared, uid {seen['here']['uid']} (alice), egress by integrations)"] * 2
    logs = job.get_logs(instance_id=0, verbose=True) + job.get_logs(instance_id=1, verbose=True)
    assert "unsandboxed" not in logs and "egress refused: blocked.invalid:80 is not allowed" in logs


def _ray_nodes_and_proxy() -> dict:
    """On a multi-node job's head: how many nodes Ray joined (a task on the other one too), and its proxy variables."""
    import os

    import ray

    ray.init(address="auto")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    other = next(n["NodeID"] for n in nodes if n["NodeManagerAddress"] != ray.util.get_node_ip_address())
    strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(other, soft=False)
    there = ray.get(ray.remote(num_cpus=0, scheduling_strategy=strategy)(lambda: os.environ.get("NO_PROXY")).remote())
    return {"nodes": len(nodes), "https_proxy": os.environ.get("HTTPS_PROXY"), "no_proxy": os.environ.get("NO_PROXY"),
            "there": there}


@pytest.mark.skipif(netns.unavailable_reason() is not None, reason="multi-node jobs in namespaces need root and iproute2")
def test_a_personal_multi_node_job_keeps_the_persons_proxy_but_not_for_its_peers(tmp_path):
    """A person whose shell sets HTTPS_PROXY (here one that answers nothing): their sandboxed jobs
    keep it, and a multi-node job's NO_PROXY (theirs kept first) adds the loopback, its nodes and
    their /24 on every node, so nothing that reads the variables (requests, curl, gRPC) sends the
    peers' traffic to that proxy; the job's Ray cluster forms across both nodes."""
    home = tmp_path / "mlh"
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens there
    srv = ServerProc(home, extra_env={"HTTPS_PROXY": dead, "HTTP_PROXY": dead, "NO_PROXY": "corp.example"})
    srv.start()
    try:
        s = Session(url=srv.url)
        mljobs.create_compute_pool("TWO", instance_family="CPU_X64_XS", max_nodes=2, session=s)
        seen = mljobs.remote("TWO", stage_name="st", target_instances=2, session=s)(_ray_nodes_and_proxy)().result(
            timeout=300)
        assert seen["nodes"] == 2 and seen["https_proxy"] == dead
        bypass = seen["no_proxy"].split(",")
        assert bypass[:4] == ["corp.example", "127.0.0.1", "localhost", "::1"] and bypass[-1].endswith(".0/24")
        assert seen["there"] == seen["no_proxy"]
    finally:
        _stop(srv, None)
    assert_no_leftovers(home)


def test_what_a_job_writes_on_a_mount_belongs_to_its_user(shared, tmp_path):
    srv, s = shared
    data = tmp_path / "data"
    scratch = tmp_path / "scratch"
    data.mkdir()
    scratch.mkdir()
    scratch.chmod(0o777)
    (data / "train.csv").write_text("a,b\n1,2\n")
    with pytest.raises(mljobs.PermissionDeniedError, match="only an admin"):
        mljobs.create_compute_pool("MOUNTED", instance_family="CPU_X64_XS", max_nodes=1,
                                   provider_options={"mounts": [str(data)]}, session=s["alice"])
    with pytest.raises(mljobs.InvalidArgumentError, match="does not exist"):
        mljobs.create_compute_pool("MOUNTED", instance_family="CPU_X64_XS", max_nodes=1,
                                   provider_options={"mounts": [str(tmp_path / "nope")]}, session=s["root"])
    with pytest.raises(mljobs.InvalidArgumentError, match="absolute"):
        mljobs.create_compute_pool("MOUNTED", instance_family="CPU_X64_XS", max_nodes=1,
                                   provider_options={"mounts": ["data:rw"]}, session=s["root"])
    assert "MOUNTED" not in list(mljobs.list_compute_pools(session=s["root"])["name"])
    mljobs.create_compute_pool("MOUNTED", instance_family="CPU_X64_XS", max_nodes=1,
                               provider_options={"mounts": [str(data), f"{scratch}:rw"]}, session=s["root"])

    @mljobs.remote("MOUNTED", stage_name="alice_stage", session=s["alice"])
    def use(data: str, scratch: str):
        import os

        text = open(os.path.join(data, "train.csv")).read()
        try:
            open(os.path.join(data, "x"), "w").close()
            data_writable = True
        except OSError:
            data_writable = False
        with open(os.path.join(scratch, "model.bin"), "w") as f:
            f.write("weights")
        return text, data_writable, os.getuid()

    text, data_writable, uid = use(str(data), str(scratch)).result(timeout=120)
    assert text == "a,b\n1,2\n" and not data_writable
    assert (scratch / "model.bin").stat().st_uid == uid != 0

    # a mount that went away between the pool's creation and the job: the job fails, saying why
    (scratch / "model.bin").unlink()
    scratch.rmdir()
    job = use(str(data), str(scratch))
    assert job.wait(timeout=120) == "FAILED"
    with pytest.raises(mljobs.JobFailedError) as err:
        job.result()
    assert "sandbox cannot be made" in str(err.value) and str(scratch) in str(err.value)
    assert "--no-isolation" in str(err.value)
    mljobs.drop_compute_pool("MOUNTED", session=s["root"])


# an in-tree PEP 517 backend (no download): its build_wheel is "a package's build code", which
# records what it could see into the wheel it makes
BACKEND = textwrap.dedent('''
    import base64, hashlib, os, socket, urllib.request, zipfile

    def get_requires_for_build_wheel(config_settings=None):
        return []

    def _readable(path):
        try:
            with open(path, "rb") as f:
                return bool(f.read(1)) or True
        except OSError:
            return False

    def _direct(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return "connected"
        except OSError as e:
            return type(e).__name__

    def _proxied(url):
        try:
            return urllib.request.urlopen(url, timeout=20).read().decode()
        except Exception as e:
            return f"{type(e).__name__}: {getattr(e, 'code', '')}"

    def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
        seen = {"store": os.path.exists(STORE), "home": sorted(os.listdir(HOME)) if os.path.isdir(HOME) else None,
                "secret": [k for k, v in os.environ.items() if "4711" in v], "pids": len([p for p in os.listdir("/proc") if p.isdigit()]),
                "uid": os.getuid(), "shadow": _readable("/etc/shadow"), "direct": _direct(ORIGIN_PORT),
                "proxied": _proxied(f"http://127.0.0.1:{ORIGIN_PORT}/from-the-build"), "proxy": os.environ.get("HTTP_PROXY")}
        files = {"probe_pkg/__init__.py": f"BUILT = {seen!r}\\n",
                 "probe_pkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\\nName: probe-pkg\\nVersion: 1.0\\n",
                 "probe_pkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\\nGenerator: t\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}
        record = []
        for name, text in files.items():
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(text.encode())}")
        files["probe_pkg-1.0.dist-info/RECORD"] = "\\n".join(record + ["probe_pkg-1.0.dist-info/RECORD,,"]) + "\\n"
        name = "probe_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
            for f, text in files.items():
                z.writestr(f, text)
        return name
''')


def test_a_shared_jobs_environment_is_built_in_a_sandbox(shared, tmp_path):
    """A package's build code (here an in-tree build backend) runs sandboxed: it sees neither the
    store nor the server's state nor its variables, runs as the job's uid (no /etc/shadow), and
    reaches the network only through a proxy that allows what the job's integrations allow (not
    the origin here); the package comes from a pool mount."""
    srv, s = shared
    origin = http_origin(lambda h: b"the build reached the origin")
    data = tmp_path / "pkgs"
    pkg = data / "probe_pkg"
    pkg.mkdir(parents=True)
    data.chmod(0o755)
    (pkg / "pyproject.toml").write_text('[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
                                        '[project]\nname = "probe-pkg"\nversion = "1.0"\n')
    (pkg / "backend.py").write_text(BACKEND.replace("STORE", repr(str(srv.home / "mljobs.db")))
                                    .replace("HOME", repr(str(srv.home)))
                                    .replace("ORIGIN_PORT", str(origin.server_address[1])))
    mljobs.create_compute_pool("PKGS", instance_family="CPU_X64_XS", max_nodes=1,
                               provider_options={"mounts": [str(data)]}, session=s["root"])
    try:
        @mljobs.remote("PKGS", stage_name="alice_stage", session=s["alice"],
                       pip_requirements=[f"probe-pkg @ file://{pkg}"], external_access_integrations=["PYPI_ACCESS"])
        def built():
            import probe_pkg

            return probe_pkg.BUILT

        job = built()
        seen = job.result(timeout=300)
        assert seen["store"] is False and seen["secret"] == [], seen  # nothing of the server's
        # MLJOBS_HOME holds only the way to the environment being built, to alice's uv cache and to the proxy's socket
        assert seen["home"] == ["envs", "envs-uv", "job"], seen
        assert seen["pids"] < 10, seen  # its own PID namespace
        alice_uid = s["alice"].request("GET", f"/jobs/{job.id}").json()["instances"][0]["isolation"]
        assert f"uid {seen['uid']} (alice)" in alice_uid, (seen["uid"], alice_uid)  # built as alice
        assert seen["shadow"] is False, seen  # what root may read, the build may not
        assert seen["direct"] == "ConnectionRefusedError", seen  # its own network namespace
        assert seen["proxy"] == "http://127.0.0.1:3128" and seen["proxied"] == "HTTPError: 403", seen
        log = job.get_logs(verbose=True)
        assert "reused" not in log
        assert f"egress refused: 127.0.0.1:{origin.server_address[1]} is not allowed" in log, log
    finally:
        origin.shutdown()
        origin.server_close()
        mljobs.drop_compute_pool("PKGS", session=s["root"])


def _wheel(path: Path, name: str, module_text: str) -> Path:
    """A pure-Python wheel of ``name`` 1.0 whose module holds ``module_text``."""
    import base64
    import hashlib
    import zipfile

    mod = name.replace("-", "_")
    files = {f"{mod}/__init__.py": module_text,
             f"{mod}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{mod}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for f, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{f},sha256={digest},{len(text.encode())}")
    files[f"{mod}-1.0.dist-info/RECORD"] = "\n".join(record + [f"{mod}-1.0.dist-info/RECORD,,"]) + "\n"
    whl = path / f"{mod}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return whl


def _env_seen() -> dict:
    """Inside the job: its environment's folder, and who may look into it."""
    import os
    import sys

    st = os.stat(sys.prefix)
    import probe_idx

    return {"prefix": sys.prefix, "uid": st.st_uid, "gid": st.st_gid, "mode": st.st_mode & 0o777,
            "value": probe_idx.VALUE, "me": os.getuid()}


def _peek(path: str) -> str:
    import os

    try:
        return f"listed {len(os.listdir(path))}"
    except OSError as e:
        return type(e).__name__


def test_a_users_environment_comes_through_the_proxy_and_is_theirs_alone(shared, tmp_path):
    """A package downloaded from an index host the job's integration allows comes through the
    build's proxy (the build has no other way out); the environment is alice's: built as her uid
    against her own uv cache, then sealed (root's files, her group's folder, 0750), so bob's jobs
    cannot look into it; without the integration the job is refused at submit, naming host:port."""
    srv, s = shared
    import functools
    import http.server
    import threading

    (tmp_path / "idx").mkdir()
    whl = _wheel(tmp_path / "idx", "probe-idx", "VALUE = 'from-the-index'\n")

    class Files(http.server.SimpleHTTPRequestHandler):  # GET and HEAD (uv asks for both), quietly
        def log_message(self, *args):
            pass

    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Files, directory=str(whl.parent)))
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    port = origin.server_address[1]
    url = f"http://127.0.0.1:{port}/{whl.name}"
    mljobs.create_external_access_integration("LOCALIDX", allowed_hosts=[f"127.0.0.1:{port}"], session=s["root"])
    try:
        with pytest.raises(mljobs.errors.InvalidArgumentError, match=f"127.0.0.1:{port}"):
            mljobs.remote("DEFAULT_POOL", stage_name="alice_stage", session=s["alice"],
                          pip_requirements=[f"probe-idx @ {url}"], external_access_integrations=["PYPI_ACCESS"])(
                _env_seen)()
        job = mljobs.remote("DEFAULT_POOL", stage_name="alice_stage", session=s["alice"],
                            pip_requirements=[f"probe-idx @ {url}"],
                            external_access_integrations=["PYPI_ACCESS", "LOCALIDX"])(_env_seen)()
        seen = job.result(timeout=300)
        assert seen["value"] == "from-the-index"
        assert (seen["uid"], seen["gid"], seen["mode"]) == (os.geteuid(), seen["me"], 0o750), seen
        env = Path(seen["prefix"])
        assert env.parent == srv.home / "envs"
        assert all(os.lstat(p).st_uid == os.geteuid() for p in env.rglob("*")), "a file of the build kept its uid"
        cache = srv.home / "envs-uv" / str(seen["me"])
        st = cache.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (seen["me"], 0o700) and any(cache.iterdir())
        _, bob_sees = _run(s["bob"], _peek, str(env), stage="bob_stage")
        assert bob_sees == "PermissionError", bob_sees
        _, alice_sees = _run(s["alice"], _peek, str(env), stage="alice_stage")
        assert alice_sees.startswith("listed"), alice_sees
    finally:
        origin.shutdown()
        origin.server_close()
        mljobs.drop_external_access_integration("LOCALIDX", session=s["root"])


def _cfg_value() -> str:
    import probe_cfg

    return probe_cfg.VALUE


def test_a_build_uses_the_indexes_of_the_servers_uv_configuration(tmp_path):
    """An index named only in the server's uv.toml (not in its variables): a shared job's sandboxed
    build reads the same file and its proxy lets that index through, as for the server's own uv."""
    import functools
    import http.server
    import threading

    project = tmp_path / "idx" / "simple" / "probe-cfg"
    project.mkdir(parents=True)
    _wheel(project, "probe-cfg", "VALUE = 'from-the-configured-index'\n")

    class Files(http.server.SimpleHTTPRequestHandler):  # a folder's listing is a simple index's page
        def log_message(self, *args):
            pass

    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Files, directory=str(tmp_path / "idx")))
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    config = tmp_path / "config" / "uv"
    config.mkdir(parents=True)
    (config / "uv.toml").write_text(f'[[index]]\nurl = "http://127.0.0.1:{origin.server_address[1]}/simple/"\n'
                                    "default = true\n")
    home = tmp_path / "mlh"
    srv = ServerProc(home, extra_env={"MLJOBS_ISOLATION": "shared", "XDG_CONFIG_HOME": str(tmp_path / "config")})
    srv.start()
    try:
        s = Session(url=srv.url)
        job = mljobs.remote("DEFAULT_POOL", stage_name="st", session=s, pip_requirements=["probe-cfg"],
                            external_access_integrations=["PYPI_ACCESS"])(_cfg_value)()
        assert job.result(timeout=300) == "from-the-configured-index", job.get_logs(verbose=True)
        assert "egress refused" not in job.get_logs(verbose=True)
    finally:
        _stop(srv, None)
        origin.shutdown()
        origin.server_close()
    assert_no_leftovers(home)


def test_personal_sandbox_sees_the_persons_files_not_the_servers(tmp_path):
    """A server without users: the job runs as the person, reads their files by path, writes /tmp,
    but sees nothing of MLJOBS_HOME but its own folders, and not the server's environment."""
    home = tmp_path / "mlh"
    srv = ServerProc(home, extra_env={"MLJOBS_SERVER_SECRET_FOR_TEST": SECRET})
    srv.start()
    try:
        s = Session(url=srv.url)
        mine = tmp_path / "dataset.txt"
        mine.write_text("my data")
        store = [str(home / n) for n in os.listdir(home) if n.startswith("mljobs.db")]
        job, seen = _run(s, _probe, [str(mine), *store], srv.proc.pid, stage="st",
                         env={"MLJOBS_HOME_FOR_PROBE": str(home)})
        assert seen["readable"] == [str(mine)]
        assert seen["uid"] == os.getuid() and seen["home_listing"] == ["envs", "job"]
        assert seen["pw_name"] == pwd.getpwuid(os.getuid()).pw_name
        assert seen["tmp_writable"]
        # MLJOBS_HOME is a tmpfs of its own in there: what the job writes into it never reaches the server's
        assert not (home / "planted").exists()
        assert not seen["server_visible"] and max(seen["pids"]) < 10
        assert "MLJOBS_SERVER_SECRET_FOR_TEST" not in seen["env"] and seen["env"].get("HOME") == os.environ["HOME"]
        info = s.request("GET", f"/jobs/{job.id}").json()
        assert info["instances"][0]["isolation"] == "sandbox (personal)"
        assert s.server_info()["isolation"]["mode"] == "personal"
    finally:
        _stop(srv, None)
    assert_no_leftovers(home)


def test_no_isolation_is_said_and_shown(tmp_path):
    """``mljobs server start --no-isolation`` runs jobs as before, and says so where it is asked."""
    home = tmp_path / "mlh"
    srv = ServerProc(home, args=["--no-isolation"])
    srv.start()
    try:
        s = Session(url=srv.url)
        job, seen = _run(s, _probe, [], srv.proc.pid, stage="st")
        assert seen["server_visible"]  # the whole machine, as the warning says
        iso = s.server_info()["isolation"]
        assert iso["mode"] == "none" and "isolation is off" in iso["warning"]
        assert s.request("GET", f"/jobs/{job.id}").json()["instances"][0]["isolation"] == "none"
        out = subprocess.run([sys.executable, "-m", "mljobs", "server", "status"], env=srv.env(), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and json.loads(out.stdout)["isolation"]["mode"] == "none", out.stdout
        assert "warning: isolation is off" in out.stderr
    finally:
        _stop(srv, None)
    assert_no_leftovers(home)


def _fetch(urls: list[str]) -> dict:
    """Inside the job: each URL through the job's proxy (HTTP_PROXY), and the same host directly."""
    import os
    import socket
    import urllib.parse
    import urllib.request

    import requests

    out = {"proxy": os.environ.get("HTTP_PROXY")}
    for url in urls:
        try:
            out[url] = urllib.request.urlopen(url, timeout=20).read().decode()
        except Exception as e:  # noqa: BLE001
            out[url] = f"{type(e).__name__}: {getattr(e, 'code', '')} {e}"
        r = requests.get(url, timeout=20)  # requests follows HTTP_PROXY too
        out["requests " + url] = r.text if r.ok else f"HTTPError: {r.status_code}"
    parts = urllib.parse.urlsplit(urls[0])
    try:  # around the proxy: the sandbox's own loopback has nothing on that port
        socket.create_connection((parts.hostname, parts.port), timeout=5).close()
        out["direct"] = "connected"
    except OSError as e:
        out["direct"] = type(e).__name__
    return out


def test_a_shared_job_reaches_only_what_its_integrations_allow(shared):
    srv, s = shared
    net = http_origin(lambda h: f"hello from {h.path}".encode())
    port = net.server_address[1]
    try:
        allowed = f"http://127.0.0.1:{port}/data"
        blocked = "http://blocked.invalid/x"  # refused by the proxy, never looked up
        mljobs.create_external_access_integration("LOCALNET", allowed_hosts=[f"127.0.0.1:{port}"],
                                                  session=s["root"])
        job, seen = _run(s["alice"], _fetch, [allowed, blocked], stage="alice_stage")
        assert seen["proxy"] == "http://127.0.0.1:3128"
        assert seen[allowed].startswith("HTTPError: 403") and seen[blocked].startswith("HTTPError: 403")
        assert seen["requests " + allowed] == seen["requests " + blocked] == "HTTPError: 403"
        assert seen["direct"] == "ConnectionRefusedError"
        log = job.get_logs(verbose=True)
        assert f"egress refused: 127.0.0.1:{port} is not allowed" in log
        assert "blocked.invalid:80" in log and "create_external_access_integration" in log

        job = mljobs.remote("DEFAULT_POOL", stage_name="alice_stage", session=s["alice"],
                            external_access_integrations=["LOCALNET"])(_fetch)([allowed, blocked])
        seen = job.result(timeout=120)
        assert seen[allowed] == seen["requests " + allowed] == "hello from /data"
        assert seen["requests " + blocked] == "HTTPError: 403"
        assert seen[blocked].startswith("HTTPError: 403") and seen["direct"] == "ConnectionRefusedError"
        info = s["alice"].request("GET", f"/jobs/{job.id}").json()
        assert info["instances"][0]["isolation"].endswith("egress by integrations)")
    finally:
        net.shutdown()
        net.server_close()
        mljobs.drop_external_access_integration("LOCALNET", session=s["root"])


def _fetch_named(host: str, blocked: str) -> dict:
    """Inside the job: a plain request and a CONNECT tunnel to ``host`` by name, through the job's proxy."""
    import http.client
    import os
    import urllib.parse
    import urllib.request

    out = {"plain": urllib.request.urlopen(f"http://{host}/plain", timeout=20).read().decode()}
    proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
    c = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=20)
    c.set_tunnel(host, 80)
    c.request("GET", "/tunnelled")
    out["tunnel"] = c.getresponse().read().decode()
    try:
        urllib.request.urlopen(f"http://{blocked}/x", timeout=20)
    except Exception as e:  # noqa: BLE001
        out["blocked"] = f"{type(e).__name__}: {getattr(e, 'code', '')}"
    return out


def test_a_server_behind_a_proxy_takes_its_jobs_egress_through_it(tmp_path):
    """A server whose own way out is a proxy (HTTPS_PROXY in its environment, as in a company):
    a shared job's allowed traffic goes on through that proxy, by name (only it resolves the
    internet's names), with its credentials, which the job never sees; what no integration allows
    never reaches it."""
    net = http_origin(lambda h: f"hello from {h.path}".encode())
    up = UpstreamProxy({"origin.test": net.server_address[1]})
    home = tmp_path / "mlh"
    url = f"http://svc:pw@127.0.0.1:{up.port}"
    srv = ServerProc(home, extra_env={"MLJOBS_ISOLATION": "shared", "HTTP_PROXY": url, "HTTPS_PROXY": url,
                                      "NO_PROXY": "127.0.0.1,localhost"})
    srv.start()
    try:
        s = Session(url=srv.url)
        mljobs.create_external_access_integration("ORIGIN", allowed_hosts=["origin.test"], session=s)
        job = mljobs.remote("DEFAULT_POOL", stage_name="st", session=s, external_access_integrations=["ORIGIN"])(
            _fetch_named)("origin.test", "blocked.test")
        seen = job.result(timeout=120)
        assert seen == {"plain": "hello from /plain", "tunnel": "hello from /tunnelled", "blocked": "HTTPError: 403"}
        auth = "Basic " + base64.b64encode(b"svc:pw").decode()
        assert sorted(up.seen) == [("CONNECT origin.test:80 HTTP/1.1", auth),
                                   ("GET http://origin.test/plain HTTP/1.1", auth)]
        assert "egress refused: blocked.test:80 is not allowed" in job.get_logs(verbose=True)
    finally:
        _stop(srv, None)
        up.close()
        net.shutdown()
        net.server_close()
    assert_no_leftovers(home)


def test_cancel_gives_a_sandboxed_payload_its_grace_period(shared):
    """SIGTERM reaches the payload inside its sandbox (not bubblewrap, whose death would SIGKILL it),
    so a training loop can save its state before the grace period ends."""
    srv, s = shared

    @mljobs.remote("DEFAULT_POOL", stage_name="alice_stage", session=s["alice"])
    def careful():
        import signal
        import sys
        import time

        def save(*_):
            print("got SIGTERM: saving the checkpoint", flush=True)
            time.sleep(0.3)
            print("saved", flush=True)
            sys.exit(0)

        signal.signal(signal.SIGTERM, save)
        print("training", flush=True)
        time.sleep(120)

    job = careful()
    deadline = time.monotonic() + 60
    while "training" not in job.get_logs():
        assert time.monotonic() < deadline, job.get_logs(verbose=True)
        time.sleep(0.05)
    job.cancel()
    assert job.wait(timeout=60) == "CANCELLED"
    log = job.get_logs()
    assert "got SIGTERM: saving the checkpoint" in log and "saved" in log, job.get_logs(verbose=True)


def test_a_spare_discarded_while_bubblewrap_sets_up_leaves_nothing(tmp_path):
    """A warm supervisor that lets its spare go at once (the server stopping just after it was made)
    kills bubblewrap during its set-up. Its sandbox init, cloned but not yet armed with its
    parent-death signal, used to be left waiting for its monitor forever (reparented to init)."""
    from mljobs.runtime import containment, supervisor

    assert sandbox.probe() is None, f"this test needs bubblewrap: {sandbox.probe()}"
    home = tmp_path / "home"
    home.mkdir()
    box = sandbox.Policy("personal", str(home))
    plan = containment.Plan("fallback", None, "rss", None)
    pid = os.fork()
    if pid == 0:  # the warm supervisor (it becomes a subreaper: not this test's process)
        code = 1
        try:
            for i in range(60):
                spare = supervisor.Spare(plan, box)
                time.sleep((i * 7 % 20) * 0.001)  # anywhere in bubblewrap's set-up (it hit 2-7 in 60 here)
                spare.discard()
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    deadline = time.monotonic() + 5
    left = [1]
    while left and time.monotonic() < deadline:
        left = [p for p in psutil.process_iter(["cmdline", "status"])
                if str(home) in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    for p in left:
        p.kill()
    assert not left, f"bubblewrap left running: {[(p.pid, p.ppid()) for p in left]}"
    assert not list((home / "spares").glob("*"))
