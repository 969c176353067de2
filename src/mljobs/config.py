"""Settings from the environment and the optional config file ``$MLJOBS_HOME/config.toml``.

Environment variables win over the file. Nothing here starts or imports a server.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 clients
    import tomli as tomllib

__all__ = ["Settings", "load_settings", "default_home"]


def _uid_range(text: str) -> tuple[int, int]:
    try:
        first, last = (int(x) for x in str(text).split("-"))
    except ValueError:
        raise ValueError(f"MLJOBS_JOB_UIDS={text!r} is not a uid range; write FIRST-LAST, e.g. 300000-399999") from None
    if not 0 < first <= last:
        raise ValueError(f"MLJOBS_JOB_UIDS={text!r}: the range must be FIRST-LAST with 0 < FIRST <= LAST")
    return first, last


def default_home() -> Path:
    return Path(os.environ.get("MLJOBS_HOME") or Path.home() / ".mljobs").expanduser()


@dataclasses.dataclass
class Settings:
    home: Path
    url: str | None = None  # a configured control plane; None means the embedded one
    token: str | None = None
    database: str | None = None
    schema: str | None = None
    database_url: str | None = None  # the server's store; None means SQLite under home
    grace_period_s: float = 3.0  # SIGTERM -> SIGKILL on cancel
    create_default_pool: bool = True
    # Installing packages needs an external access integration that allows the index host
    # (shared servers); off for the embedded default.
    strict_egress: bool = False
    env_cache_max_bytes: int = 10 << 30  # job environments kept, least recently used evicted
    install_timeout_s: float = 900.0  # a job's package install, apart from its own run time
    # Instances of a multi-node job: "netns" (each its own network namespace and address, needs
    # root and iproute2), "loopback" (shared loopback, distinct ports) or "auto" (netns if possible).
    node_network: str = "auto"
    job_ttl_days: float = 14.0  # finished jobs, their logs and stage files are removed after this; 0 keeps them
    fair_half_life_h: float = 24.0  # fair share: a user's usage this long ago counts half
    max_payload_bytes: int = 1 << 30  # the largest job payload or stage file the server accepts
    log_keepalive_s: float = 10.0  # a followed log that stays quiet this long gets a keep-alive line
    # How long a store write waits for a lock another process holds (SQLite) before the request
    # fails with 503 StoreBusyError.
    store_busy_timeout_s: float = 30.0
    # How a job's processes are kept together and ended: "auto" (the best the machine allows),
    # "cgroup2", "cgroup1" or "fallback" (parent-death signal and a sweep by the job's marker).
    containment: str = "auto"
    metrics: bool = True  # sample each instance's CPU, memory and GPU use while it runs
    warm_supervisors: int = 2  # supervisors the local provider keeps forked ahead, cgroups made (0: none)
    # What a job may see (mljobs.runtime.sandbox): "auto" (a personal sandbox without users, a
    # shared one once the server has users), "personal", "shared", or "none" (no sandbox).
    isolation: str = "auto"
    job_uids: tuple[int, int] = (300000, 399999)  # the uids users' sandboxed jobs run as (server as root)
    # A shared sandbox's network: "integrations" (its own namespace, out only through a proxy that
    # follows the job's external access integrations) or "open" (the host's network).
    egress: str = "integrations"
    # Remote instances (Slurm, Ray): how often they report, and how long one may stay silent
    # before its node counts as lost.
    heartbeat_s: float = 5.0
    heartbeat_timeout_s: float = 30.0
    # ... and how long one that its engine runs may take to send its first report (its node
    # starts Python and the agent; a node that dies meanwhile is lost when its engine says so)
    start_timeout_s: float = 120.0
    # The control plane's address as remote nodes reach it (default: the address it listens on).
    advertise_url: str | None = None


def _read_file(home: Path) -> dict[str, Any]:
    path = home / "config.toml"
    if not path.is_file():
        return {}
    with path.open("rb") as f:
        return tomllib.load(f)


def _flag(value: Any) -> bool:
    return str(value).strip().lower() not in ("", "0", "false", "no", "off")


def load_settings(home: str | os.PathLike[str] | None = None) -> Settings:
    """Read settings: env vars ``MLJOBS_*`` first, then ``[client]``/``[server]`` in config.toml."""
    root = Path(home).expanduser() if home else default_home()
    data = _read_file(root)
    client, server = data.get("client", {}), data.get("server", {})
    env = os.environ
    return Settings(
        home=root,
        url=env.get("MLJOBS_URL") or client.get("url"),
        token=env.get("MLJOBS_TOKEN") or client.get("token") or server.get("token"),
        database=env.get("MLJOBS_DATABASE") or client.get("database"),
        schema=env.get("MLJOBS_SCHEMA") or client.get("schema"),
        database_url=env.get("MLJOBS_DATABASE_URL") or server.get("database_url"),
        grace_period_s=float(env.get("MLJOBS_GRACE_PERIOD_S") or server.get("grace_period_s", 3.0)),
        create_default_pool=_flag(env.get("MLJOBS_DEFAULT_POOL", server.get("default_pool", "1"))),
        strict_egress=_flag(env.get("MLJOBS_STRICT_EGRESS", server.get("strict_egress", "0"))),
        env_cache_max_bytes=int(float(env.get("MLJOBS_ENV_CACHE_MAX_GB") or server.get("env_cache_max_gb", 10))
                                * (1 << 30)),
        install_timeout_s=float(env.get("MLJOBS_INSTALL_TIMEOUT_S") or server.get("install_timeout_s", 900.0)),
        node_network=(env.get("MLJOBS_NODE_NETWORK") or server.get("node_network") or "auto").lower(),
        job_ttl_days=float(env.get("MLJOBS_JOB_TTL_DAYS") or server.get("job_ttl_days", 14.0)),
        fair_half_life_h=float(env.get("MLJOBS_FAIR_HALF_LIFE_H") or server.get("fair_half_life_h", 24.0)),
        log_keepalive_s=float(env.get("MLJOBS_LOG_KEEPALIVE_S") or server.get("log_keepalive_s", 10.0)),
        max_payload_bytes=int(float(env.get("MLJOBS_MAX_PAYLOAD_MB") or server.get("max_payload_mb", 1024))
                              * (1 << 20)),
        store_busy_timeout_s=float(env.get("MLJOBS_STORE_BUSY_TIMEOUT_S") or server.get("store_busy_timeout_s", 30.0)),
        containment=(env.get("MLJOBS_CONTAINMENT") or server.get("containment") or "auto").lower(),
        metrics=_flag(env.get("MLJOBS_METRICS", server.get("metrics", "1"))),
        warm_supervisors=int(env.get("MLJOBS_WARM_SUPERVISORS") or server.get("warm_supervisors", 2)),
        isolation=(env.get("MLJOBS_ISOLATION") or server.get("isolation") or "auto").lower(),
        job_uids=_uid_range(env.get("MLJOBS_JOB_UIDS") or server.get("job_uids") or "300000-399999"),
        egress=(env.get("MLJOBS_EGRESS") or server.get("egress") or "integrations").lower(),
        heartbeat_s=float(env.get("MLJOBS_HEARTBEAT_S") or server.get("heartbeat_s", 5.0)),
        heartbeat_timeout_s=float(env.get("MLJOBS_HEARTBEAT_TIMEOUT_S") or server.get("heartbeat_timeout_s", 30.0)),
        start_timeout_s=float(env.get("MLJOBS_START_TIMEOUT_S") or server.get("start_timeout_s", 120.0)),
        advertise_url=env.get("MLJOBS_ADVERTISE_URL") or server.get("advertise_url"),
    )
