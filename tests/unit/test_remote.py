"""The remote-instance bookkeeping (RemoteProvider) and the Slurm provider's parsing, without an engine."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mljobs import logformat
from mljobs.config import Settings
from mljobs.errors import InvalidArgumentError
from mljobs.paths import HomePaths, StagePaths
from mljobs.providers.base import InstanceHandle, InstanceReport, check_options
from mljobs.providers.remote import ENGINE_GONE, ENGINE_PENDING, RemoteProvider, is_shared_url
from mljobs.providers.slurm import parse_sinfo
from mljobs.runtime.agent import instance_id_from_env
from mljobs.spec import PoolSpec
from mljobs.stages import Stage


class Engine(RemoteProvider):
    """RemoteProvider with an engine whose state the test sets."""

    name = "test"
    state: str | None = None

    def validate_pool(self, pool: PoolSpec) -> None:
        check_options(self.name, pool, self.COMMON_OPTIONS)

    def start(self, launch):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def cancel(self, handle: InstanceHandle, grace_period_s: float) -> None:
        self.ask(handle, "cancel")

    def engine_state(self, handle: InstanceHandle) -> str | None:
        return self.state


@pytest.fixture
def provider(tmp_path: Path) -> Engine:
    return Engine(HomePaths(tmp_path / "home"), Settings(home=tmp_path / "home", heartbeat_timeout_s=0.3,
                                                         start_timeout_s=0.8))


def _handle(tmp_path: Path, i: int = 0, count: int = 1) -> InstanceHandle:
    return InstanceHandle("MLJOB_X", i, extra={"count": count, "stage": {"name": "s", "url": str(tmp_path / "stage")}})


def test_reports_land_in_the_instance_files_and_the_exit_fires_the_watch(provider: Engine, tmp_path: Path) -> None:
    h = _handle(tmp_path)
    seen: list[InstanceHandle] = []
    assert provider.watch(h, seen.append)
    line = logformat.format_record(logformat.OUT, "hello")
    assert provider.report(h, InstanceReport(lines=[line], metrics=[{"time": 1.0, "rss_bytes": 5}])) == {
        "action": None, "addresses": None}
    p = provider.paths(h)
    assert p.log_file.read_text() == line
    assert provider.metrics(h) == [{"time": 1.0, "rss_bytes": 5}]
    assert provider.poll(h) is None  # running, heard from just now
    stage = Stage("s", str(tmp_path / "stage"))
    stage.ensure()
    stage.put_bytes(StagePaths("MLJOB_X").instance_result(0), b"envelope")
    provider.report(h, InstanceReport(exit={"exit_code": 0, "cancelled": False, "has_result": True,
                                            "error": {"exc_type": "x", "exc_message": "y"}}))
    assert seen == [h]
    ex = provider.poll(h)
    assert ex is not None and ex.exit_code == 0 and ex.result == b"envelope" and not ex.lost
    assert ex.error == {"exc_type": "x", "exc_message": "y"} and ex.log_tail == ["hello"]
    # a repeated exit report (its reply was lost) changes nothing and is told to stop
    assert provider.report(h, InstanceReport(exit={"exit_code": 1})) == {"action": "stop"}
    assert provider.poll(h).exit_code == 0  # type: ignore[union-attr]


def test_a_silent_instance_is_lost_once_and_for_good(provider: Engine, tmp_path: Path) -> None:
    h = _handle(tmp_path)
    provider.report(h, InstanceReport())
    assert provider.poll(h) is None
    time.sleep(0.4)
    first = provider.poll(h)
    assert first is not None and first.lost and "sent nothing for" in first.log_tail[0]
    again = provider.poll(h)  # the service polls again when it records the exit: same answer
    assert again is not None and again.lost
    assert provider.report(h, InstanceReport(lines=["late\n"])) == {"action": "stop"}


def test_a_node_still_starting_gets_the_start_timeout(provider: Engine, tmp_path: Path) -> None:
    h = _handle(tmp_path)
    assert provider.poll(h) is None  # the engine runs it; no report yet
    time.sleep(0.4)
    assert provider.poll(h) is None  # past the heartbeat timeout, inside the start timeout
    time.sleep(0.5)
    ex = provider.poll(h)
    assert ex is not None and ex.lost and "MLJOBS_START_TIMEOUT_S" in ex.log_tail[0]


def test_queued_by_the_engine_is_not_lost(provider: Engine, tmp_path: Path) -> None:
    h = _handle(tmp_path)
    provider.state = ENGINE_PENDING
    time.sleep(0.4)
    assert provider.poll(h) is None


def test_gone_from_the_engine_without_an_exit_is_lost_after_a_grace(provider: Engine, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import mljobs.providers.remote as remote

    monkeypatch.setattr(remote, "_GONE_GRACE_S", 0.1)
    provider.settings.heartbeat_timeout_s = 60
    h = _handle(tmp_path)
    provider.report(h, InstanceReport())
    provider.state = ENGINE_GONE
    assert provider.poll(h) is None  # the exit report may still be on its way
    time.sleep(0.15)
    ex = provider.poll(h)
    assert ex is not None and ex.lost and "allocation ended" in ex.log_tail[0]


def test_actions_and_addresses(provider: Engine, tmp_path: Path) -> None:
    h0, h1 = _handle(tmp_path, 0, 2), _handle(tmp_path, 1, 2)
    assert provider.report(h0, InstanceReport(address="10.0.0.1", hostname="a"))["addresses"] is None
    assert provider.report(h1, InstanceReport(address="10.0.0.2", hostname="b"))["addresses"] == ["10.0.0.1",
                                                                                                 "10.0.0.2"]
    provider.cancel(h1, 1.0)
    assert provider.report(h1, InstanceReport())["action"] == "cancel"
    assert provider.report(h0, InstanceReport())["action"] is None
    provider.release(h0, 1.0)
    assert provider.report(h0, InstanceReport())["action"] == "release"


def test_options_are_checked_by_name() -> None:
    pool = PoolSpec("P", "CPU_X64_XS", provider="slurm", provider_options={"partiton": "debug"})
    with pytest.raises(InvalidArgumentError, match=r"unknown slurm provider option\(s\) \['partiton'\].*partition"):
        check_options("slurm", pool, {"partition": "the partition"})


def test_shared_urls(tmp_path: Path) -> None:
    assert is_shared_url("s3://bucket/prefix", [])
    assert not is_shared_url(str(tmp_path / "stages" / "x"), [])
    assert is_shared_url(str(tmp_path / "stages" / "x"), [str(tmp_path)])
    assert is_shared_url("file://" + str(tmp_path / "x"), [str(tmp_path)])
    assert not is_shared_url(str(tmp_path) + "-other/x", [str(tmp_path)])


def test_sinfo_parsing() -> None:
    rows = parse_sinfo("debug*|3|2|4000|(null)|up\ngpu|2|8+|64000|gpu:a100:4(S:0-1)|up\nbad line\n")
    assert rows == [
        {"partition": "debug", "default": True, "nodes": 3, "cpus": 2, "memory_mb": 4000, "gpus": 0, "up": True},
        {"partition": "gpu", "default": False, "nodes": 2, "cpus": 8, "memory_mb": 64000, "gpus": 4, "up": True},
    ]


def test_instance_id_from_env() -> None:
    assert instance_id_from_env({"SLURM_PROCID": "2"}) == 2
    assert instance_id_from_env({"MLJOBS_INSTANCE_ID": "1", "SLURM_PROCID": "2"}) == 1
    assert instance_id_from_env({}) == 0


def test_an_agent_sweeps_the_node_folders_of_agents_that_were_killed(tmp_path):
    """A node folder is held (flock) by its agent and the supervisor it forks; one whose holders
    were both killed (so their clean-up never ran) goes at the next agent's start on that node.
    One held by a live process, one just made, and one of an older agent (no hold file) stay."""
    import os
    import subprocess
    import sys

    from mljobs.runtime import agent

    jobs = tmp_path / "jobs"
    dead, live, fresh, old_style = (jobs / n for n in ("J1-0", "J2-0", "J3-0", "J4-0"))
    for d in (dead, live, fresh):
        os.close(agent.hold(d))  # its holder gone at once, as a killed agent's
        (d / "work").mkdir()
    old_style.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(live / agent._HOLD)!r}, os.O_RDWR)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for d in (dead, live, old_style):  # made more than a minute ago
            os.utime(d / agent._HOLD if d != old_style else d, (time.time() - 120, time.time() - 120))
        assert agent.sweep(tmp_path) == ["J1-0"]
        assert not dead.exists() and live.exists() and fresh.exists() and old_style.exists()
    finally:
        holder.kill()
        holder.wait()
    assert agent.sweep(tmp_path) == ["J2-0"]  # its holder gone now
    assert agent.sweep(tmp_path / "nowhere") == []
