"""A real Slurm cluster on this machine, for development and tests (``scripts/slurm-cluster``).

    scripts/slurm-cluster up                 # install (apt) if needed, start munged, slurmctld, 3 slurmd
    scripts/slurm-cluster status             # sinfo, or "down"
    scripts/slurm-cluster exec -- CMD ...    # run CMD in the controller's network namespace
    scripts/slurm-cluster down [--keep]      # scancel all, wait for an empty queue, stop everything

Tests import this file (``tests/conftest.py``, fixture ``slurm_cluster``); the script is a thin
wrapper, so there is one implementation.

Hosts. The namespace ``mljslurm-sw`` holds only a bridge, ``br0``. ``mljslurm-ctl`` (10.213.0.1,
host name ``mljslurm-ctl``) runs slurmctld; ``mljslurm-n1..n3`` (10.213.0.11-13, host names
n1..n3) each run one slurmd. Each has ``lo`` and an ``eth0`` veth to the bridge. Nothing gets an
address, interface or route in the machine's own namespace. Daemons start with
``nsenter --net=/run/netns/NS unshare --uts sh -c 'hostname H && exec DAEMON'``, not
``ip netns exec`` (which remounts /sys and so hides the cgroup mounts slurmd needs). The hosts share
this machine's filesystem: any folder is a "shared filesystem" (the mljobs venv runs on every node).
slurm.conf names the hosts with NodeAddr/NodeHostname, so /etc/hosts is left alone.

Clients. sbatch, squeue, srun, scancel and the mljobs server of a Slurm pool must run in the
controller's namespace with ``SLURM_CONF`` pointing at this cluster's slurm.conf; ``exec`` does
both (``Cluster.run_prefix`` is the same argv prefix for Popen).

Process tracking. ``ProctrackType=proctrack/cgroup``: on this machine's hybrid layout (cgroup v1
controllers under /sys/fs/cgroup/<ctrl>, v2 only at /sys/fs/cgroup/unified) Slurm 22.05 uses
``CgroupPlugin=cgroup/v1`` and the freezer controller, one hierarchy per node
(``/sys/fs/cgroup/freezer/slurm_<node>/uid_0/job_N/step_M``), so scancel ends a job's whole
process tree, grandchildren that left the process group or session included. Where
/sys/fs/cgroup is a pure cgroup v2 mount, cgroup/v2 with ``IgnoreSystemd=yes`` is written instead
(not tried here: this machine has no such layout). No task/cgroup: --mem is scheduled
(``select/cons_tres`` with ``CR_Core_Memory``; each node has CPUs=2, RealMemory=4000, accepted on
a small box by ``SlurmdParameters=config_overrides``; a job without --mem gets DefMemPerCPU=1000 MB
per CPU, not the whole node) but not enforced: mljobs' own supervisor watches memory. With
``MLJOBS_SLURM_CONSTRAIN_RAM=1`` at ``up``, ``TaskPlugin=task/cgroup`` and ``ConstrainRAMSpace=yes``
enforce it too (cgroup v1 memory controller; works here: a step over its --mem is OOM-killed and
srun says "Out Of Memory"), as on most production clusters.

Accounting is off (``AccountingStorageType=accounting_storage/none``, ``JobCompType=jobcomp/none``),
as on clusters without slurmdbd: ``sacct`` exits non-zero with "Slurm accounting storage is
disabled", so a finished job is known only from ``squeue`` (for ``MinJobAge`` = 5 s after it ends)
and from whatever the job itself wrote.

State, config and logs live in ``MLJOBS_SLURM_DIR`` (default /tmp/mljobs-slurm); ``down`` deletes
them (``--keep`` keeps them). The namespace and node names are fixed, so one such cluster runs on a
machine at a time (``up`` and ``down`` refuse to touch one started from another state dir), unless
``MLJOBS_SLURM_INSTANCE`` names another (see below).
Needs root, iproute2, util-linux and apt-get (only if Slurm is not installed yet).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Cluster", "InstallError", "unavailable_reason", "PREFIX"]

# MLJOBS_SLURM_INSTANCE=x runs a second cluster beside the usual one (one per developer or session
# on a shared machine): namespaces mljslurmx-*, nodes xn1..xn3 (per-node cgroup hierarchies are
# named after the nodes, so those must differ too), state in /tmp/mljobs-slurm-x. Unset: mljslurm-*,
# n1..n3, /tmp/mljobs-slurm.
INSTANCE = os.environ.get("MLJOBS_SLURM_INSTANCE", "")
PREFIX = f"mljslurm{INSTANCE}-"
SUBNET = "10.213.0"
NODES = tuple(f"{INSTANCE}n{i}" for i in (1, 2, 3))
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scancel", "sinfo", "munged", "mungekey")
# each node's size as slurmd advertises it (config_overrides accepts more than the machine has,
# e.g. MLJOBS_SLURM_NODE_CPUS=34 MLJOBS_SLURM_NODE_MEMORY_MB=70000 for bench/slurm.py --instances 100)
CPUS = int(os.environ.get("MLJOBS_SLURM_NODE_CPUS", "2"))
MEMORY_MB = int(os.environ.get("MLJOBS_SLURM_NODE_MEMORY_MB", "4000"))
DEFAULT_DIR = "/tmp/mljobs-slurm" + (f"-{INSTANCE}" if INSTANCE else "")
LOCK = "/run/lock/mljslurm.lock"
CGROOT = Path("/sys/fs/cgroup")


class InstallError(RuntimeError):
    """Slurm is missing and apt-get could not install it."""


def unavailable_reason() -> str | None:
    """None when this machine can run the cluster (Slurm itself may still need installing), else why not."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (network namespaces and the Slurm daemons need root)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if not _installed() and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def _installed() -> bool:
    return all(shutil.which(b) for b in BINARIES)


def _run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore
    out = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if check and out.returncode != 0:
        why = (out.stderr or out.stdout).strip()
        raise RuntimeError(f"`{' '.join(args)}` failed ({out.returncode}): {why}")
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill(pids: list[int] | set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"--- {path}: (none)"
    return f"--- {path}\n" + "\n".join(text)


class Cluster:
    """One Slurm cluster: slurmctld and three slurmd, each node its own network namespace and host name."""

    def __init__(self, state: str | os.PathLike[str] | None = None) -> None:
        self.dir = Path(state or os.environ.get("MLJOBS_SLURM_DIR") or DEFAULT_DIR).absolute()
        self.conf = self.dir / "slurm.conf"
        self.controller_namespace = PREFIX + "ctl"
        self.controller_hostname = PREFIX + "ctl"
        self.controller_address = f"{SUBNET}.1"
        self.nodes = list(NODES)
        self.partition = "debug"
        self._children: list[subprocess.Popen[bytes]] = []

    # -- names ----------------------------------------------------------------------------------
    def node_namespace(self, node: str) -> str:
        return PREFIX + node

    def node_address(self, node: str) -> str:
        return f"{SUBNET}.{11 + NODES.index(node)}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def run_prefix(self) -> list[str]:
        """argv prefix that runs a command in the controller's namespace with SLURM_CONF set."""
        return ["nsenter", f"--net=/run/netns/{self.controller_namespace}", "--",
                "env", f"SLURM_CONF={self.conf}"]

    def exec(self, args: list[str], **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
        """Run ``args`` in the controller's namespace (output captured as text unless told otherwise)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("env", self.env)
        return subprocess.run([*self.run_prefix, *args], **kw)

    def logs(self) -> list[Path]:
        return [self.dir / "slurmctld.log", *(self.dir / f"slurmd-{n}.log" for n in NODES),
                self.dir / "munge" / "munged.log"]

    # -- install and config ---------------------------------------------------------------------
    def install(self) -> None:
        """apt-get install the Debian packages if a binary is missing (apt-get update only if needed)."""
        if _installed():
            return
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        first = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if first.returncode != 0:
            upd = subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
            again = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if again.returncode != 0:
                raise InstallError(f"apt-get install {' '.join(PACKAGES)} failed: "
                                   f"{(again.stderr or again.stdout).strip()[-800:]}"
                                   f" (apt-get update: {(upd.stderr or 'ok').strip()[-300:]})")
        if not _installed():
            raise InstallError(f"after apt-get install, still missing: "
                               f"{[b for b in BINARIES if not shutil.which(b)]}")

    @staticmethod
    def _constrain_ram() -> bool:
        return os.environ.get("MLJOBS_SLURM_CONSTRAIN_RAM", "") not in ("", "0", "no", "false")

    def _cgroup_conf(self) -> str:
        ram = "yes" if self._constrain_ram() else "no"
        fstype = _run("stat", "-f", "-c", "%T", str(CGROOT), check=False).stdout.strip()
        if fstype == "cgroup2fs":
            return f"CgroupPlugin=cgroup/v2\nIgnoreSystemd=yes\nConstrainCores=no\nConstrainRAMSpace={ram}\n"
        return (f"CgroupPlugin=cgroup/v1\nCgroupMountpoint={CGROOT}\nCgroupAutomount=no\n"
                f"ConstrainCores=no\nConstrainRAMSpace={ram}\nConstrainDevices=no\n")

    def _write_config(self) -> None:
        d = self.dir
        for sub in ("ctld", "munge", *(f"spool/{n}" for n in NODES)):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        os.chmod(d / "munge", 0o700)
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.node_address(n)} NodeHostname={n} CPUs={CPUS} "
                          f"RealMemory={MEMORY_MB} State=UNKNOWN" for n in NODES)
        self.conf.write_text(f"""\
# written by scripts/slurm_cluster.py; see its docstring
ClusterName=mljobs
SlurmctldHost={self.controller_hostname}({self.controller_address})
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
TaskPlugin={"task/cgroup" if self._constrain_ram() else "task/none"}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
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
PartitionName={self.partition} Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        (d / "cgroup.conf").write_text(self._cgroup_conf())

    # -- network --------------------------------------------------------------------------------
    def _network(self) -> None:
        sw = PREFIX + "sw"
        _run("ip", "netns", "add", sw)
        _run("ip", "-n", sw, "link", "set", "lo", "up")
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

    @staticmethod
    def namespaces() -> list[str]:
        """Every ``mljslurm-`` namespace on the machine (this cluster's or a stale one)."""
        out = _run("ip", "netns", "list", check=False).stdout
        return [ln.split()[0] for ln in out.splitlines() if ln.startswith(PREFIX)]

    @staticmethod
    def _ns_inodes(names: list[str]) -> set[tuple[int, int]]:
        out = set()
        for ns in names:
            with contextlib.suppress(OSError):
                st = os.stat(f"/run/netns/{ns}")
                out.add((st.st_dev, st.st_ino))
        return out

    @staticmethod
    def _pids_in(inodes: set[tuple[int, int]]) -> set[int]:
        """Processes whose network namespace is one of ``inodes`` (what ``ip netns pids`` does)."""
        out = set()
        for pid in _all_pids():
            try:
                st = os.stat(f"/proc/{pid}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in inodes and _alive(pid):
                out.add(pid)
        return out

    # -- processes ------------------------------------------------------------------------------
    def _daemon_pids(self, name: str, conf: Path | None = None) -> set[int]:
        """pids of ``name`` (slurmctld, slurmd) started with ``-f conf`` (this cluster's by default)."""
        want = str(conf or self.conf)
        out = set()
        for pid in _all_pids():
            argv = _cmdline(pid)
            if argv and os.path.basename(argv[0]) == name and want in argv and _alive(pid):
                out.add(pid)
        return out

    def _munged_pids(self) -> set[int]:
        out = set()
        for pid in _all_pids():
            argv = _cmdline(pid)
            if argv and os.path.basename(argv[0]) == "munged" and any(str(self.dir) in a for a in argv) \
                    and _alive(pid):
                out.add(pid)
        return out

    def _foreign(self) -> str | None:
        """The conf of another cluster that runs in the ``mljslurm-`` namespaces, if one does."""
        for pid in self._pids_in(self._ns_inodes(self.namespaces())):
            argv = _cmdline(pid)
            if argv and os.path.basename(argv[0]) in ("slurmctld", "slurmd") and "-f" in argv:
                conf = argv[argv.index("-f") + 1] if argv.index("-f") + 1 < len(argv) else ""
                if conf and conf != str(self.conf):
                    return conf
        return None

    def _cgroup_dirs(self) -> list[Path]:
        """This cluster's per-node cgroup hierarchies (``slurm_<node>`` in every controller)."""
        out = []
        for ctrl in ([CGROOT] if (CGROOT / "cgroup.controllers").exists() else CGROOT.iterdir()):
            for n in NODES:
                for name in (f"slurm_{n}", f"slurm_{n}.slice", "system.slice/slurmstepd.scope"):
                    if (ctrl / name).is_dir():
                        out.append(ctrl / name)
        return out

    def _cgroup_pids(self) -> set[int]:
        out = set()
        for top in self._cgroup_dirs():
            for root, _dirs, files in os.walk(top):
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError):
                        out |= {int(p) for p in Path(root, "cgroup.procs").read_text().split()}
        return {p for p in out if _alive(p)}

    def _thaw(self) -> None:
        """A frozen process does not die of SIGKILL until thawed (freezer cgroup, mid-scancel)."""
        for top in self._cgroup_dirs():
            for root, _dirs, files in os.walk(top):
                if "freezer.state" in files:
                    with contextlib.suppress(OSError):
                        Path(root, "freezer.state").write_text("THAWED")

    def _rmdir_cgroups(self) -> None:
        for top in self._cgroup_dirs():
            for root, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(root)

    def _daemon(self, ns: str, hostname: str, argv: list[str], out: str) -> None:
        with open(self.dir / out, "ab") as f:
            self._children.append(subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{ns}", "--", "unshare", "--uts", "--", "sh", "-c",
                 'hostname "$0" && exec "$@"', hostname, *argv],
                stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True, env=self.env, cwd="/"))

    def _start_munge(self) -> None:
        m = self.dir / "munge"
        key = m / "munge.key"
        if not key.exists():
            _run("mungekey", "--create", f"--keyfile={key}")
        os.chmod(key, 0o600)
        _run("munged", "--force", f"--socket={m}/munge.socket", f"--key-file={key}",
             f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed")

    def start_node(self, node: str) -> None:
        self._daemon(self.node_namespace(node), node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)],
                     f"slurmd-{node}.out")

    def kill_node(self, node: str) -> None:
        """The node dies: SIGKILL its slurmd (its jobs' processes are left to the caller)."""
        for pid in self._daemon_pids("slurmd"):
            argv = _cmdline(pid)
            if "-N" in argv and argv[argv.index("-N") + 1] == node:
                os.kill(pid, signal.SIGKILL)
        self._reap()

    def restart_node(self, node: str) -> None:
        self.start_node(node)
        self.exec(["scontrol", "update", f"NodeName={node}", "State=RESUME"])

    def running(self) -> bool:
        return bool(self._daemon_pids("slurmctld"))

    def node_states(self) -> dict[str, str]:
        out = self.exec(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=15).stdout.split()
        return dict(zip(out[::2], out[1::2]))

    def status(self) -> str:
        if not self.running():
            return "down"
        return self.exec(["sinfo"], timeout=15).stdout.rstrip()

    def _reap(self) -> None:
        for p in self._children:
            p.poll()
        self._children = [p for p in self._children if p.returncode is None]

    # -- up and down ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialises up and down of any cluster on this machine (the namespace names are shared)."""
        os.makedirs(os.path.dirname(LOCK), exist_ok=True)
        with open(LOCK, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def up(self, timeout: float = 60.0, quiet: bool = False) -> bool:
        """Start the cluster and wait until sinfo shows every node idle; False if it was up already."""
        say = (lambda *_: None) if quiet else print
        with self._lock():
            if self.running():
                say(f"the Slurm cluster is up already (state and logs in {self.dir})")
                return False
            foreign = self._foreign()
            if foreign:
                raise RuntimeError(f"another Slurm cluster runs in the {PREFIX}* namespaces ({foreign}); "
                                   f"stop it first: MLJOBS_SLURM_DIR={Path(foreign).parent} "
                                   f"scripts/slurm-cluster down")
            self.install()
            self._down()  # leftovers of a cluster that died without `down`
            self._write_config()
            self._network()
            self._start_munge()
            self._daemon(self.controller_namespace, self.controller_hostname,
                         ["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
            for n in NODES:
                self.start_node(n)
            deadline = time.monotonic() + timeout
            states: dict[str, str] = {}
            dead: list[object] = []
            while time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    states = self.node_states()
                if len(states) == len(NODES) and all(s == "idle" for s in states.values()):
                    ctl = f"{self.controller_hostname} at {self.controller_address}"
                    say(f"Slurm cluster up: slurmctld {ctl}, "
                        f"nodes {', '.join(f'{n} ({self.node_address(n)})' for n in NODES)}, partition "
                        f"{self.partition}; slurm.conf, state and logs in {self.dir}")
                    return True
                self._reap()
                dead = [p.args[-4:] for p in self._children if p.returncode is not None]
                if not self._daemon_pids("slurmctld") or len(self._daemon_pids("slurmd")) < len(NODES):
                    time.sleep(0.5)  # one more look, then give up: a daemon exited
                    if not self._daemon_pids("slurmctld") or len(self._daemon_pids("slurmd")) < len(NODES):
                        break
                time.sleep(0.2)
            took = time.monotonic() - deadline + timeout
            logs = "\n".join(_tail(p if p.exists() else p.with_suffix(".out"), 12) for p in self.logs())
            self._down()
            raise RuntimeError(f"the Slurm cluster did not come up (gave up after {took:.0f} s; sinfo: "
                               f"{states or 'no answer'}{'; exited: ' + str(dead) if dead else ''}); "
                               f"state kept in {self.dir}; last log lines:\n{logs}")

    def down(self, quiet: bool = False, keep: bool = False, timeout: float = 30.0) -> None:
        """Cancel every job, wait for an empty queue, stop every daemon and process of the cluster,
        delete the namespaces and (unless ``keep``) the state dir; raises if anything is left."""
        say = (lambda *_: None) if quiet else print
        with self._lock():
            foreign = self._foreign()
            if foreign:
                raise RuntimeError(f"the Slurm cluster in the {PREFIX}* namespaces is another one "
                                   f"({foreign}); not touching it "
                                   f"(MLJOBS_SLURM_DIR={Path(foreign).parent} to stop it)")
            left = self._down(timeout)
            if not keep:
                shutil.rmtree(self.dir, ignore_errors=True)
        if left:
            raise RuntimeError(f"processes left after down: {left}")
        say(f"Slurm cluster down ({'state kept in ' + str(self.dir) if keep else 'state dir removed'})")

    def _down(self, timeout: float = 30.0) -> list[str]:
        jobs: list[str] = []
        if self.running():
            with contextlib.suppress(subprocess.TimeoutExpired):  # a hung slurmctld is killed below
                jobs = self.exec(["squeue", "-h", "-o", "%A"], timeout=15).stdout.split()
                if jobs:
                    self.exec(["scancel", *jobs], timeout=15)
            if jobs:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        if not self.exec(["squeue", "-h"], timeout=15).stdout.strip():
                            break
                    time.sleep(0.2)
        nodes = self._daemon_pids("slurmd")
        _kill(nodes, signal.SIGTERM)
        self._wait_gone(nodes, 10)
        ctl = self._daemon_pids("slurmctld")
        _kill(ctl, signal.SIGTERM)
        self._wait_gone(ctl, 10)
        # whatever is left: jobs' processes, slurmstepd, daemons that did not stop
        inodes = self._ns_inodes(self.namespaces())
        for _ in range(50):
            self._thaw()
            rest = (self._pids_in(inodes) | self._cgroup_pids() | self._daemon_pids("slurmd")
                    | self._daemon_pids("slurmctld"))
            if not rest:
                break
            _kill(rest, signal.SIGKILL)
            self._wait_gone(rest, 2)
        munged = self._munged_pids()
        _kill(munged, signal.SIGTERM)
        if not self._wait_gone(munged, 5):
            _kill(munged, signal.SIGKILL)
            self._wait_gone(munged, 5)
        self._reap()
        self._rmdir_cgroups()
        left = self._pids_in(inodes) | self._cgroup_pids() | self._daemon_pids("slurmd") \
            | self._daemon_pids("slurmctld") | self._munged_pids()
        for ns in self.namespaces():
            _run("ip", "netns", "delete", ns, check=False)
        return [f"{p}: {' '.join(_cmdline(p))}" for p in sorted(left)]

    def _wait_gone(self, pids: set[int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids):
            self._reap()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


def main(argv: list[str]) -> int:
    c = Cluster()
    cmd = argv[0] if argv else "status"
    try:
        if cmd == "up":
            reason = unavailable_reason()
            if reason:
                print(f"cannot start a Slurm cluster here: {reason}", file=sys.stderr)
                return 2
            c.up()
        elif cmd == "down":
            c.down(keep="--keep" in argv[1:])
        elif cmd == "status":
            print(c.status())
            if c.running():
                print(f"(state dir {c.dir}; logs: {', '.join(str(p) for p in c.logs())})")
        elif cmd == "exec":
            args = argv[1:]
            if args and args[0] == "--":
                args = args[1:]
            if not args:
                print("usage: slurm-cluster exec -- CMD ...", file=sys.stderr)
                return 2
            if not os.path.exists(f"/run/netns/{c.controller_namespace}"):
                print("the Slurm cluster is down (scripts/slurm-cluster up)", file=sys.stderr)
                return 2
            os.execvpe("nsenter", [*c.run_prefix, *args], c.env)
        else:
            print(__doc__, file=sys.stderr)
            return 0 if cmd in ("-h", "--help", "help") else 2
    except (RuntimeError, InstallError) as e:
        print(f"slurm-cluster {cmd}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
