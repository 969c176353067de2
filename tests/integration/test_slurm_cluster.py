"""The development Slurm cluster itself (scripts/slurm_cluster.py): separate hosts, whole-tree
scancel, and a ``down`` that leaves nothing behind. The Slurm provider's tests build on it."""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]


def _with_marker(marker: str) -> list[tuple[int, str]]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in argv and d.name != str(os.getpid()):
                out.append((int(d.name), argv))
    return out


def _wait(pred, timeout: float, step: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def test_nodes_are_three_hosts(slurm_cluster: Any) -> None:
    out = slurm_cluster.exec(["srun", "-N3", "hostname"], timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == sorted(slurm_cluster.nodes) and len(set(slurm_cluster.nodes)) == 3
    # the nodes share this machine's filesystem: the project's interpreter runs on each of them
    code = "import socket; print(socket.gethostname())"
    out = slurm_cluster.exec(["srun", "-N3", "--mem=100", sys.executable, "-c", code], timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == sorted(slurm_cluster.nodes)
    info = slurm_cluster.exec(["sinfo", "-h", "-o", "%P %D %c %m"]).stdout.split()
    assert info == [f"{slurm_cluster.partition}*", "3", "2", "4000"]
    # memory is a schedulable resource: more than a node has is refused at once
    big = slurm_cluster.exec(["sbatch", "--mem=5000", "--wrap", "true"], timeout=30)
    assert big.returncode != 0 and "node configuration is not available" in big.stderr, big
    assert slurm_cluster.controller_address == "10.213.0.1"
    if not os.environ.get("MLJOBS_SLURM_INSTANCE"):
        assert slurm_cluster.nodes == ["n1", "n2", "n3"]
        assert slurm_cluster.node_namespace("n2") == "mljslurm-n2"


def test_scancel_kills_the_whole_tree(slurm_cluster: Any, tmp_path: Path) -> None:
    # a unique duration is the marker: a sleep that left the job's session (setsid) and one that did not
    marker = f"300.{secrets.randbelow(10**9):09d}"
    sub = slurm_cluster.exec(["sbatch", "--parsable", "--mem=100", "-o", str(tmp_path / "out"),
                              "--wrap", f"setsid sleep {marker} & sleep {marker}"])
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    assert _wait(lambda: len(_with_marker(marker)) >= 2, 30), (
        f"job {job} did not start: {slurm_cluster.exec(['squeue']).stdout}")
    assert slurm_cluster.exec(["scancel", job]).returncode == 0
    assert _wait(lambda: not _with_marker(marker), 20), f"left after scancel: {_with_marker(marker)}"
    assert _wait(lambda: not slurm_cluster.exec(["squeue", "-h", "-j", job]).stdout.strip(), 30)


def test_down_leaves_nothing_then_up_again(slurm_cluster: Any) -> None:
    """Last in the file: stops the session's cluster, checks, and starts it again for later tests."""
    marker = f"300.{secrets.randbelow(10**9):09d}"
    sub = slurm_cluster.exec(["sbatch", "--parsable", "-o", "/dev/null",
                              "--wrap", f"setsid sleep {marker} & sleep {marker}"])
    assert sub.returncode == 0, sub.stderr
    assert _wait(lambda: len(_with_marker(marker)) >= 2, 30)
    namespaces = slurm_cluster.namespaces()
    assert len(namespaces) == 5
    inodes = {os.stat(f"/run/netns/{ns}").st_ino for ns in namespaces}
    t0 = time.monotonic()
    slurm_cluster.down(quiet=True)
    took = time.monotonic() - t0
    state = str(slurm_cluster.dir)
    left = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            comm = (d / "comm").read_text().strip()
            netns = os.stat(d / "ns" / "net").st_ino
        except OSError:
            continue
        # slurmstepd and job processes by the namespace they ran in (another cluster may run beside)
        if netns in inodes or (comm in ("slurmctld", "slurmd", "munged") and state in argv) or marker in argv:
            left.append((d.name, comm, argv))
    assert not left, left
    assert not slurm_cluster.namespaces()
    assert not [p for n in slurm_cluster.nodes for p in Path("/sys/fs/cgroup").glob(f"*/slurm_{n}")]
    assert not slurm_cluster.dir.exists()
    print(f"down took {took:.1f} s")
    t0 = time.monotonic()
    slurm_cluster.up(quiet=True)
    print(f"up took {time.monotonic() - t0:.1f} s")
    assert slurm_cluster.exec(["srun", "-N3", "true"], timeout=60).returncode == 0
