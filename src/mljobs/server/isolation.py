"""What the control plane decides about a job's sandbox (:mod:`mljobs.runtime.sandbox`).

The mode comes from the ``isolation`` setting: ``auto`` is ``personal`` on a server without users
and ``shared`` once it has some; ``none`` turns the sandbox off (``--no-isolation``). A personal
server without bubblewrap runs jobs unsandboxed and says so; a shared one refuses to start jobs
(and to start at all) without it, naming the fix.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from mljobs.config import Settings
from mljobs.errors import ConflictError, InvalidArgumentError, NotFoundError, SandboxError
from mljobs.runtime import sandbox

__all__ = ["Isolation", "SETTINGS"]

log = logging.getLogger("mljobs.server")
SETTINGS = ("auto", "personal", "shared", "none")
EGRESS = ("integrations", "open")
_USERS_TTL_S = 1.0
NO_ISOLATION = "mljobs server start --no-isolation (MLJOBS_ISOLATION=none)"


class Isolation:
    """Decides, per instance, which sandbox a job's payload runs in."""

    def __init__(self, settings: Settings, store: Any, home: Path, env_cache: Path) -> None:
        if settings.isolation not in SETTINGS:
            raise InvalidArgumentError(f"isolation {settings.isolation!r} is not one of {', '.join(SETTINGS)} "
                                       "(MLJOBS_ISOLATION)")
        if settings.egress not in EGRESS:
            raise InvalidArgumentError(f"egress {settings.egress!r} is not one of {', '.join(EGRESS)} (MLJOBS_EGRESS)")
        self.egress = settings.egress
        self.setting = settings.isolation
        self.store = store
        self.home = str(home)
        env_cache.mkdir(parents=True, exist_ok=True)  # bound read-only into every sandbox, spares' too
        self.readable = (str(env_cache),)
        self.uids = settings.job_uids
        self.problem = None if self.setting == "none" else sandbox.probe()
        self._lock = threading.Lock()
        self._users: tuple[float, bool] = (0.0, False)
        self._uids: dict[str, int] = {}  # a user's uid never changes once given: read once

    def users_changed(self) -> None:
        with self._lock:
            self._users = (0.0, False)
            self._uids.clear()  # a deleted name may come back as a new user with a new uid

    def mode(self) -> str:
        """``none``, ``personal`` or ``shared``, as in force now."""
        if self.setting != "auto":
            return self.setting
        with self._lock:
            at, has = self._users
        if time.monotonic() - at > _USERS_TTL_S:
            has = self.store.has_users()
            with self._lock:
                self._users = (time.monotonic(), has)
        return "shared" if has else "personal"

    def filters_egress(self) -> bool:
        """Whether jobs reach only what their integrations allow (a shared sandbox, egress not open)."""
        return self.egress == "integrations" and self.mode() == "shared" and not self.problem

    def check_start(self) -> None:
        """A shared server without a working sandbox does not start (unless isolation is off)."""
        if self.problem and self.mode() == "shared":
            raise ConflictError(f"this server has users, so its jobs must run sandboxed, and {self.problem}. "
                                f"To run every job with the server's identity and view anyway: {NO_ISOLATION}")
        if self.problem:
            log.warning("jobs run unsandboxed: %s", self.problem)
        if self.setting == "none":
            log.warning("isolation is off (--no-isolation): every job runs with the server's identity and sees "
                        "all it sees, the store included")

    def policy(self, owner: str, mounts: Any = None, pool: str = "", allowed: list[str] | None = None,
               multinode: bool = False, remote: bool = False) -> dict[str, Any] | None:
        """The sandbox of an instance of ``owner``'s job on a pool with ``mounts`` (None: no sandbox);
        ``allowed``: the hosts its external access integrations allow (a shared sandbox's only way out).
        ``remote``: for a node agent, which makes it where bubblewrap is installed there."""
        mode = self.mode()
        if mode == "none":
            return None
        if self.problem and not remote:
            if mode == "shared":
                raise SandboxError(f"the job cannot run sandboxed: {self.problem}; or turn isolation off: "
                                   f"{NO_ISOLATION}")
            return None
        uid = None
        if mode == "shared" and os.geteuid() == 0:
            try:
                uid = self._uids.get(owner)
                if uid is None:
                    uid = self.store.user_uid(owner, *self.uids)
                    with self._lock:
                        self._uids[owner] = uid
            except NotFoundError:  # no such user (shared mode forced on a server without users)
                uid = self.uids[1]
        try:
            binds = sandbox.parse_mounts(mounts, pool, local=not remote) if mode == "shared" else ()
        except ValueError as e:
            raise SandboxError(f"the job's sandbox cannot be made: {e}. An admin fixes the pool's mounts "
                               f"(alter_compute_pool), or the server runs without isolation ({NO_ISOLATION})") from None
        filtered = mode == "shared" and self.egress == "integrations"
        net = "proxy" if filtered and not multinode else "open"  # a multi-node payload's Ray needs its peers
        return sandbox.Policy(mode, self.home, uid, binds, self.readable, owner if mode == "shared" else None, net,
                              tuple(allowed or ()) if filtered else (), "proxy" if filtered else "open").to_dict()

    def describe(self) -> dict[str, Any]:
        """For /health and ``mljobs server status``."""
        mode = self.mode()
        out: dict[str, Any] = {"setting": self.setting, "mode": mode}
        if mode == "none":
            out["warning"] = "isolation is off: jobs run with the server's identity and see all it sees"
        elif self.problem:
            out["warning"] = (f"jobs cannot start: {self.problem}" if mode == "shared"
                              else f"jobs run unsandboxed: {self.problem}")
            out["mode"] = mode if mode == "shared" else "none"
        else:
            out["sandbox"] = "bubblewrap"
            out["egress"] = "integrations" if mode == "shared" and self.egress == "integrations" else "open"
        return out
