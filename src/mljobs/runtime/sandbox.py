"""A sandbox per instance, made by bubblewrap (``bwrap``): what a job's payload sees and touches.

The supervisor stays outside (logs, metrics, exit record, cgroups); the payload process it forks
enters the instance's cgroups, then runs ``bwrap ... python -m mljobs.runtime.entry``
(:func:`mljobs.runtime.entry.sandboxed`), which reads its launch record from fd 3 (the go pipe),
takes the job's identity and runs the launcher. An environment build's steps run through
``python -m mljobs.runtime.sandbox --build`` (:func:`build_main`).

Two modes (docs/isolation.md):

- ``personal`` (the embedded default: loopback, no users): the payload runs as the person and
  sees their files as they do, ``/tmp`` included; the network is open. Hidden: the server's own
  state under ``MLJOBS_HOME`` (the store, other jobs' folders, logs, stages) and the server's
  environment variables.
- ``shared`` (a server with users): only the system folders, the interpreter and its packages,
  the environment cache (read-only) and the pool's ``mounts`` exist; a private ``/tmp``; only the
  instance's GPUs' device nodes; and, when the server runs as root, a uid of the job owner's own.

In both, the payload has its own PID and IPC namespaces (its ``/proc`` lists its own processes),
holds no capabilities, and sees ``MLJOBS_HOME`` as a fresh tmpfs that holds only ``job/work`` (its
working directory), ``job/app`` (its payload, read-only) and ``job/out`` (its result), plus the
environment cache read-only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import stat
import sys
from pathlib import Path
from typing import Any

from mljobs.runtime import entry

# shutil, subprocess and mljobs.runtime.egress are imported where they are used: this module is
# also what each step of a sandboxed environment build starts with (build_main)

__all__ = ["Policy", "probe", "inside", "spare_slot", "payload_argv", "payload_env", "write_passwd", "own_for",
           "take_result", "parse_mounts", "build_argv", "build_env", "build_main"]

MODES = ("personal", "shared")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
# what the payload keeps of the server's environment (beyond the job's own variables)
KEEP_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "TERM", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "MLJOBS_TRACE", "SSL_CERT_FILE",
            "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
PERSONAL_ENV = ("HOME", "USER", "LOGNAME", "SHELL")
# the host's outbound proxy settings, as curl, requests, urllib and uv read them: a personal job on the
# host's network keeps them (it reaches what the person reaches); a filtered one gets its proxy's instead
# (mljobs.runtime.egress.job_env), which goes on through the server's own
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy")
# the locale, and what Slurm tells a node's payload about its allocation
KEEP_PREFIXES = ("LC_", "SLURM_")
MULTINODE_NODE_NETWORK = ("this multi-node instance is sandboxed on its node's network, where its job's Ray "
                          "cluster forms, so its egress is not filtered by the job's integrations (docs/isolation.md)")
MULTINODE_OPEN_EGRESS = ("this multi-node instance is sandboxed but shares the host's loopback with its job's "
                         "other instances (no network namespaces here: the server is not root or has no iproute2), "
                         "so its egress is not filtered (docs/isolation.md)")
INSTALL_HINT = "install bubblewrap (`apt-get install bubblewrap`, `dnf install bubblewrap`)"


@dataclasses.dataclass(frozen=True)
class Policy:
    """How one instance is sandboxed; decided by the control plane, carried in ``launch.json``."""

    mode: str  # "personal" or "shared"
    home: str  # MLJOBS_HOME: hidden behind a tmpfs
    uid: int | None = None  # the job's identity (shared mode, server as root); None: the server's own
    mounts: tuple[tuple[str, bool], ...] = ()  # (path, writable): what an admin lets jobs of a pool see
    readable: tuple[str, ...] = ()  # the environment cache and other folders the payload reads
    user: str | None = None  # the job owner's name (shared mode): USER and LOGNAME where the uid is one of ours
    # "open": the network it is given (the host's, or a multi-node job's namespace on its bridge);
    # "proxy": its own, out only through mljobs.runtime.egress; "bridge": a multi-node instance's
    # namespace on its job's bridge (its peers), out to anything else only through that proxy
    net: str = "open"
    allowed: tuple[str, ...] = ()  # with a "proxy": the hosts the job's external access integrations allow
    build_net: str = "open"  # the same for its environment's build (a multi-node payload's net is "open")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "home": self.home, "uid": self.uid,
                "mounts": [list(m) for m in self.mounts], "readable": list(self.readable), "user": self.user,
                "net": self.net, "allowed": list(self.allowed), "build_net": self.build_net}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        return cls(d["mode"], d["home"], d.get("uid"), tuple((str(p), bool(w)) for p, w in d.get("mounts") or ()),
                   tuple(d.get("readable") or ()), d.get("user"), d.get("net", "open"), tuple(d.get("allowed") or ()),
                   d.get("build_net", "open"))

    def describe(self) -> str:
        who = f", uid {self.uid}" + (f" ({self.user})" if self.user else "") if self.uid is not None else ""
        net = ", egress by integrations" if self.net in ("proxy", "bridge") else ""
        return f"sandbox ({self.mode}{who}{net})"

    def filtered(self) -> bool:
        """Whether the job reaches only what its integrations allow (its build goes through a proxy then)."""
        return self.build_net == "proxy"

    def template(self) -> Policy:
        """What a payload process started ahead of its job (a spare) is made with: all but the uid,
        which it takes when its launch record comes."""
        return dataclasses.replace(self, uid=None, user=None, allowed=(), build_net="open")

    def takes(self, job: Policy, gpus: list[int] | None) -> bool:
        """Whether a spare made with this template can run ``job``'s payload (a shared sandbox
        binds only its instance's GPUs, so an instance with GPUs gets a sandbox of its own)."""
        return self == job.template() and not (job.mode == "shared" and gpus)

    def keeps_setuid(self, spare: bool = False) -> bool:
        """Whether the payload entry gets CAP_SETUID/CAP_SETGID to take the job's uid (and nothing
        else): it has a uid to take, or it is a shared spare of a root server (its job's uid comes
        with the launch record, and the entry refuses to run one without)."""
        return self.uid is not None or (spare and self.mode == "shared" and os.geteuid() == 0)


@functools.lru_cache(maxsize=1)
def probe() -> str | None:
    """Why no sandbox can be made here (None: bubblewrap works): run a trivial one once."""
    import shutil
    import subprocess

    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return f"bubblewrap is not installed: {INSTALL_HINT}"
    try:
        out = subprocess.run([bwrap, "--ro-bind", "/", "/", "--unshare-pid", "--unshare-ipc", "--die-with-parent",
                              "true"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"bubblewrap ({bwrap}) could not run: {e}"
    if out.returncode != 0:
        return (f"bubblewrap ({bwrap}) cannot make a sandbox here: {out.stderr.strip()[-300:]} (it needs user "
                "namespaces, or root)")
    return None


def _bwrap() -> str:
    import shutil

    return shutil.which("bwrap") or "bwrap"


def spare_slot(home: str, name: str) -> Path:
    """A spare's folders (``work``, ``out``, ``app``, ``net``), bound where its job's will be; at assignment
    the instance's work and out folders are these, renamed into place."""
    return Path(home, "spares", name)


def inside(home: str) -> dict[str, str]:
    """Where the instance's own folders appear inside its sandbox."""
    job = os.path.join(home, "job")
    return {"work": os.path.join(job, "work"), "app": os.path.join(job, "app"), "out": os.path.join(job, "out"),
            "net": os.path.join(job, "net")}


def interpreter_paths() -> list[str]:
    """The folders this interpreter and its packages live in (a shared sandbox binds them)."""
    found: list[str] = []
    cwd = os.getcwd()
    for p in [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)), *sys.path]:
        if p and p != cwd and os.path.isdir(p) and os.path.realpath(p) != "/":  # not the server's cwd
            found.append(os.path.realpath(p))
    out: list[str] = []
    for p in sorted(set(found), key=len):  # a folder inside one already kept is kept with it
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


class _Argv:
    """A bwrap command line; the folders a mount point needs are made 0755 (bwrap makes them 0700,
    which a job with a uid of its own could not walk through)."""

    def __init__(self, bwrap: str) -> None:
        self.a = [bwrap]
        self.there: dict[str, str] = {}  # what is mounted or made inside: path -> "bind", "tmpfs" or "dir"

    def _exists(self, path: str) -> bool:
        under = [t for t in self.there if path == t or t == "/" or path.startswith(t + "/")]
        if not under:
            return False
        top = max(under, key=len)
        if top == path:
            return True
        return self.there[top] == "bind" and os.path.isdir(path)  # a host folder shows its own

    def system(self) -> None:
        """A shared sandbox's base: the system folders read-only, its own ``/dev`` (with a writable
        ``/dev/shm``) and ``/proc``, a private ``/tmp``."""
        for d in SYSTEM_DIRS:
            if os.path.islink(d):
                self.a += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                self.mount("--ro-bind", d, d)
        self.mount("--dev", "", "/dev")
        # bubblewrap's /dev/shm is root's and 0755: a job's own uid could not make shared memory
        # (Ray's object store, torch's DataLoader workers, multiprocessing's semaphores)
        self.a += ["--perms", "1777"]
        self.mount("--tmpfs", "", "/dev/shm")
        self.mount("--proc", "", "/proc")
        self.a += ["--perms", "1777"]
        self.mount("--tmpfs", "", "/tmp")

    def mount(self, how: str, src: str, dest: str) -> None:
        parents = []
        d = os.path.dirname(dest)
        while not self._exists(d) and d != "/":
            parents.append(d)
            d = os.path.dirname(d)
        for d in reversed(parents):
            self.a += ["--perms", "0755", "--dir", d]
            self.there[d] = "dir"
        self.a += [how, src, dest] if src else [how, dest]
        self.there = {t: k for t, k in self.there.items() if not t.startswith(dest.rstrip("/") + "/")}
        self.there[dest] = "tmpfs" if how in ("--tmpfs", "--dev", "--proc") else "bind"


def payload_argv(policy: Policy, *, work: str, app: str | None, out: str, gpus: list[int] | None,
                 net: str | None = None, passwd: str | None = None, spare: bool = False,
                 python: str = sys.executable) -> list[str]:
    """The bwrap command line that runs the payload entry (:func:`main`) in the instance's sandbox."""
    home = policy.home
    into = inside(home)
    b = _Argv(_bwrap())
    b.a += ["--die-with-parent", "--unshare-pid", "--unshare-ipc", "--cap-drop", "ALL"]
    if policy.keeps_setuid(spare):  # the entry takes the job's uid, which drops these too
        b.a += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    if policy.mode == "personal":
        b.mount("--bind", "/", "/")
        b.mount("--dev-bind", "/dev", "/dev")
        b.mount("--proc", "", "/proc")
    else:
        b.system()
        for g in gpus or []:
            if os.path.exists(f"/dev/nvidia{g}"):
                b.mount("--dev-bind", f"/dev/nvidia{g}", f"/dev/nvidia{g}")
        for n in GPU_NODES if gpus else ():
            if os.path.exists(n):
                b.mount("--dev-bind", n, n)
        for p in interpreter_paths():
            b.mount("--ro-bind", p, p)
        for p, writable in policy.mounts:
            b.mount("--bind" if writable else "--ro-bind", p, p)
        trace_file = os.environ.get("MLJOBS_TRACE")
        if trace_file and os.path.isfile(trace_file):
            b.mount("--bind", trace_file, trace_file)
        if passwd is not None:  # the system's users and the job's own uid (write_passwd)
            b.mount("--ro-bind", passwd, "/etc/passwd")
    b.mount("--tmpfs", "", home)
    for p in policy.readable:
        if os.path.isdir(p):
            b.mount("--ro-bind", p, p)
    b.mount("--bind", work, into["work"])
    b.mount("--bind", out, into["out"])
    if app is not None:
        b.mount("--ro-bind", app, into["app"])
    if policy.net == "proxy":  # its own network namespace (loopback only)
        b.a.append("--unshare-net")
    if policy.net in ("proxy", "bridge") and net is not None:  # the egress proxy's socket's folder
        b.mount("--ro-bind", net, into["net"])
    # Started in "/" (``-m`` puts the working folder first on sys.path, and the job's files must not
    # shadow a module before the entry has taken the job's uid), without the user site (HOME is the
    # job's folder in a shared sandbox); the entry then moves into the work folder.
    flags = ["-s"] if policy.mode == "shared" else []
    return b.a + ["--chdir", "/", "--", python, *flags, "-m", "mljobs.runtime.entry"]


# what an environment build keeps of the server's environment (beyond the index settings)
BUILD_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
             *PROXY_VARS)


def build_argv(policy: Policy, *, build_dir: str, caches: list[str], python: str, net: str | None = None,
               hidden: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The command line prefix that runs one step of an environment build (uv, and whatever a
    package's build code starts) for a job of a shared sandbox: the system folders, the
    interpreters and the pool's mounts read-only; writable only the environment being built and
    the job owner's uv cache; ``MLJOBS_HOME`` (the store, every job's folders) a fresh tmpfs; its
    own PID and IPC namespaces, no capabilities but those the entry drops at once. Through the
    build entry (:func:`build_main`), the step runs as the job's uid where it has one, and with
    ``build_net == "proxy"`` in a network namespace of its own whose one way out is the proxy on
    the Unix socket in ``net`` (the job's integrations and the server's own indexes). ``hidden``:
    system files it reads as empty (a server's uv configuration the job's uid may not read)."""
    b = _Argv(_bwrap())
    b.a += ["--die-with-parent", "--unshare-pid", "--unshare-ipc", "--cap-drop", "ALL"]
    if policy.uid is not None:
        b.a += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    b.system()
    for p in hidden:
        b.a += ["--ro-bind", "/dev/null", p]
    interpreter = os.path.dirname(os.path.dirname(os.path.realpath(python)))
    for p in sorted({*interpreter_paths(), interpreter}, key=len):
        if os.path.isdir(p):
            b.mount("--ro-bind", p, p)
    for p, _writable in policy.mounts:  # a package may be installed from a folder an admin shares
        b.mount("--ro-bind", p, p)
    b.mount("--tmpfs", "", policy.home)
    for p in [*caches, build_dir]:
        os.makedirs(p, exist_ok=True)
        b.mount("--bind", p, p)
    entry_argv = [sys.executable, "-s", "-m", "mljobs.runtime.sandbox", "--build"]
    if policy.uid is not None:
        entry_argv += ["--uid", str(policy.uid)]
    if policy.build_net == "proxy":
        if net is None:
            raise ValueError("a build whose egress goes through a proxy needs the proxy's folder (net)")
        b.a.append("--unshare-net")
        b.mount("--ro-bind", net, inside(policy.home)["net"])
        entry_argv += ["--egress", os.path.join(inside(policy.home)["net"], BUILD_SOCKET)]
    if policy.uid is None and policy.build_net != "proxy":  # nothing for the entry to do: the step runs as it is
        return b.a + ["--chdir", build_dir, "--"]
    # the entry moves into the build folder once it is the job's uid (the folder is that uid's, 0700)
    return b.a + ["--chdir", "/", "--", *entry_argv, "--cwd", build_dir, "--"]


BUILD_SOCKET = "build-egress.sock"


def build_env(env: dict[str, str], cache: str) -> dict[str, str]:
    """A sandboxed build's variables: the index settings and ``UV_*``, what :data:`BUILD_ENV` names
    of the server's, and none of the rest (its secrets)."""
    out = {k: v for k, v in env.items() if k in BUILD_ENV or k.startswith(("UV_", "PIP_", "LC_"))}
    out.update(HOME="/tmp", UV_CACHE_DIR=cache)
    return out


def build_main(argv: list[str]) -> None:
    """Inside a build's sandbox (``--build [--uid N] [--egress SOCKET] --cwd DIR -- CMD...``): take
    the job's uid, start the forwarder to the build's proxy, then become the build step in DIR."""
    cmd = argv[argv.index("--") + 1:]
    opts = argv[:argv.index("--")]
    uid = int(opts[opts.index("--uid") + 1]) if "--uid" in opts else None
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif entry.capabilities():
        raise PermissionError("a build sandbox that holds capabilities got no uid to run as")
    if "--egress" in opts:
        from mljobs.runtime import egress

        entry.start_forwarder(opts[opts.index("--egress") + 1], "")
        os.environ.update(egress.job_env(""))
    os.chdir(opts[opts.index("--cwd") + 1])
    os.execvp(cmd[0], cmd)


def write_passwd(path: Path, policy: Policy) -> None:
    """The ``/etc/passwd`` a shared sandbox sees: the system's, plus the job owner's uid (one of
    ours, which the system does not know) so that ``getpwuid`` answers for it. Written in place:
    a spare's copy is bound already, and a bind follows the file, not its name."""
    try:
        system = Path("/etc/passwd").read_text()
    except OSError:
        system = ""
    lines = [ln for ln in system.splitlines() if policy.uid is None or ln.split(":")[2:3] != [str(policy.uid)]]
    if policy.uid is not None:
        name = policy.user or "mljobs"
        lines.append(f"{name}:x:{policy.uid}:{policy.uid}:{name} (an mljobs job):{inside(policy.home)['work']}:"
                     "/bin/sh")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def payload_env(policy: Policy, job_env: dict[str, str]) -> dict[str, str]:
    """The payload's whole environment: a few of the server's variables, then the job's own."""
    keep = KEEP_ENV + (PERSONAL_ENV if policy.mode == "personal" else ()) + (
        PROXY_VARS if policy.mode == "personal" and policy.net == "open" else ())
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith(KEEP_PREFIXES)}
    if policy.mode == "shared":
        env["HOME"] = inside(policy.home)["work"]
    return {**env, **job_env}


def own_for(policy: Policy, *folders: Path) -> None:
    """Give the job's uid the folders it writes (and what is in them)."""
    if policy.uid is None:
        return
    for top in folders:
        os.chown(top, policy.uid, policy.uid)
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                os.chown(os.path.join(root, name), policy.uid, policy.uid, follow_symlinks=False)


def take_result(out: Path, result: Path) -> str | None:
    """Move the result the payload left in its ``out`` folder to where the server reads it; a
    link or anything but a plain file is refused (the payload owns that folder). Returns why not."""
    src = out / result.name
    try:
        st = os.lstat(src)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        os.unlink(src)
        return f"the payload left {result.name} as something other than a plain file; it was ignored"
    os.replace(src, result)
    return None


def parse_mounts(value: Any, pool: str = "", local: bool = True) -> tuple[tuple[str, bool], ...]:
    """A pool's ``mounts`` option: a list of ``"PATH"`` (read-only) or ``"PATH:rw"``/``"PATH:ro"``;
    each PATH absolute and (``local``: the pool's nodes are this machine) existing. Raises
    ValueError naming the bad entry and the form."""
    where = f"compute pool {pool}: " if pool else ""
    form = "mounts is a list of absolute folders, each 'PATH' (read-only) or 'PATH:rw', e.g. ['/data', '/scratch:rw']"
    if value in (None, ""):
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}{form}; got {value!r}")
    out = []
    for item in value:
        path, _, how = str(item).rpartition(":") if str(item).endswith((":rw", ":ro")) else (str(item), "", "ro")
        if not os.path.isabs(path):
            raise ValueError(f"{where}mount {item!r} is not an absolute path; {form}")
        if local and not os.path.exists(path):
            raise ValueError(f"{where}mount {item!r}: {path} does not exist on this machine")
        out.append((os.path.realpath(path) if local else os.path.normpath(path), how == "rw"))
    return tuple(out)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--build"]:
        sys.exit("usage: python -m mljobs.runtime.sandbox --build [--uid N] [--egress SOCKET] --cwd DIR -- CMD... "
                 "(a payload's sandbox runs python -m mljobs.runtime.entry)")
    build_main(sys.argv[2:])
