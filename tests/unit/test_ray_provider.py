"""The Ray provider's checks that need no cluster (the rest: tests/integration/test_ray_provider.py)."""

from __future__ import annotations

import pytest

from mljobs.config import Settings
from mljobs.errors import InvalidArgumentError
from mljobs.paths import HomePaths
from mljobs.providers.ray import RayProvider, node_fits, submission_id
from mljobs.runtime import multinode, raygang
from mljobs.spec import GIB, INSTANCE_FAMILIES, PoolSpec


def _provider(tmp_path, advertise="http://10.0.0.5:8000") -> RayProvider:
    return RayProvider(HomePaths(tmp_path), Settings(home=tmp_path, advertise_url=advertise))


def test_unknown_option_is_named_with_the_valid_ones(tmp_path):
    pool = PoolSpec("P", "CPU_X64_XS", 1, 3, "ray", {"address": "http://h:8265", "adress": "x"})
    with pytest.raises(InvalidArgumentError, match=r"\['adress'\].*address:.*shared_paths:.*python:"):
        _provider(tmp_path).validate_pool(pool)


def test_address_is_required_and_a_loopback_control_plane_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="needs provider_options=\\{'address'"):
        _provider(tmp_path).validate_pool(PoolSpec("P", "CPU_X64_XS", 1, 3, "ray", {}))
    with pytest.raises(InvalidArgumentError, match="loopback"):
        _provider(tmp_path, "http://127.0.0.1:8000").validate_pool(
            PoolSpec("P", "CPU_X64_XS", 1, 3, "ray", {"address": "http://h:8265"}))


def test_sizes_submission_ids_and_bundles():
    xs, m = INSTANCE_FAMILIES["CPU_X64_XS"], INSTANCE_FAMILIES["CPU_X64_M"]
    node = {"cpus": 2.0, "gpus": 0.0, "memory_bytes": 6.0 * GIB}
    assert node_fits(node, xs) and not node_fits(node, m)
    assert submission_id("MLJOB_X") == "mljobs-MLJOB_X"
    # a retry's Ray job is its own: Ray keeps the last attempt's, finished, under the first id
    assert submission_id("MLJOB_X", attempt=2) == "mljobs-MLJOB_X.2"
    from mljobs.providers.slurm import _job_of, job_name

    assert job_name("MLJOB_X", 3) == "mljobs-MLJOB_X.3" and _job_of(job_name("MLJOB_X", 3)) == "MLJOB_X"
    assert raygang.bundles({"count": 2, "cpus": 1, "gpus": 0, "memory_bytes": 2 * GIB}) == [
        {"CPU": 1.0, "memory": 2.0 * GIB}] * 2
    assert raygang.bundles({"count": 1, "cpus": 6, "gpus": 1, "memory_bytes": GIB})[0]["GPU"] == 1.0


def test_host_cluster_mode_points_the_payload_at_the_nodes_cluster():
    mn = {"addresses": ["10.0.0.1", "10.0.0.2"], "count": 2, "parallel": False, "rendezvous_port": 29500,
          "gcs_port": 6379}
    assert multinode.node_env(mn, 0)["RAY_ADDRESS"] == "10.0.0.1:6379"  # a cluster of the job's own
    assert multinode.node_env({**mn, "ray_address": "10.9.9.9:6379"}, 1)["RAY_ADDRESS"] == "10.9.9.9:6379"
