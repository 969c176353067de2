"""What the control plane decides about a job's sandbox (mljobs.server.isolation), with a store
that says whether there are users and gives uids."""

from __future__ import annotations

import dataclasses
import os

import pytest

from mljobs.config import Settings
from mljobs.errors import ConflictError, InvalidArgumentError, SandboxError
from mljobs.runtime import sandbox
from mljobs.server import isolation as iso


class _Store:
    def __init__(self, users: bool) -> None:
        self.users, self.given = users, {}

    def has_users(self) -> bool:
        return self.users

    def user_uid(self, name: str, first: int, last: int) -> int:
        return self.given.setdefault(name, first + len(self.given))


def _iso(tmp_path, users=False, problem=None, monkeypatch=None, **settings):
    if monkeypatch is not None:
        monkeypatch.setattr(sandbox, "probe", lambda: problem)
    s = dataclasses.replace(Settings(home=tmp_path), **settings)
    return iso.Isolation(s, _Store(users), tmp_path, tmp_path / "envs")


def test_auto_is_personal_without_users_and_shared_with_them(tmp_path, monkeypatch):
    personal = _iso(tmp_path, users=False, monkeypatch=monkeypatch)
    box = sandbox.Policy.from_dict(personal.policy("me"))
    assert box.mode == "personal" and box.uid is None and box.net == "open"
    shared = _iso(tmp_path, users=True, monkeypatch=monkeypatch)
    box = sandbox.Policy.from_dict(shared.policy("alice", allowed=["pypi.org"]))
    assert box.mode == "shared" and box.net == "proxy" and box.allowed == ("pypi.org",)
    if os.geteuid() == 0:  # a server as root gives each user a uid of their own
        assert box.uid == 300000 and box.user == "alice"
        assert sandbox.Policy.from_dict(shared.policy("bob")).uid == 300001
    else:  # one that is not has no other uid to give (the owner's name still picks their uv cache)
        assert box.uid is None and box.user == "alice"
    multi = sandbox.Policy.from_dict(shared.policy("alice", allowed=["pypi.org"], multinode=True))
    assert multi.net == "open"  # its Ray cluster needs its peers: the payload's egress is not filtered...
    assert multi.build_net == "proxy" and multi.allowed == ("pypi.org",)  # ...but its environment's build is
    assert box.build_net == "proxy" and box.template().build_net == "open" and box.template().allowed == ()
    assert shared.filters_egress() and not personal.filters_egress()


def test_egress_open_and_isolation_none(tmp_path, monkeypatch):
    opened = sandbox.Policy.from_dict(_iso(tmp_path, users=True, monkeypatch=monkeypatch, egress="open")
                                      .policy("alice", allowed=["pypi.org"]))
    assert opened.net == opened.build_net == "open" and opened.allowed == ()
    off = _iso(tmp_path, users=True, monkeypatch=monkeypatch, isolation="none")
    assert off.policy("alice") is None and off.describe()["mode"] == "none" and "warning" in off.describe()


def test_without_bubblewrap_personal_runs_unsandboxed_and_shared_refuses(tmp_path, monkeypatch):
    missing = "bubblewrap is not installed: install bubblewrap"
    personal = _iso(tmp_path, users=False, problem=missing, monkeypatch=monkeypatch)
    personal.check_start()  # a warning, not an error
    assert personal.policy("me") is None and personal.describe()["mode"] == "none"
    shared = _iso(tmp_path, users=True, problem=missing, monkeypatch=monkeypatch)
    with pytest.raises(ConflictError, match="--no-isolation"):
        shared.check_start()
    with pytest.raises(SandboxError, match="bubblewrap is not installed"):
        shared.policy("alice")
    # a Slurm node's agent makes the sandbox where its node has bubblewrap: the server's does not matter
    assert sandbox.Policy.from_dict(shared.policy("alice", remote=True)).mode == "shared"


def test_bad_settings_and_mounts_are_named(tmp_path, monkeypatch):
    with pytest.raises(InvalidArgumentError, match="MLJOBS_ISOLATION"):
        _iso(tmp_path, monkeypatch=monkeypatch, isolation="strict")
    with pytest.raises(InvalidArgumentError, match="MLJOBS_EGRESS"):
        _iso(tmp_path, monkeypatch=monkeypatch, egress="closed")
    shared = _iso(tmp_path, users=True, monkeypatch=monkeypatch)
    with pytest.raises(SandboxError, match="does not exist.*alter_compute_pool"):
        shared.policy("alice", [str(tmp_path / "gone")], "P")


def test_a_users_uid_is_kept_and_never_given_to_another(tmp_path):
    """On the real store (SQLite, migrated): a uid per user on first use, kept; a deleted user's
    uid, which may still own files on a shared filesystem, is not given to the next user."""
    from mljobs.server.store import Store

    store = Store(f"sqlite:///{tmp_path / 'mljobs.db'}")
    store.migrate()
    for name, token in (("root", "a" * 64), ("alice", "b" * 64), ("bob", "c" * 64)):
        store.create_user(name, token, name == "root")
    alice, bob = store.user_uid("alice", 310000, 310002), store.user_uid("bob", 310000, 310002)
    assert (alice, bob) == (310000, 310001) and store.user_uid("alice", 310000, 310002) == alice
    store.delete_user("bob")
    store.create_user("carol", "d" * 64, False)
    assert store.user_uid("carol", 310000, 310002) == 310002  # not bob's
    store.create_user("dave", "e" * 64, False)
    with pytest.raises(ConflictError, match="MLJOBS_JOB_UIDS"):
        store.user_uid("dave", 310000, 310002)
    store.engine.dispose()
