"""The control plane's catalog: compute pools, stages, external access integrations and the
environment cache (what jobs run on and with), and who may change them."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from mljobs.errors import ConflictError, InvalidArgumentError, NotFoundError, PermissionDeniedError
from mljobs.providers.base import get_provider_class
from mljobs.runtime import environment as envs
from mljobs.server.auth import Principal
from mljobs.server.usage import is_fair
from mljobs.spec import INSTANCE_FAMILIES, PoolSpec, PoolState, check_identifier, check_stage_name
from mljobs.stages import Stage

__all__ = ["Catalog"]

log = logging.getLogger("mljobs.server")
# Built in: the public package index (the simple API and the file host).
PYPI_ACCESS = ("PYPI_ACCESS", ["pypi.org", "files.pythonhosted.org"])


class Catalog:
    """Part of :class:`mljobs.server.service.ControlPlane` (a mixin: its state is the plane's)."""

    # -- pools --------------------------------------------------------------------------------
    def create_pool(self, name: str, *, instance_family: str, min_nodes: int = 1, max_nodes: int = 1,
                    provider: str = "local", provider_options: dict[str, Any] | None = None,
                    if_not_exists: bool = False, who: Principal | None = None, scheduling: str | None = None,
                    preemption: bool = False, max_priority: int = 0) -> dict[str, Any]:
        """Make a pool; ``who`` becomes its owner (None: the server's own, managed by admins).
        The provider checks the pool (its options, that its engine answers and its nodes fit the
        family) before anything is recorded."""
        spec = PoolSpec(name, instance_family, min_nodes, max_nodes, provider, provider_options or {},
                        scheduling=scheduling, preemption=preemption, max_priority=max_priority)
        if spec.provider_options.get("mounts") and who is not None and not who.admin:
            raise PermissionDeniedError(f"compute pool {name}: only an admin names the host folders jobs may see "
                                        "(the mounts option)")
        cls = get_provider_class(spec.provider)
        if spec.provider not in self._providers:
            self._providers[spec.provider] = cls(self.home, self.settings)
        self._providers[spec.provider].validate_pool(spec)
        self.store.create_pool(spec, if_not_exists=if_not_exists, owner=who.name if who else None)
        return self.describe_pool(spec.name)

    def _check_pool_owner(self, pool: dict[str, Any], who: Principal | None, what: str) -> None:
        """Only a pool's owner or an admin changes it; the server's own pools only admins."""
        if who is None or who.admin or (pool["owner"] is not None and pool["owner"] == who.name):
            return
        owner = f"user {pool['owner']!r}" if pool["owner"] else "the server (its admins)"
        raise PermissionDeniedError(f"compute pool {pool['name']} belongs to {owner}: only they or an admin "
                                    f"may {what} it")

    def describe_pool(self, name: str, with_users: bool = True) -> dict[str, Any]:
        pool = self.store.get_pool(check_identifier("compute pool", name))
        usage = self.store.pool_usage().get(pool["name"], {"nodes_in_use": 0, "queued": 0, "running": 0})
        state = PoolState.SUSPENDED if pool["suspended"] else (
            PoolState.ACTIVE if usage["nodes_in_use"] else PoolState.IDLE)
        fam = INSTANCE_FAMILIES[pool["instance_family"]]
        fair = is_fair(pool, self._has_users())
        return {**pool, "state": state.value, **usage, "family": fam.describe(),
                "cpus_per_node": fam.cpus, "memory_bytes_per_node": fam.memory_bytes, "gpus_per_node": fam.gpus,
                "scheduling": "fair" if fair else "fifo", "users": self._pool_users(pool) if with_users else []}

    def _pool_users(self, pool: dict[str, Any]) -> list[dict[str, Any]]:
        """Who holds the pool now: each user's running instances, queued jobs, recent usage (every
        pool's, weighted and decayed: what fair share orders by) and share of that usage."""
        running = Counter(owner for _, owner, _ in self.store.pool_instances(pool["name"]))
        queued = self.store.queued_by_owner(pool["name"])
        owners = sorted(set(running) | set(queued))
        usage = self._usage_now() if owners else {}
        total = sum(usage.get(o, 0.0) for o in owners)
        return [{"user": o, "running_instances": running.get(o, 0), "queued_jobs": queued.get(o, 0),
                 "usage": round(usage.get(o, 0.0), 3), "share": round(usage.get(o, 0.0) / total, 4) if total else 0.0,
                 "max_instances": self.quotas.limits(o, pool["name"])["max_instances"]} for o in owners]

    def list_pools(self) -> list[dict[str, Any]]:
        return [self.describe_pool(p["name"], with_users=False) for p in self.store.list_pools()]

    def alter_pool(self, name: str, *, suspend: bool | None = None, resume: bool | None = None,
                   max_nodes: int | None = None, who: Principal | None = None, scheduling: str | None = None,
                   preemption: bool | None = None, max_priority: int | None = None) -> dict[str, Any]:
        name = check_identifier("compute pool", name)
        self._check_pool_owner(self.store.get_pool(name), who, "alter")
        if suspend and resume:
            raise InvalidArgumentError("alter_compute_pool: give suspend=True or resume=True, not both")
        values: dict[str, Any] = {}
        if suspend:
            values["suspended"] = True
        if resume:
            values["suspended"] = False
        if max_nodes is not None:
            pool = self.store.get_pool(name)
            spec = PoolSpec(name, pool["instance_family"], min(pool["min_nodes"], max_nodes), max_nodes,
                            pool["provider"], pool["provider_options"])
            self.provider(name).validate_pool(spec)
            values.update(max_nodes=max_nodes, min_nodes=spec.min_nodes)
        if scheduling is not None:
            PoolSpec(name, "CPU_X64_XS", scheduling=scheduling)  # says what is wrong with it
            values["scheduling"] = scheduling
        if preemption is not None:
            values["preemption"] = bool(preemption)
        if max_priority is not None:
            values["max_priority"] = int(max_priority)
        if values:
            self.store.update_pool(name, **values)
        else:
            self.store.get_pool(name)
        self.schedule(name)
        return self.describe_pool(name)

    def drop_pool(self, name: str, who: Principal | None = None) -> None:
        name = check_identifier("compute pool", name)
        self._check_pool_owner(self.store.get_pool(name), who, "drop")
        self.store.drop_pool(name)

    # -- stages -------------------------------------------------------------------------------
    def stage(self, name: str, create: bool = True, who: Principal | None = None) -> Stage:
        """A stage by name, made on first use (owned by ``who``); ``who`` must be allowed to use it
        (None: the server itself)."""
        name = check_stage_name(name)
        row = self.store.get_stage(name)
        if row is None:
            if not create:
                raise NotFoundError(f"stage @{name} does not exist; stages are created when a job or "
                                    "`mljobs stage put` first uses them")
            row = self.store.create_stage(name, str(self.home.stage_root(name)), owner=who.name if who else None)
        if who is not None and not who.may_use(row["owner"]):
            raise PermissionDeniedError(f"stage @{name} belongs to user {row['owner']!r}; use a stage of your own "
                                        "(another stage_name) or ask them to share results another way")
        stage = Stage(row["name"], row["url"])
        stage.ensure()
        return stage

    def create_stage(self, name: str, url: str | None = None, who: Principal | None = None) -> dict[str, Any]:
        name = check_stage_name(name)
        if url is not None and who is not None:  # any fsspec URL reaches the server's files and credentials
            who.require_admin(f"a stage on {url!r}")
        row = self.store.create_stage(name, url or str(self.home.stage_root(name)), if_not_exists=False,
                                      owner=who.name if who else None)
        Stage(row["name"], row["url"]).ensure()
        return row

    # -- external access integrations and environments ---------------------------------------
    def create_integration(self, name: str, allowed_hosts: list[str], *, replace: bool = False,
                           if_not_exists: bool = False, who: Principal | None = None) -> dict[str, Any]:
        if who is not None:
            who.require_admin("creating an external access integration")
        name = check_identifier("external access integration", name)
        if not isinstance(allowed_hosts, list) or not allowed_hosts or not all(
                isinstance(h, str) and h.strip() and "/" not in h for h in allowed_hosts):
            raise InvalidArgumentError(
                f"allowed_hosts must be a non-empty list of host names or patterns like 'pypi.org' or "
                f"'*.example.com' (no scheme or path), got {allowed_hosts!r}")
        if name == PYPI_ACCESS[0] and not if_not_exists:
            raise ConflictError(f"{name} is built in; create an integration with another name")
        self.store.create_integration(name, [h.strip().lower() for h in allowed_hosts], replace=replace,
                                      if_not_exists=if_not_exists)
        return next(i for i in self.store.list_integrations() if i["name"] == name)

    def list_integrations(self) -> list[dict[str, Any]]:
        return self.store.list_integrations()

    def drop_integration(self, name: str, who: Principal | None = None) -> None:
        if who is not None:
            who.require_admin("dropping an external access integration")
        name = check_identifier("external access integration", name)
        if name == PYPI_ACCESS[0]:
            raise ConflictError(f"{name} is built in and cannot be dropped")
        self.store.drop_integration(name)

    def env_cache(self) -> envs.EnvCache:
        return envs.EnvCache(self.home.root / "envs", self.settings.env_cache_max_bytes)

    def list_envs(self) -> list[dict[str, Any]]:
        return self.env_cache().entries()

    def prune_envs(self, max_bytes: int | None = None, who: Principal | None = None) -> list[dict[str, Any]]:
        """Evict idle environments, least recently used first, down to ``max_bytes`` (0: all idle)."""
        if who is not None:
            who.require_admin("pruning the server's environments")
        return self.env_cache().prune(max_bytes, recent_s=0.0)
