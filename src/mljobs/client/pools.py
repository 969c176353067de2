"""Compute pools and stages from the SDK."""

from __future__ import annotations

from typing import Any

import pandas as pd

from mljobs.client.session import Session, get_active_session
from mljobs.errors import InvalidArgumentError

__all__ = ["create_compute_pool", "alter_compute_pool", "drop_compute_pool", "list_compute_pools",
           "describe_compute_pool", "create_stage"]


def create_compute_pool(name: str, *, instance_family: str, min_nodes: int = 1, max_nodes: int = 1,
                        provider: str = "local", if_not_exists: bool = False,
                        session: Session | None = None) -> dict[str, Any]:
    """Create a pool of ``max_nodes`` nodes of ``instance_family`` (see ``mljobs.INSTANCE_FAMILIES``)."""
    session = session or get_active_session()
    return session.request("POST", "/pools", json={
        "name": name, "instance_family": instance_family, "min_nodes": min_nodes, "max_nodes": max_nodes,
        "provider": provider, "if_not_exists": if_not_exists}).json()


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
    rows = (session or get_active_session()).request("GET", "/pools").json()
    cols = ["name", "state", "instance_family", "min_nodes", "max_nodes", "nodes_in_use", "queued", "running",
            "provider", "created_time"]
    return pd.DataFrame(rows, columns=cols)


def create_stage(name: str, url: str | None = None, session: Session | None = None) -> dict[str, Any]:
    """Create a stage at an fsspec URL (``s3://bucket/prefix``, a folder); default: under MLJOBS_HOME."""
    return (session or get_active_session()).request("POST", "/stages", json={"name": name, "url": url}).json()
