"""The one place that names every artifact path: on a stage, and under MLJOBS_HOME."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

# pathlib is imported where a Path is made (HomePaths): a sandboxed payload process imports this
# module (its launcher's file names) before its job, and pathlib with urllib.parse costs it ~5 ms

__all__ = ["StagePaths", "DefinitionPaths", "HomePaths", "InstancePaths", "FUNCTION_PAYLOAD", "CALL_PAYLOAD", "CHECKPOINT_DIR", "IMPORTS_DIR",
           "PID_FILE"]

FUNCTION_PAYLOAD = "function.pkl"  # inside app/ for function payloads
CALL_PAYLOAD = "call.pkl"  # inside app/ for a definition's call: the arguments, apart from the function
CHECKPOINT_DIR = ".checkpoint"  # inside an instance's work dir: MLJOBS_CHECKPOINT_DIR
IMPORTS_DIR = ".imports"  # inside app/: roots added to sys.path for `imports=`
CGROUP_FILE = "cgroup"  # inside a run dir: the name of the instance's cgroups when they are not <job>.<i>
PID_FILE = "supervisor.pid"  # inside an instance's run dir: "<pid> <start time>", written by the spawner


class StagePaths:
    """Paths of one job's files, relative to its stage's root."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    @property
    def prefix(self) -> str:
        return f"{self.job_id}/"

    @property
    def app(self) -> str:
        return f"{self.job_id}/app/"

    @property
    def result(self) -> str:
        return f"{self.job_id}/result"

    def instance_result(self, instance_id: int) -> str:
        """Each instance's own result envelope (parallel multi-node jobs; remote instances
        upload theirs here before they report their exit)."""
        return f"{self.job_id}/results/{instance_id}"

    def checkpoint(self, instance_id: int) -> str:
        """An instance's checkpoint folder (``MLJOBS_CHECKPOINT_DIR``), kept across attempts."""
        return f"{self.job_id}/checkpoint/{instance_id}/"

    @property
    def launch(self) -> str:
        """What a remote instance's agent reads to start (mljobs.runtime.agent)."""
        return f"{self.job_id}/run/launch.json"


class DefinitionPaths:
    """Where a job definition's payload is kept on its stage, one folder per registration: its
    version and a ``tag`` of its own (an overwrite writes the next and removes the last once it is
    recorded; a name deleted and registered again never shares a folder with what is removed)."""

    def __init__(self, owner: str, name: str, version: int, tag: str = "") -> None:
        self.root = f"_definitions/{owner}/{name}/"
        self.version = f"{self.root}{version}{'-' + tag if tag else ''}/"
        self.app = f"{self.version}app/"


@dataclasses.dataclass(frozen=True)
class InstancePaths:
    """Local files of one instance: what the supervisor reads and writes."""

    run_dir: Path  # launch.json, supervisor.pid, exit.json, result.pkl
    work_dir: Path  # the payload's working directory
    log_file: Path

    @property
    def launch(self) -> Path:
        return self.run_dir / "launch.json"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / PID_FILE

    @property
    def cgroup_file(self) -> Path:
        """The name of the instance's cgroups when a warm supervisor made them ahead (``spare-<pid>``)."""
        return self.run_dir / CGROUP_FILE

    @property
    def exit_file(self) -> Path:
        return self.run_dir / "exit.json"

    @property
    def result(self) -> Path:
        return self.run_dir / "result.pkl"

    @property
    def error(self) -> Path:
        return self.run_dir / "error.json"

    @property
    def supervisor_log(self) -> Path:
        return self.run_dir / "supervisor.err"

    @property
    def node_file(self) -> Path:
        """Where a remote instance runs: its address and host name, as its agent reported them."""
        return self.run_dir / "node.json"

    @property
    def ray_file(self) -> Path:
        """A multi-node head's Ray addresses (GCS, dashboard), once its node is up."""
        return self.run_dir / "ray.json"

    @property
    def metrics_file(self) -> Path:
        """Resource samples, one JSON object a line (see mljobs.runtime.metrics)."""
        return self.run_dir / "metrics.jsonl"


class HomePaths:
    """Layout of MLJOBS_HOME, the server's state folder."""

    def __init__(self, home: str | os.PathLike[str]) -> None:
        from pathlib import Path

        self.root = Path(home).expanduser().resolve()

    @property
    def database(self) -> Path:
        return self.root / "mljobs.db"

    @property
    def server_info(self) -> Path:
        return self.root / "server.json"

    @property
    def server_lock(self) -> Path:
        return self.root / "server.lock"

    @property
    def start_lock(self) -> Path:
        return self.root / "start.lock"

    @property
    def server_log(self) -> Path:
        return self.root / "server.log"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def stage_root(self, stage: str) -> Path:
        return self.stages / stage

    def job_logs(self, job_id: str) -> Path:
        return self.root / "logs" / job_id

    def log_file(self, job_id: str, instance: int) -> Path:
        return self.job_logs(job_id) / f"{instance}.log"

    @property
    def runs(self) -> Path:
        """Every job's run dirs (one folder a job)."""
        return self.root / "run"

    def job_run(self, job_id: str) -> Path:
        return self.runs / job_id

    def allocation_file(self, job_id: str) -> Path:
        """A remote job's allocation on its engine (a Slurm job id, a Ray submission id)."""
        return self.job_run(job_id) / "allocation.json"

    def allocation_files(self) -> list[Path]:
        """Every remote job's allocation record still on disk."""
        return sorted((self.root / "run").glob("*/allocation.json"))

    def job_work(self, job_id: str) -> Path:
        return self.root / "work" / job_id

    def instance(self, job_id: str, instance: int) -> InstancePaths:
        return InstancePaths(
            run_dir=self.job_run(job_id) / str(instance),
            work_dir=self.job_work(job_id) / str(instance),
            log_file=self.log_file(job_id, instance),
        )
