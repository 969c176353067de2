"""Environment cache logic: keys, LRU eviction, in-use protection, messages, index hosts, and what the
server writes into a built tree (uv venv only; no installs)."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time

import pytest

from mljobs.errors import EnvironmentBuildError
from mljobs.runtime.environment import (LAST_USED, META, EnvCache, EnvRequest, _explain, index_hosts,
                                       normalize_requirements)
from mljobs.server.admission import _index_hosts
from mljobs.spec import JobSpec, PayloadKind


def test_normalized_requirements_ignore_order_case_comments_and_spaces():
    a = normalize_requirements(["Six == 1.16.0", "# comment", "", "humanize==4.9.0  # why", "six==1.16.0"])
    b = normalize_requirements(["humanize==4.9.0", "six==1.16.0"])
    assert a == b == ["humanize==4.9.0", "six==1.16.0"]
    assert normalize_requirements(["--index-url https://x/simple", "Foo_Bar>=1"]) == [
        "--index-url https://x/simple", "foo-bar>=1"]
    assert EnvRequest(a).key() == EnvRequest(b).key()
    assert EnvRequest(a).key() != EnvRequest(a, index={"PIP_INDEX_URL": "https://x/simple"}).key()
    assert EnvRequest(a).key() != EnvRequest(["humanize==4.9.1", "six==1.16.0"]).key()


def _fake_env(cache: EnvCache, key: str, size: int, age_s: float) -> None:
    d = cache.root / key
    d.mkdir(parents=True)
    (d / META).write_text(json.dumps({"key": key, "requirements": [key], "python": "p", "python_version": "3.11.7",
                                      "index": {}, "created": 0, "size_bytes": size}))
    (d / LAST_USED).touch()
    t = time.time() - age_s
    os.utime(d / LAST_USED, (t, t))


def test_prune_evicts_least_recently_used_first_and_never_one_in_use(tmp_path):
    cache = EnvCache(tmp_path, max_bytes=250)
    for key, age in (("old", 300), ("older", 400), ("oldest", 500), ("new", 100)):
        _fake_env(cache, key, 100, age)
    fd = cache._lock("oldest")
    fcntl.flock(fd, fcntl.LOCK_SH)  # a running job uses the oldest one
    try:
        assert [e["key"] for e in cache.entries()] == ["new", "old", "older", "oldest"]
        assert {e["key"]: e["in_use"] for e in cache.entries()}["oldest"] is True
        removed = [e["key"] for e in cache.prune()]
        assert removed == ["older", "old"]  # oldest is in use; 400 -> 200 bytes fits the cap of 250
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["new", "oldest"]
    finally:
        os.close(fd)
    assert [e["key"] for e in cache.prune(0, recent_s=0)] == ["oldest", "new"]


def test_prune_spares_environments_just_used(tmp_path):
    cache = EnvCache(tmp_path, max_bytes=0)
    _fake_env(cache, "fresh", 100, 1)
    assert cache.prune() == []  # its job may not hold the lock yet


def test_failure_message_names_the_requirement_first():
    out = ["  × No solution found when resolving dependencies:",
           "  ╰─▶ Because nosuch was not found in the package registry and you require nosuch==1.0, "
           "we can conclude that your requirements are unsatisfiable."]
    msg = _explain("install", ["humanize==4.9.0", "nosuch==1.0"], out)
    assert msg.startswith("could not install pip requirement(s) nosuch==1.0: No solution found")
    assert "not found in the package registry" in msg


def test_index_hosts_of_a_job():
    def hosts(reqs, env=None):
        return [label for _, _, label in _index_hosts(
            JobSpec("P", "s", PayloadKind.FILE, entrypoint=["a.py"], pip_requirements=reqs, env_vars=env or {}))]

    assert hosts(["x"]) == ["pypi.org", "files.pythonhosted.org"]
    assert hosts(["x"], {"PIP_INDEX_URL": "https://pypi.corp.example/simple",
                         "PIP_EXTRA_INDEX_URL": "https://a.example/s https://b.example/s"}) == [
        "pypi.corp.example", "a.example", "b.example"]
    assert hosts(["pkg @ https://git.example/pkg.whl"]) == ["pypi.org", "files.pythonhosted.org", "git.example"]
    # a port of its own is named (an integration names it so); a local folder reaches no host
    assert hosts(["pkg @ http://10.0.0.5:8080/pkg.whl", "other @ file:///wheels/o.whl"],
                 {"PIP_FIND_LINKS": "/opt/wheels"}) == ["pypi.org", "files.pythonhosted.org", "10.0.0.5:8080"]
    assert index_hosts(["http://idx.example/simple", "https://idx.example:8443/s", "http://[fd00::1]:3141/s"]) == [
        ("idx.example", 80, "idx.example"), ("idx.example", 8443, "idx.example:8443"), ("fd00::1", 3141, "[fd00::1]:3141")]


def _planting(script: str):
    """A build wrap whose venv step, after uv, runs ``script`` in the folder being built (as a
    package's build code could: it leaves links for the server to write through)."""
    def wrap(cmd, env, build_dir):
        if cmd[1] != "venv":
            return cmd, env
        return ["sh", "-c", '"$@" && cd "$MLJOBS_TEST_BUILD" && ' + script, "sh", *cmd], {
            **env, "MLJOBS_TEST_BUILD": build_dir}
    return wrap


def test_what_the_server_writes_after_a_build_step_never_goes_through_a_link_it_left(tmp_path):
    target = tmp_path / "system-file"
    target.write_text("untouched")
    cache = EnvCache(tmp_path / "envs")
    req = EnvRequest([], python=sys.executable)
    env = cache.ensure(req, lambda _: None, 120, _planting(f"ln -s {target} {META}"))
    env.release()
    assert target.read_text() == "untouched"  # the link was replaced, not written through
    assert not os.path.islink(env.path / META) and json.loads((env.path / META).read_text())["key"] == env.key

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    site = "lib/python3*/site-packages"
    with pytest.raises(EnvironmentBuildError, match="leading outside the environment"):
        EnvCache(tmp_path / "envs2").ensure(
            EnvRequest([], python=sys.executable, ship_runtime=True), lambda _: None, 120,
            _planting(f"d=$(echo {site}) && rm -rf $d && ln -s {outside} $d"))
    assert list(outside.iterdir()) == []  # nothing of mljobs copied out through the link


def test_a_builds_proxy_lets_through_the_servers_own_indexes():
    from mljobs.runtime import egress
    from mljobs.runtime.environment import server_index_hosts

    # none named: uv's default, PyPI (mljobs' own runtime packages for another interpreter come from there)
    assert server_index_hosts({}) == ["pypi.org:443", "files.pythonhosted.org:443"]
    assert server_index_hosts({"UV_INDEX_URL": "http://localhost:3141/simple", "PIP_FIND_LINKS": "/opt/wheels",
                               "UV_INDEX": "corp=https://art.corp.example/simple"}) == [
        "localhost:3141", "art.corp.example:443"]  # uv's "name=URL" form; a folder reaches no host
    # a mirror whose name resolves off the internet is let through by the address it has now
    assert "127.0.0.1:3141" in egress.with_addresses(["localhost:3141"])
    assert egress.with_addresses(["10.0.0.5:80"]) == ["10.0.0.5:80"]


def test_the_servers_uv_configuration_names_its_indexes_too(tmp_path):
    """uv reads indexes from its configuration files as well as from variables: the server's own
    count the same (its build proxy lets them through, a sandboxed build reads the same files)."""
    from mljobs.runtime.environment import server_index_hosts, server_index_urls, uv_config_files

    user, system = tmp_path / "home" / ".config" / "uv", tmp_path / "xdg" / "uv"
    user.mkdir(parents=True)
    system.mkdir(parents=True)
    (user / "uv.toml").write_text('extra-index-url = ["https://extra.corp.example/simple"]\n'
                                  '[[index]]\nname = "corp"\nurl = "http://10.1.2.3:3141/simple"\ndefault = true\n')
    (system / "uv.toml").write_text('find-links = ["/opt/site-wheels"]\n[pip]\nextra-index-url = ["https://pip.example"]\n')
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_DIRS": str(tmp_path / "xdg")}
    assert uv_config_files(env) == [("user", str(user / "uv.toml")), ("system", str(system / "uv.toml"))]
    # an index with default = true stands for PyPI: PyPI is not added
    assert server_index_urls(env) == ["https://extra.corp.example/simple", "http://10.1.2.3:3141/simple",
                                      "/opt/site-wheels", "https://pip.example"]
    assert server_index_hosts(env) == ["extra.corp.example:443", "10.1.2.3:3141", "pip.example:443"]
    # without a default index named, PyPI is still uv's default
    (user / "uv.toml").write_text('[[index]]\nurl = "https://more.example/simple"\n')
    assert server_index_urls(env)[-1] == "https://pypi.org/simple"
    # UV_CONFIG_FILE replaces the discovery; UV_NO_CONFIG turns it off; a file uv cannot read names nothing
    assert uv_config_files({**env, "UV_CONFIG_FILE": str(system / "uv.toml")}) == [("file", str(system / "uv.toml"))]
    assert uv_config_files({**env, "UV_NO_CONFIG": "1"}) == [] and len(uv_config_files({**env, "UV_NO_CONFIG": "0"})) == 2
    # a relative folder is the file's neighbour; no-index = true: no PyPI either
    (user / "uv.toml").write_text('no-index = true\nfind-links = ["wheels"]\n')
    assert server_index_urls({"HOME": env["HOME"]}) == [str(user / "wheels")]
    (user / "uv.toml").write_text("not = [toml")
    assert server_index_urls({"HOME": env["HOME"]}) == ["https://pypi.org/simple"]


def test_idle_user_uv_caches_are_pruned_and_a_held_one_is_kept(tmp_path):
    """The per-user uv caches of shared builds (`<env cache>-uv/<uid>`) go once no build used them
    for USER_CACHE_IDLE_S, or at an admin's prune of everything idle; one a build holds stays."""
    from mljobs.runtime import environment as envs

    root = tmp_path / "envs"
    root.mkdir()
    top = envs.user_caches(root)
    for name in ("310000", "310001", "310002"):
        (top / name / "wheels").mkdir(parents=True)
        (top / name / "wheels" / "x.whl").write_bytes(b"x" * 1000)
    held = envs.hold_user_cache(top / "310002")  # a build of 310002 runs now
    month_ago = time.time() - 30 * 86400
    for name in ("310000", "310002"):  # idle for a month (310002's build started long ago)
        os.utime(top / name, (month_ago, month_ago))
    try:
        assert envs.EnvCache(root).prune() == []  # no environment to remove; the idle cache goes
        assert sorted(d.name for d in top.iterdir() if not d.name.startswith(".")) == ["310001", "310002"]
        envs.EnvCache(root).prune(0)  # an admin's prune of everything idle: 310001 too, not the held one
        assert sorted(d.name for d in top.iterdir() if not d.name.startswith(".")) == ["310002"]
    finally:
        os.close(held)
    assert envs.prune_user_caches(root, 0.0) == ["310002"]  # its build ended
    assert not [d for d in top.iterdir() if d.name.startswith(".trash")]
