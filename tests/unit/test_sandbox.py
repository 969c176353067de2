"""The sandbox's command line and policy (mljobs.runtime.sandbox), without running bubblewrap."""

from __future__ import annotations

import os
import sys

import pytest

from mljobs.runtime import sandbox


def _pairs(argv: list[str], flag: str) -> list[tuple[str, str]]:
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == flag]


def test_shared_binds_only_the_system_the_interpreter_and_the_jobs_folders(tmp_path):
    home = str(tmp_path / "home")
    mount = tmp_path / "data"
    mount.mkdir()
    box = sandbox.Policy("shared", home, 300001, ((str(mount), False),), (home + "/envs",), "alice")
    argv = sandbox.payload_argv(box, work="/w", app="/a", out="/o", gpus=None)
    assert ("/", "/") not in _pairs(argv, "--bind")  # not the whole machine
    assert ["--tmpfs", home] == argv[argv.index(home) - 1:argv.index(home) + 1]
    into = sandbox.inside(home)
    assert ("/w", into["work"]) in _pairs(argv, "--bind") and ("/o", into["out"]) in _pairs(argv, "--bind")
    assert ("/a", into["app"]) in _pairs(argv, "--ro-bind") and (str(mount), str(mount)) in _pairs(argv, "--ro-bind")
    assert ["--cap-drop", "ALL"] == argv[argv.index("--cap-drop"):argv.index("--cap-drop") + 2]
    assert "CAP_SETUID" in argv  # the entry takes the uid, which drops it
    assert "--unshare-pid" in argv and "--unshare-ipc" in argv and "--die-with-parent" in argv
    # every folder bwrap must make on the way to a mount point is made walkable (0755), in order
    made = [argv[i + 3] for i, a in enumerate(argv) if a == "--perms" and argv[i + 1] == "0755"]
    assert os.path.join(home, "job") in made
    for p in sandbox.interpreter_paths():  # the folders on the way to the interpreter, unless bound
        parent = os.path.dirname(p)
        assert parent in made or parent in ("/", *sandbox.SYSTEM_DIRS) or parent.startswith(
            tuple(d + "/" for d in sandbox.SYSTEM_DIRS)) or any(parent.startswith(q + "/") or parent == q
                                                                 for q in sandbox.interpreter_paths()), p


def test_personal_binds_the_machine_but_hides_the_servers_home(tmp_path):
    home = str(tmp_path / "home")
    box = sandbox.Policy("personal", home)
    argv = sandbox.payload_argv(box, work="/w", app=None, out="/o", gpus=[0])
    assert ("/", "/") in _pairs(argv, "--bind") and "--tmpfs" in argv
    assert argv.index(home) > argv.index("/")  # hidden after the machine is bound
    assert "CAP_SETUID" not in argv and "--cap-drop" in argv
    made = [argv[i + 1] for i, a in enumerate(argv) if a == "--dir"]
    assert made == [os.path.join(home, "job")]  # nothing of the host is made or changed


def test_only_the_instances_gpus_are_bound(monkeypatch, tmp_path):
    real = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: p.startswith("/dev/nvidia") or real(p))
    box = sandbox.Policy("shared", str(tmp_path))
    argv = sandbox.payload_argv(box, work="/w", app=None, out="/o", gpus=[1, 3])
    devs = [src for src, _ in _pairs(argv, "--dev-bind")]
    assert "/dev/nvidia1" in devs and "/dev/nvidia3" in devs and "/dev/nvidia0" not in devs
    assert "/dev/nvidiactl" in devs
    assert not any(d.startswith("/dev/nvidia") for d, _ in
                   _pairs(sandbox.payload_argv(box, work="/w", app=None, out="/o", gpus=None), "--dev-bind"))


def test_environment_is_the_jobs_not_the_servers(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("PATH", "/usr/bin")
    shared = sandbox.payload_env(sandbox.Policy("shared", "/h"), {"MLJOBS_TOKEN": "t"})
    assert "AWS_SECRET_ACCESS_KEY" not in shared and shared["PATH"] == "/usr/bin" and shared["MLJOBS_TOKEN"] == "t"
    assert shared["HOME"] == sandbox.inside("/h")["work"]
    personal = sandbox.payload_env(sandbox.Policy("personal", "/h"), {})
    assert "AWS_SECRET_ACCESS_KEY" not in personal and personal.get("HOME") == os.environ.get("HOME")


def test_a_personal_job_keeps_the_persons_proxy_and_a_shared_one_never_has_the_servers(monkeypatch):
    """On the host's network a personal job reaches what the person reaches, through their proxy;
    a shared job gets none of the server's (its credentials stay with the supervisor's proxy)."""
    monkeypatch.setenv("HTTPS_PROXY", "http://me:pw@proxy.corp:3128")
    monkeypatch.setenv("no_proxy", "localhost")
    personal = sandbox.payload_env(sandbox.Policy("personal", "/h"), {})
    assert personal["HTTPS_PROXY"] == "http://me:pw@proxy.corp:3128" and personal["no_proxy"] == "localhost"
    for box in (sandbox.Policy("shared", "/h"), sandbox.Policy("shared", "/h", net="proxy")):
        env = sandbox.payload_env(box, {})
        assert "HTTPS_PROXY" not in env and "no_proxy" not in env


def test_policy_round_trip_and_spares():
    box = sandbox.Policy("shared", "/h", 300005, (("/data", True),), ("/h/envs",), "bob")
    assert sandbox.Policy.from_dict(box.to_dict()) == box
    spare = box.template()
    assert spare.uid is None and spare.user is None
    assert spare.takes(box, None) and spare.takes(sandbox.Policy("shared", "/h", 300009, (("/data", True),),
                                                                 ("/h/envs",), "eve"), [])
    assert not spare.takes(box, [0])  # a shared instance with GPUs binds its own devices
    assert not spare.takes(sandbox.Policy("shared", "/h", 1, (), ("/h/envs",)), None)  # other mounts
    personal = sandbox.Policy("personal", "/h")
    assert personal.template().takes(personal, [0])
    assert box.describe() == "sandbox (shared, uid 300005 (bob))" and personal.describe() == "sandbox (personal)"


def test_a_build_runs_as_the_jobs_uid_and_out_only_through_its_proxy(tmp_path):
    home = str(tmp_path / "home")
    build, cache, net = str(tmp_path / "envs" / ".build-k"), str(tmp_path / "envs-uv" / "300001"), str(tmp_path / "n")
    box = sandbox.Policy("shared", home, 300001, (), (), "alice", "open", ("pypi.org",), "proxy")
    argv = sandbox.build_argv(box, build_dir=build, caches=[cache], python=sys.executable, net=net)
    assert (build, build) in _pairs(argv, "--bind") and (cache, cache) in _pairs(argv, "--bind")
    assert ["--tmpfs", home] == argv[argv.index(home) - 1:argv.index(home) + 1]
    assert "--unshare-net" in argv and (net, sandbox.inside(home)["net"]) in _pairs(argv, "--ro-bind")
    assert "CAP_SETUID" in argv and "CAP_SETGID" in argv  # the entry takes the uid, which drops them
    entry = argv[argv.index("--") + 1:]
    assert entry[:5] == [sys.executable, "-s", "-m", "mljobs.runtime.sandbox", "--build"]
    assert entry[entry.index("--uid") + 1] == "300001" and entry[entry.index("--cwd") + 1] == build
    assert entry[entry.index("--egress") + 1] == os.path.join(sandbox.inside(home)["net"], sandbox.BUILD_SOCKET)
    assert entry[-1] == "--"  # the step's own command follows
    with pytest.raises(ValueError, match="proxy"):
        sandbox.build_argv(box, build_dir=build, caches=[cache], python=sys.executable)
    # a server that is not root, egress open: the step runs as it is, in the build folder
    plain = sandbox.Policy("shared", home, None, (), (), "alice")
    argv = sandbox.build_argv(plain, build_dir=build, caches=[cache], python=sys.executable)
    assert argv[-3:] == ["--chdir", build, "--"] and "--unshare-net" not in argv and "CAP_SETUID" not in argv


def test_mounts_are_checked(tmp_path):
    assert sandbox.parse_mounts(None) == ()
    assert sandbox.parse_mounts([str(tmp_path), f"{tmp_path}:rw"]) == ((str(tmp_path), False), (str(tmp_path), True))
    with pytest.raises(ValueError, match="absolute"):
        sandbox.parse_mounts(["data"], "P")
    with pytest.raises(ValueError, match="does not exist"):
        sandbox.parse_mounts([str(tmp_path / "nope")], "P")
    with pytest.raises(ValueError, match="list"):
        sandbox.parse_mounts(str(tmp_path), "P")


def test_take_result_refuses_a_link(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.pkl").symlink_to("/etc/shadow")
    why = sandbox.take_result(out, tmp_path / "result.pkl")
    assert why and "plain file" in why and not (tmp_path / "result.pkl").exists()
    (out / "result.pkl").write_bytes(b"ok")
    assert sandbox.take_result(out, tmp_path / "result.pkl") is None
    assert (tmp_path / "result.pkl").read_bytes() == b"ok"


def test_a_node_agent_hides_its_own_folder_and_takes_a_uid_only_as_root(monkeypatch, tmp_path):
    from mljobs.runtime import agent

    box = sandbox.Policy("shared", "/server/home", 300002, (), ("/server/home/envs",), "bob", "proxy",
                         ("pypi.org",)).to_dict()
    monkeypatch.setattr(sandbox, "probe", lambda: None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    node = agent._node_sandbox(box, tmp_path)
    assert node["home"] == str(tmp_path) and node["readable"] == [str(tmp_path / "envs")]
    assert node["uid"] == 300002 and node["net"] == "proxy" and node["allowed"] == ["pypi.org"]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert agent._node_sandbox(box, tmp_path)["uid"] is None
    monkeypatch.setattr(sandbox, "probe", lambda: "bubblewrap is not installed")
    assert agent._node_sandbox(box, tmp_path) is None
    assert agent._node_sandbox(None, tmp_path) is None


def test_a_build_reads_the_servers_uv_configuration_or_leaves_out_what_it_cannot(tmp_path, monkeypatch):
    """The server's uv configuration files reach a shared build where its uv looks for them; one
    the job's uid cannot read is left out whole (a UV_CONFIG_FILE unset, a file under /etc read as
    empty: uv fails on either otherwise), and the job's log says so."""
    from mljobs.runtime import environment, supervisor

    user = tmp_path / "config" / "uv"
    user.mkdir(parents=True)
    (user / "uv.toml").write_text('extra-index-url = ["https://mirror.example/simple"]\n')
    (user / "uv.toml").chmod(0o644)
    secret = tmp_path / "etc" / "secret.toml"  # not in a parent of MLJOBS_HOME: no sandbox binds one
    secret.parent.mkdir()
    secret.write_text("")
    secret.chmod(0o600)
    for k in ("UV_CONFIG_FILE", "UV_NO_CONFIG", "XDG_CONFIG_DIRS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    box = sandbox.Policy("shared", str(tmp_path / "home"), 300001, (), (), "alice")
    req = environment.EnvRequest(["x"], uid=300001)
    log = supervisor._LogWriter(str(tmp_path / "log"))
    build = supervisor._BuildSandbox(box, req, tmp_path / "envs", tmp_path / "run", log)
    try:
        argv, env = build.wrap(["uv", "--version"], {"PATH": "/usr/bin"}, str(tmp_path / "b"))
        assert (str(user / "uv.toml"), str(user / "uv.toml")) in _pairs(argv, "--ro-bind")
        assert env["XDG_CONFIG_HOME"] == str(tmp_path / "config") and env["HOME"] == "/tmp"
    finally:
        build.close()
    monkeypatch.setenv("UV_CONFIG_FILE", str(secret))
    build = supervisor._BuildSandbox(box, req, tmp_path / "envs", tmp_path / "run", log)
    try:
        argv, env = build.wrap(["uv", "--version"], {"UV_CONFIG_FILE": str(secret)}, str(tmp_path / "b"))
        assert "UV_CONFIG_FILE" not in env and str(secret) not in argv
    finally:
        build.close()
    log.f.close()
    said = (tmp_path / "log").read_text()
    assert f"the server's uv configuration {secret} is not readable by the job's uid (to share it: chmod a+r" in said
    argv = sandbox.build_argv(box, build_dir=str(tmp_path / "b"), caches=[], python=sys.executable,
                              hidden=["/etc/uv/uv.toml"])
    assert ("/dev/null", "/etc/uv/uv.toml") in _pairs(argv, "--ro-bind")
