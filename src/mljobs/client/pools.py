"""The server's resources from the SDK: compute pools, stages, external access integrations
(named egress policies) and the cache of job environments."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from mljobs.client.session import Session, get_active_session
from mljobs.errors import InvalidArgumentError, NotFoundError
from mljobs.spec import check_stage_name

if TYPE_CHECKING:  # pandas costs ~0.3 s to import: only the DataFrame-returning calls load it
    import pandas as pd

__all__ = ["create_compute_pool", "alter_compute_pool", "drop_compute_pool", "list_compute_pools",
           "describe_compute_pool", "create_stage", "stage_url", "stage_hidden", "create_external_access_integration",
           "list_external_access_integrations", "drop_external_access_integration", "list_environments",
           "prune_environments"]


def create_compute_pool(name: str, *, instance_family: str, min_nodes: int = 1, max_nodes: int = 1,
                        provider: str = "local", provider_options: dict[str, Any] | None = None,
                        if_not_exists: bool = False, scheduling: str | None = None, preemption: bool = False,
                        max_priority: int = 0, session: Session | None = None) -> dict[str, Any]:
    """Create a pool of ``max_nodes`` nodes of ``instance_family`` (see ``mljobs.INSTANCE_FAMILIES``).

    ``provider`` says where the nodes come from: ``"local"`` (this machine), ``"slurm"`` (a Slurm
    partition: ``provider_options={"partition": "debug"}``) or ``"ray"`` (an existing Ray cluster:
    ``provider_options={"address": "http://HEAD:8265"}``); see ``docs/providers.md``.

    Sharing (docs/sharing.md): ``scheduling="fair"`` starts the queued job of the user with the least
    recent usage first, ``"fifo"`` in submission order (default: fair once the server has users);
    job priorities come first either way, up to ``max_priority`` for non-admins; with
    ``preemption=True`` a higher-priority job that cannot start takes lower ones' instances.
    """
    session = session or get_active_session()
    return session.request("POST", "/pools", json={
        "name": name, "instance_family": instance_family, "min_nodes": min_nodes, "max_nodes": max_nodes,
        "provider": provider, "provider_options": provider_options or {}, "if_not_exists": if_not_exists,
        "scheduling": scheduling, "preemption": preemption, "max_priority": max_priority}).json()


def alter_compute_pool(name: str, *, suspend: bool | None = None, resume: bool | None = None,
                       max_nodes: int | None = None, scheduling: str | None = None, preemption: bool | None = None,
                       max_priority: int | None = None, session: Session | None = None) -> dict[str, Any]:
    """Suspend (start nothing new), resume, resize a pool, or change how it is shared."""
    changes = {"suspend": suspend, "resume": resume, "max_nodes": max_nodes, "scheduling": scheduling,
               "preemption": preemption, "max_priority": max_priority}
    if all(v is None for v in changes.values()):
        raise InvalidArgumentError("alter_compute_pool: give suspend=True, resume=True, max_nodes=N, "
                                   "scheduling='fair'|'fifo', preemption=True|False or max_priority=N")
    session = session or get_active_session()
    return session.request("PATCH", f"/pools/{name}", json=changes).json()


def set_user_quota(name: str, pool: str, *, max_instances: int | None = None, max_queued: int | None = None,
                   max_instance_hours: float | None = None, session: Session | None = None) -> dict[str, Any]:
    """Set user ``name``'s limits on ``pool`` (admins only). ``name='*'`` sets everyone's default,
    ``pool='*'`` every pool's; the most specific row that sets a limit wins. None: no limit there.

    ``max_instances``: running at once (more wait, saying why); ``max_queued``: queued at once and
    ``max_instance_hours``: instance-hours over the last 24 h (more are refused at submit)."""
    session = session or get_active_session()
    return session.request("PUT", f"/users/{name}/quotas/{pool}", json={
        "max_instances": max_instances, "max_queued": max_queued, "max_instance_hours": max_instance_hours}).json()


def get_user_quota(name: str, session: Session | None = None) -> list[dict[str, Any]]:
    """User ``name``'s quota rows and everyone's defaults (``'*'``: every row)."""
    session = session or get_active_session()
    return session.request("GET", f"/users/{name}/quotas").json()


def drop_compute_pool(name: str, session: Session | None = None) -> None:
    (session or get_active_session()).request("DELETE", f"/pools/{name}")


def describe_compute_pool(name: str, session: Session | None = None) -> dict[str, Any]:
    """A pool with its state, nodes in use and jobs queued."""
    return (session or get_active_session()).request("GET", f"/pools/{name}").json()


def list_compute_pools(session: Session | None = None) -> pd.DataFrame:
    import pandas as pd

    rows = (session or get_active_session()).request("GET", "/pools").json()
    cols = ["name", "state", "instance_family", "min_nodes", "max_nodes", "nodes_in_use", "queued", "running",
            "provider", "scheduling", "preemption", "created_time"]
    return pd.DataFrame(rows, columns=cols)


def create_stage(name: str, url: str | None = None, session: Session | None = None) -> dict[str, Any]:
    """Create a stage at an fsspec URL (``s3://bucket/prefix``, a folder); default: under MLJOBS_HOME."""
    return (session or get_active_session()).request("POST", "/stages", json={"name": name, "url": url}).json()


def stage_url(name: str, session: Session | None = None) -> str:
    """The storage URL behind stage ``name`` (a folder or an fsspec URL such as ``s3://...``)."""
    wanted = check_stage_name(name)
    stages = (session or get_active_session()).request("GET", "/stages").json()
    for stage in stages:
        if stage["name"] == wanted:
            return stage["url"]
    known = ", ".join(sorted("@" + s["name"] for s in stages)) or "none"
    raise NotFoundError(f"no stage named @{wanted} (stages you may use: {known}); "
                        f"create it with mljobs.create_stage({wanted!r})")


def stage_hidden(url: str) -> bool:
    """Whether a stage's storage ``url`` is a local folder this process cannot see (a sandboxed job,
    from which the server's folders are hidden; a client on another machine): its files then go
    through the control plane."""
    folder = url[len("file://"):] if url.startswith("file://") else url if "://" not in url else None
    return folder is not None and not os.path.isdir(folder)


def create_external_access_integration(name: str, allowed_hosts: list[str], *, replace: bool = False,
                                       if_not_exists: bool = False,
                                       session: Session | None = None) -> dict[str, Any]:
    """A named egress policy: the hosts (patterns like ``*.example.com`` allowed) a job may reach.

    Name it in ``external_access_integrations=[...]``; a strict server installs packages only
    from index hosts that the job's integrations allow. ``PYPI_ACCESS`` is built in.
    """
    if isinstance(allowed_hosts, str):
        raise InvalidArgumentError(f"allowed_hosts takes a list of hosts, e.g. [{allowed_hosts!r}]")
    return (session or get_active_session()).request("POST", "/integrations", json={
        "name": name, "allowed_hosts": list(allowed_hosts), "replace": replace,
        "if_not_exists": if_not_exists}).json()


def list_external_access_integrations(session: Session | None = None) -> pd.DataFrame:
    import pandas as pd

    rows = (session or get_active_session()).request("GET", "/integrations").json()
    return pd.DataFrame(rows, columns=["name", "allowed_hosts", "created_time"])


def drop_external_access_integration(name: str, session: Session | None = None) -> None:
    (session or get_active_session()).request("DELETE", f"/integrations/{name}")


def list_environments(session: Session | None = None) -> pd.DataFrame:
    """The server's cached job environments, most recently used first."""
    import pandas as pd

    rows = (session or get_active_session()).request("GET", "/environments").json()
    df = pd.DataFrame(rows, columns=["key", "python_version", "requirements", "size_bytes", "last_used",
                                     "in_use", "path"])
    df["last_used"] = pd.to_datetime(df["last_used"], unit="s", utc=True)
    return df


def prune_environments(max_bytes: int | None = None, session: Session | None = None) -> list[str]:
    """Evict idle environments, least recently used first, down to ``max_bytes`` (default: the
    server's cap; 0: every one not in use). Returns the keys removed."""
    rows = (session or get_active_session()).request("POST", "/environments/prune",
                                                       json={"max_bytes": max_bytes}).json()
    return [r["key"] for r in rows]
