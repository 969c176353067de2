"""The server's resources from the SDK: compute pools, stages, external access integrations
(named egress policies) and the cache of job environments."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mljobs.client.session import Session, get_active_session
from mljobs.errors import InvalidArgumentError, NotFoundError
from mljobs.spec import check_stage_name

if TYPE_CHECKING:  # pandas costs ~0.3 s to import: only the DataFrame-returning calls load it
    import pandas as pd

__all__ = ["create_compute_pool", "alter_compute_pool", "drop_compute_pool", "list_compute_pools",
           "describe_compute_pool", "create_stage", "stage_url", "create_external_access_integration",
           "list_external_access_integrations", "drop_external_access_integration", "list_environments",
           "prune_environments"]


def create_compute_pool(name: str, *, instance_family: str, min_nodes: int = 1, max_nodes: int = 1,
                        provider: str = "local", provider_options: dict[str, Any] | None = None,
                        if_not_exists: bool = False, session: Session | None = None) -> dict[str, Any]:
    """Create a pool of ``max_nodes`` nodes of ``instance_family`` (see ``mljobs.INSTANCE_FAMILIES``).

    ``provider`` says where the nodes come from: ``"local"`` (this machine), ``"slurm"`` (a Slurm
    partition: ``provider_options={"partition": "debug"}``) or ``"ray"`` (an existing Ray cluster:
    ``provider_options={"address": "http://HEAD:8265"}``); see ``docs/providers.md``.
    """
    session = session or get_active_session()
    return session.request("POST", "/pools", json={
        "name": name, "instance_family": instance_family, "min_nodes": min_nodes, "max_nodes": max_nodes,
        "provider": provider, "provider_options": provider_options or {}, "if_not_exists": if_not_exists}).json()


def alter_compute_pool(name: str, *, suspend: bool | None = None, resume: bool | None = None,
                       max_nodes: int | None = None, session: Session | None = None) -> dict[str, Any]:
    """Suspend (start nothing new), resume, or resize a pool."""
    if suspend is None and resume is None and max_nodes is None:
        raise InvalidArgumentError("alter_compute_pool: give suspend=True, resume=True or max_nodes=N")
    session = session or get_active_session()
    return session.request("PATCH", f"/pools/{name}", json={
        "suspend": suspend, "resume": resume, "max_nodes": max_nodes}).json()


def drop_compute_pool(name: str, session: Session | None = None) -> None:
    (session or get_active_session()).request("DELETE", f"/pools/{name}")


def describe_compute_pool(name: str, session: Session | None = None) -> dict[str, Any]:
    """A pool with its state, nodes in use and jobs queued."""
    return (session or get_active_session()).request("GET", f"/pools/{name}").json()


def list_compute_pools(session: Session | None = None) -> pd.DataFrame:
    import pandas as pd

    rows = (session or get_active_session()).request("GET", "/pools").json()
    cols = ["name", "state", "instance_family", "min_nodes", "max_nodes", "nodes_in_use", "queued", "running",
            "provider", "created_time"]
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
