"""A real Slurm cluster on this machine, for development and tests: ``scripts/slurm-cluster``.

    scripts/slurm-cluster up        # install (apt) if needed, start munge, slurmctld, 3 slurmd
    scripts/slurm-cluster status    # sinfo, or "down"
    scripts/slurm-cluster exec -- CMD ...   # run CMD in the controller's network namespace
    scripts/slurm-cluster down      # scancel all, wait for an empty queue, stop every daemon

Layout: the namespace ``mljslurm-sw`` holds only a bridge; ``mljslurm-ctl`` (10.213.0.1, host
name ``mljslurm-ctl``) runs slurmctld, and ``mljslurm-n1..n3`` (10.213.0.11-13, host names
n1..n3) each run a slurmd. Every daemon starts with ``nsenter --net=... unshare --uts`` (not
``ip netns exec``, which remounts /sys and breaks slurmd's cgroups), so each node is a host of its
own, yet all share this machine's filesystem, so a folder on it is a "shared filesystem". Nothing
gets an address or route in the machine's own namespace. Clients (sbatch, squeue, the mljobs
server of a Slurm pool) must run in the controller's namespace with ``SLURM_CONF`` set: ``exec``
does both. ``proctrack/cgroup`` (cgroup v1 freezer) keeps every job's processes together, so
scancel ends whole trees. Accounting is off (``accounting_storage/none``): ``sacct`` fails, as it
does on clusters without slurmdbd, and mljobs says so. State, logs and config live in
``MLJOBS_SLURM_DIR`` (default /tmp/mljobs-slurm). Needs root, iproute2 and util-linux.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Cluster", "unavailable_reason"]

PREFIX = "mljslurm-"
SUBNET = "10.213.0"
NODES = ("n1", "n2", "n3")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# each node's size as slurmd advertises it (config_overrides: more than the machine has is accepted,
# e.g. to run many small instances in a benchmark)
CPUS = int(os.environ.get("MLJOBS_SLURM_NODE_CPUS", "2"))
MEMORY_MB = int(os.environ.get("MLJOBS_SLURM_NODE_MEMORY_MB", "4000"))


def unavailable_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (network namespaces and the Slurm daemons need root)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def _run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    out = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if check and out.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed: {(out.stderr or out.stdout).strip()}")
    return out


class Cluster:
    def __init__(self, state: str | os.PathLike[str] | None = None) -> None:
        self.dir = Path(state or os.environ.get("MLJOBS_SLURM_DIR") or "/tmp/mljobs-slurm")
        self.conf = self.dir / "slurm.conf"
        self.controller_namespace = PREFIX + "ctl"
        self.controller_address = f"{SUBNET}.1"
        self.nodes = list(NODES)
        self.partition = "debug"

    # -- names --------------------------------------------------------------------------------
    def node_namespace(self, node: str) -> str:
        return PREFIX + node

    def node_address(self, node: str) -> str:
        return f"{SUBNET}.{11 + NODES.index(node)}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def run_prefix(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.controller_namespace}"]

    def exec(self, args: list[str], **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
        """Run ``args`` in the controller's namespace with SLURM_CONF set."""
        return subprocess.run([*self.run_prefix, *args], capture_output=True, text=True, env=self.env, **kw)

    # -- install and config -------------------------------------------------------------------
    def install(self) -> None:
        if all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")):
            return
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", *PACKAGES]
        if subprocess.run(cmd, capture_output=True, env=env).returncode != 0:
            _run("apt-get", "update", "-q", env=env)
            _run(*cmd, env=env)

    def _write_config(self) -> None:
        d = self.dir
        for sub in ("ctld", "spool", "munge"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o700)
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.node_address(n)} NodeHostname={n} CPUs={CPUS} "
                          f"RealMemory={MEMORY_MB} State=UNKNOWN" for n in NODES)
        self.conf.write_text(f"""\
ClusterName=mljobs
SlurmctldHost={self.controller_namespace}({self.controller_address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={d}/ctld
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=5
MinJobAge=5
SlurmdTimeout=20
InactiveLimit=0
{nodes}
PartitionName={self.partition} Nodes={NODES[0][0]}[{NODES[0][1]}-{NODES[-1][1]}] Default=YES MaxTime=INFINITE State=UP
""")
        (d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nConstrainCores=no\n"
                                       "ConstrainRAMSpace=no\n")

    # -- network ------------------------------------------------------------------------------
    def _network(self) -> None:
        sw = PREFIX + "sw"
        _run("ip", "netns", "add", sw)
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        hosts = [(self.controller_namespace, self.controller_address)] + [
            (self.node_namespace(n), self.node_address(n)) for n in NODES]
        for k, (ns, addr) in enumerate(hosts):
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", sw, "link", "add", f"v{k}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "-n", sw, "link", "set", f"v{k}", "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def namespaces(self) -> list[str]:
        out = _run("ip", "netns", "list", check=False).stdout
        return [ln.split()[0] for ln in out.splitlines() if ln.startswith(PREFIX)]

    # -- daemons ------------------------------------------------------------------------------
    def _daemon(self, ns: str, hostname: str, argv: list[str], log: str) -> None:
        with open(self.dir / log, "ab") as f:
            subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "sh", "-c",
                              f'hostname {hostname} && exec "$@"', "sh", *argv],
                             stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True, env=self.env)

    def _start_munge(self) -> None:
        key = self.dir / "munge" / "munge.key"
        if not key.exists():
            _run("mungekey", "--create", f"--keyfile={key}")
            os.chmod(key, 0o600)
        _run("munged", "--force", f"--socket={self.dir}/munge/munge.socket", f"--key-file={key}",
             f"--pid-file={self.dir}/munge/munged.pid", f"--log-file={self.dir}/munge/munged.log",
             f"--seed-file={self.dir}/munge/munged.seed")

    def start_node(self, node: str) -> None:
        self._daemon(self.node_namespace(node), node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)],
                     f"slurmd-{node}.out")

    def kill_node(self, node: str) -> None:
        """The node dies: SIGKILL its slurmd (its jobs' processes are the caller's to kill)."""
        for pid in self._pids(f"slurmd -D -N {node} "):
            os.kill(pid, signal.SIGKILL)

    def restart_node(self, node: str) -> None:
        self.start_node(node)
        _run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False, env=self.env)

    def running(self) -> bool:
        return bool(self._pids("slurmctld -D"))

    def up(self, timeout: float = 60.0) -> None:
        if self.running():
            print(f"the Slurm cluster is up already (state in {self.dir})")
            return
        self.install()
        self.down(quiet=True)
        self._write_config()
        self._network()
        self._start_munge()
        self._daemon(self.controller_namespace, self.controller_namespace,
                     ["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        for n in NODES:
            self.start_node(n)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.exec(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if len(states) == len(NODES) and all(s.startswith("idle") for s in states.values()):
                print(f"Slurm cluster up: slurmctld at {self.controller_address}, nodes {', '.join(NODES)} "
                      f"(state, logs and slurm.conf in {self.dir})")
                return
            time.sleep(0.3)
        logs = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for p in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.out")))
        self.down(quiet=True)
        raise RuntimeError(f"the Slurm nodes did not come up in {timeout:g} s (sinfo: {states}); logs:\n{logs}")

    def _pids(self, needle: str) -> list[int]:
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd and str(self.conf) in cmd or (needle in cmd and "munged" in needle and str(self.dir) in cmd):
                out.append(int(d.name))
        return out

    def down(self, quiet: bool = False, timeout: float = 30.0) -> None:
        """Cancel every job, wait for an empty queue, then stop the daemons and the network."""
        if self.running():
            self.exec(["scancel", "--user=root"])
            deadline = time.monotonic() + timeout
            while self.exec(["squeue", "-h"]).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)
        for needle in ("slurmd -D", "slurmctld -D"):
            for pid in self._pids(needle):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while (self._pids("slurmd -D") or self._pids("slurmctld -D")) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self._pids("slurmd -D") + self._pids("slurmctld -D") + self._stepds():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pidfile = self.dir / "munge" / "munged.pid"
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
            pidfile.unlink(missing_ok=True)
        for ns in self.namespaces():
            for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "delete", ns, check=False)
        if not quiet:
            print("Slurm cluster down")

    def _stepds(self) -> list[int]:
        """slurmstepd processes of this cluster's nodes (found by their namespace)."""
        out = []
        for ns in self.namespaces():
            out += [int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        return out


def main(argv: list[str]) -> int:
    c = Cluster()
    cmd = argv[0] if argv else "status"
    if cmd == "up":
        reason = unavailable_reason()
        if reason:
            print(f"cannot start a Slurm cluster here: {reason}", file=sys.stderr)
            return 2
        c.up()
    elif cmd == "down":
        c.down()
    elif cmd == "status":
        print(c.exec(["sinfo"]).stdout if c.running() else "down")
    elif cmd == "exec":
        args = argv[1:]
        if args and args[0] == "--":
            args = args[1:]
        if not args:
            print("usage: slurm-cluster exec -- CMD ...", file=sys.stderr)
            return 2
        os.execvpe("nsenter", [*c.run_prefix, *args], c.env)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
