"""Job environments: uv virtual environments layered on the server's, cached and shared.

A job that asks for ``pip_requirements`` (or for another interpreter than the server's) runs in
a virtual environment built by uv. The environment sees the server's own packages (its
site-packages are added after the environment's own, so a job's pins win) and adds the
requested ones. Environments are cached under ``$MLJOBS_HOME/envs/<key>``, the key hashing the
normalized requirements, the interpreter and the index settings (and, for a shared sandbox on a
root server, the owner's uid: such an environment is built as that uid and readable by it alone,
docs/isolation.md), so a repeated job starts without any install.

Concurrency: building takes an exclusive ``flock`` on the key's lock file, so two jobs that need
the same new environment build it once; the build happens in a temporary folder that is renamed
into place when complete, so nobody sees a half-built one. A job holds a shared lock while it
runs, so pruning (least recently used first, down to a size cap) never removes an environment
in use.

Runs inside the supervisor: standard library and uv's binary only.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import importlib
import json
import os
import re
import selectors
import shutil
import signal
import site
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mljobs.errors import EnvironmentBuildError

__all__ = [
    "EnvRequest", "EnvCache", "EnvironmentBuildError", "normalize_requirements", "find_interpreter",
    "interpreter_version", "is_server_python", "available_versions", "index_settings", "index_hosts", "server_index_hosts", "server_index_urls", "uv_config_files", "INDEX_VARS",
    "uv_binary",
]

MIN_PYTHON = (3, 10)
META = ".mljobs-env.json"
LAST_USED = ".mljobs-last-used"
# Variables that pick the package index; they are part of an environment's identity.
INDEX_VARS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "UV_INDEX_URL", "UV_EXTRA_INDEX_URL",
              "UV_INDEX", "UV_DEFAULT_INDEX", "UV_FIND_LINKS")
_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def uv_binary() -> str:
    """uv's binary, from the ``uv`` package mljobs depends on (else the one on PATH)."""
    try:
        from uv import find_uv_bin  # the package is only a locator for its binary

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if not found:
            raise EnvironmentBuildError("uv is not installed on the server: pip install uv") from None
        return found


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def normalize_requirements(lines: Iterable[str]) -> list[str]:
    """Requirement lines without comments or blanks, names canonicalized, sorted, deduplicated.

    Option lines (``--index-url ...``) keep their place at the front, in their order.
    """
    reqs: set[str] = set()
    options: list[str] = []
    for raw in lines:
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            if line not in options:
                options.append(line)
            continue
        m = _NAME_RE.match(line)
        if m and "://" not in line.split("@", 1)[0]:
            rest = line[m.end():].replace(" ", "") if "@" not in line else line[m.end():].strip()
            line = _canonical(m.group(1)) + rest
        reqs.add(line)
    return options + sorted(reqs)


def requirement_names(requirements: Iterable[str]) -> list[str]:
    out = []
    for r in requirements:
        m = _NAME_RE.match(r)
        if m and not r.startswith("-"):
            out.append(_canonical(m.group(1)))
    return out


def index_settings(env_vars: dict[str, str]) -> dict[str, str]:
    """The index-related variables of a job's ``env_vars`` (what the install must honour)."""
    return {k: v for k, v in env_vars.items() if k in INDEX_VARS or k.startswith("UV_")}


def index_hosts(urls: Iterable[str]) -> list[tuple[str, int, str]]:
    """The hosts that index URLs (or bare host names) reach: ``(host, port, label)``, the label
    ``host`` for a scheme's own port and ``host:port`` for another (how an integration names it);
    pypi.org brings files.pythonhosted.org, where its files live. Local folders reach no host."""
    out: list[tuple[str, int, str]] = []
    for u in urls:
        u = u.strip()
        named = re.match(r"^[A-Za-z0-9._-]+=(?=[A-Za-z][A-Za-z0-9+.-]*://)", u)  # uv's "name=https://..."
        if named:
            u = u[named.end():]
        if not u or u.startswith(("/", "file:", ".")):
            continue
        parts = urlsplit(u if "://" in u else f"https://{u}")
        try:
            host, explicit = parts.hostname, parts.port
        except ValueError:  # a port that is not a number: nothing this names can be reached
            continue
        if not host:
            continue
        default = 80 if parts.scheme == "http" else 443
        port = explicit or default
        name = f"[{host}]" if ":" in host else host  # an IPv6 address, bracketed as integrations name it
        found = [(host, port, host if port == default else f"{name}:{port}")]
        if host == "pypi.org":
            found.append(("files.pythonhosted.org", 443, "files.pythonhosted.org"))
        out += [h for h in found if h not in out]
    return out


DEFAULT_INDEX = "https://pypi.org/simple"  # uv's and pip's, where no setting names another


def uv_config_files(env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """The uv configuration files the server's own uv reads, as uv finds them (``env``: the
    server's variables): ``UV_CONFIG_FILE`` alone where it is set; else the user's
    (``$XDG_CONFIG_HOME/uv/uv.toml``, else ``~/.config/uv/uv.toml``) and the first system one
    (``$XDG_CONFIG_DIRS``, default ``/etc/xdg``, then ``/etc``); none under ``UV_NO_CONFIG``. Each as
    ``(kind, path)``, kind ``"file"``, ``"user"`` or ``"system"``, only those that exist."""
    env = os.environ if env is None else env
    if env.get("UV_CONFIG_FILE"):
        return [("file", env["UV_CONFIG_FILE"])] if os.path.isfile(env["UV_CONFIG_FILE"]) else []
    if env.get("UV_NO_CONFIG", "").lower() not in ("", "0", "false", "no", "off"):
        return []
    out = []
    config_home = env.get("XDG_CONFIG_HOME") or (os.path.join(env["HOME"], ".config") if env.get("HOME") else "")
    user = os.path.join(config_home, "uv", "uv.toml") if config_home else ""
    if user and os.path.isfile(user):
        out.append(("user", user))
    dirs = [d for d in (env.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":") if d] + ["/etc"]
    system = next((f for f in (os.path.join(d, "uv", "uv.toml") for d in dirs) if os.path.isfile(f)), None)
    if system is not None:
        out.append(("system", system))
    return out


def _config_indexes(path: str) -> tuple[list[str], bool]:
    """The index URLs and find-links locations a uv.toml names (top level, ``[pip]`` and
    ``[[index]]``), and whether it names the default index (``index-url``, or an index with
    ``default = true``). A file uv could not read either names nothing."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, ValueError):
        return [], False
    urls: list[str] = []
    default = False
    for table in (data, data.get("pip") if isinstance(data.get("pip"), dict) else {}):
        for key in ("index-url", "extra-index-url", "find-links"):
            value = table.get(key)
            values = value if isinstance(value, list) else [value] if value else []
            urls += [str(v) for v in values]
        default = default or bool(table.get("index-url")) or table.get("no-index") is True  # no-index: no PyPI
    for index in data.get("index") or []:
        if isinstance(index, dict) and index.get("url"):
            urls.append(str(index["url"]))
            default = default or bool(index.get("default"))
    # a relative folder is the config file's own neighbour, as uv reads it
    here = os.path.dirname(os.path.abspath(path))
    return [u if "://" in u or os.path.isabs(u) else os.path.normpath(os.path.join(here, u)) for u in urls], default


def server_index_urls(env: dict[str, str] | None = None) -> list[str]:
    """Every index and find-links location the server's own uv settings name: its variables
    (:data:`INDEX_VARS`) and its uv configuration files (:func:`uv_config_files`), and uv's
    default index (PyPI) where none of them names another."""
    env = os.environ if env is None else env
    urls = [v for k in INDEX_VARS for v in env.get(k, "").split()]
    default = any(env.get(k) for k in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"))
    for _, path in uv_config_files(env):
        named, names_default = _config_indexes(path)
        urls += named
        default = default or names_default
    if not default and not env.get("UV_NO_INDEX"):
        urls.append(DEFAULT_INDEX)
    return urls


def server_index_hosts(env: dict[str, str] | None = None, urls: list[str] | None = None) -> list[str]:
    """What the server's own index settings reach (``env``: its variables; ``urls``: what
    :func:`server_index_urls` gave already), as integration entries: admins named them, or left uv's
    default index (PyPI), which installs of mljobs' own runtime packages need; a sandboxed build may
    reach them whatever the job's integrations."""
    urls = server_index_urls(env) if urls is None else urls
    return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p, _ in index_hosts(urls)]


# -- interpreters -------------------------------------------------------------------------------
def _search_dirs() -> list[str]:
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and "shims" not in Path(d).parts]
    pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    dirs += sorted(glob.glob(os.path.join(pyenv, "versions", "*", "bin")), reverse=True)
    uv_pythons = os.environ.get("UV_PYTHON_INSTALL_DIR") or os.path.expanduser("~/.local/share/uv/python")
    dirs += sorted(glob.glob(os.path.join(uv_pythons, "*", "bin")), reverse=True)
    return dirs


def is_server_python(python: str) -> bool:
    """Whether ``python`` is this process's own interpreter binary (a venv's link to it counts)."""
    return os.path.realpath(python) == os.path.realpath(sys.executable)


_VERSIONS: dict[str, str] = {}


def interpreter_version(python: str) -> str:
    """The full version (``"3.10.13"``) of an interpreter, asked once and remembered."""
    if python not in _VERSIONS:
        if is_server_python(python):
            _VERSIONS[python] = "%d.%d.%d" % sys.version_info[:3]
        else:
            out = subprocess.run([python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode != 0:
                raise OSError(f"{python} does not run: {out.stderr.strip()[-300:]}")
            _VERSIONS[python] = out.stdout.strip()
    return _VERSIONS[python]


def find_interpreter(version: str) -> str | None:
    """A CPython ``major.minor`` on this machine: PATH (not pyenv shims), pyenv, uv-managed.

    Only versions mljobs' runtime supports (3.10 and later) count.
    """
    if version == "%d.%d" % sys.version_info[:2]:
        return sys.executable
    try:
        if tuple(int(x) for x in version.split(".")) < MIN_PYTHON:
            return None
    except ValueError:
        return None
    for d in _search_dirs():
        candidate = os.path.join(d, f"python{version}")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            try:
                if interpreter_version(candidate).startswith(version + "."):
                    return candidate
            except (OSError, subprocess.SubprocessError):
                continue
    return None


def activate_in_process(python: str) -> bool:
    """Make this (warm, forked) process run as ``python`` of a job environment would, without
    starting that interpreter: True when done, False when only a new interpreter will do.

    Possible when the environment's ``bin/python`` is this very interpreter (a layer over the
    server's packages) and none of the packages it installs is already imported here (a pin of one
    would not take effect). Its site-packages then go first on ``sys.path`` (its ``.pth`` files
    read, as a start would), and ``sys.executable``, ``sys.prefix``, ``VIRTUAL_ENV`` and ``PATH``
    point at it, so that subprocesses and multiprocessing use the environment too.
    """
    venv = Path(python).parent.parent
    if not is_server_python(python) or not (venv / META).is_file():
        return False
    try:
        site_dir = EnvCache._site_packages(venv)
        names = {_top_name(entry) for entry in os.listdir(site_dir)}
    except (OSError, EnvironmentBuildError):
        return False
    if any(name in sys.modules for name in names if name):
        return False
    before = list(sys.path)
    site.addsitedir(str(site_dir))  # adds it (at the end) and runs its .pth files
    added = [p for p in sys.path if p not in before]
    sys.path[:] = [str(site_dir)] + [p for p in added if p != str(site_dir)] + before
    importlib.invalidate_caches()
    sys.executable = python
    sys.prefix = sys.exec_prefix = str(venv)
    os.environ["VIRTUAL_ENV"] = str(venv)
    os.environ["PATH"] = os.pathsep.join([str(venv / "bin"), os.environ.get("PATH", "")])
    return True


def _top_name(entry: str) -> str:
    """The importable top-level name a site-packages entry provides ('' for metadata and the like)."""
    if entry.endswith((".dist-info", ".egg-info", ".pth", ".data")) or entry.startswith("__") or entry == META:
        return ""
    return entry[:-3] if entry.endswith(".py") else entry.split(".")[0]


def available_versions() -> list[str]:
    found = set()
    for d in _search_dirs():
        for p in glob.glob(os.path.join(d, "python3.*")):
            m = re.fullmatch(r"python(3\.\d+)", os.path.basename(p))
            if m and tuple(int(x) for x in m.group(1).split(".")) >= MIN_PYTHON:
                found.add(m.group(1))
    found.add("%d.%d" % sys.version_info[:2])
    return sorted(found, key=lambda v: tuple(map(int, v.split("."))))


# -- requests and the cache ---------------------------------------------------------------------
@dataclasses.dataclass
class EnvRequest:
    """What a job's environment must hold; its :meth:`key` names the cached environment."""

    requirements: list[str]
    python: str = sys.executable
    index: dict[str, str] = dataclasses.field(default_factory=dict)
    runtime_packages: list[str] = dataclasses.field(default_factory=list)  # e.g. cloudpickle==3.1.1
    ship_runtime: bool = False  # copy mljobs itself in (another interpreter than the server's)
    # the job owner's uid on a root server with users: the environment is theirs alone (built as
    # that uid, readable by no other job's uid); None: shared by every job that asks the same
    uid: int | None = None

    @property
    def same_interpreter(self) -> bool:
        return is_server_python(self.python)

    def key(self) -> str:
        ident = {
            "requirements": self.requirements, "runtime": self.runtime_packages, "index": sorted(self.index.items()),
            "python": os.path.realpath(self.python), "version": interpreter_version(self.python),
            "base": sys.prefix if self.same_interpreter else None,
            "mljobs": _mljobs_fingerprint() if self.ship_runtime else None,
        }
        if self.uid is not None:  # (absent otherwise: the keys of shared environments stay as they were)
            ident["uid"] = self.uid
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["uid"] is None:  # (the supervisor sets it; an older node's EnvRequest knows no such field)
            del out["uid"]
        return out


def _mljobs_fingerprint() -> str:
    import mljobs

    pkg = Path(mljobs.__file__).parent
    h = hashlib.sha256(getattr(mljobs, "__version__", "").encode())
    for f in sorted(pkg.rglob("*.py")):
        st = f.stat()
        h.update(f"{f.relative_to(pkg)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _new_path(tree: Path, path: Path) -> Path:
    """``path``, checked to be a new name in a folder that is really inside ``tree``: a build step
    (a package's build code, sandboxed, perhaps as the job's uid) wrote ``tree`` and may have left
    links in it through which this process, writing after it, would write elsewhere (its store, a
    system file). Nothing of the build runs between the check and the write: each step's
    processes end with its sandbox, and no job can write the environment cache."""
    where = os.path.realpath(path.parent)
    if where != os.path.realpath(tree) and not where.startswith(os.path.realpath(tree) + os.sep):
        raise EnvironmentBuildError(f"the environment's build left {path.parent} leading outside the environment "
                                    f"(to {where}); it was not used")
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            raise EnvironmentBuildError(f"the environment's build left a folder at {path}; it was not used")
        os.unlink(path)
    return path


def _write_new(tree: Path, path: Path, text: str) -> None:
    """Write ``text`` as a new file ``path`` in ``tree`` (:func:`_new_path`), never through a link."""
    fd = os.open(_new_path(tree, path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _seal(path: Path, uid: int) -> None:
    """A user's environment, once built: every file the server's (no job can change one), the
    top folder readable by the owner's group only (their jobs run as uid:uid; no other job's
    uid can look in)."""
    me, group = os.geteuid(), os.getegid()
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), me, group, follow_symlinks=False)
    os.chown(path, me, uid)
    os.chmod(path, 0o750)


@dataclasses.dataclass
class Env:
    key: str
    path: Path
    python: str
    cached: bool
    seconds: float
    lock_fd: int  # a shared flock held while the job runs; closing it releases

    def release(self) -> None:
        try:
            os.close(self.lock_fd)
        except OSError:
            pass


USER_CACHE_IDLE_S = 14 * 86400  # a user's uv cache that no build used for this long is removed


def user_caches(cache_root: os.PathLike[str] | str) -> Path:
    """The folder of the per-user uv caches of shared builds, beside the environment cache."""
    return Path(f"{cache_root}-uv")


def _user_cache_lock(top: Path, name: str) -> int:
    locks = top / ".locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    return os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def hold_user_cache(path: os.PathLike[str] | str) -> int:
    """Make a user's uv cache (``<user_caches>/<name>``) and hold it for a build until the returned
    descriptor is closed: a shared lock, taken before the folder is made or marked used, so that
    :func:`prune_user_caches` never removes it under the build."""
    path = Path(path)
    fd = _user_cache_lock(path.parent, path.name)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        path.mkdir(mode=0o700, exist_ok=True)
        os.utime(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def prune_user_caches(cache_root: os.PathLike[str] | str, idle_s: float = USER_CACHE_IDLE_S) -> list[str]:
    """Remove the per-user uv caches no build used for ``idle_s`` (0: every one no build holds
    now); what it removed. A cache is only a cache: the next build of that user fills it again.
    A cache that cannot be removed is left for the next time (its error is logged)."""
    top = user_caches(cache_root)
    try:
        entries = list(top.iterdir())
    except FileNotFoundError:
        return []
    removed, trash = [], []
    for d in entries:
        if d.name.startswith(".trash-"):  # what an earlier prune could not delete
            trash.append(d)
            continue
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            if time.time() - d.stat().st_mtime < idle_s:
                continue
            fd = _user_cache_lock(top, d.name)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if time.time() - d.stat().st_mtime < idle_s:  # a build used it since we looked
                continue
            gone = top / f".trash-{d.name}-{os.getpid()}"
            os.rename(d, gone)  # gone at once (a build starting now makes a fresh one)
            trash.append(gone)
            removed.append(d.name)
        except BlockingIOError:
            continue  # a build is using it
        except OSError as e:
            print(f"mljobs: could not remove the uv cache {d}: {e}", file=sys.stderr)
        finally:
            os.close(fd)
    for d in trash:  # deleted after the locks are let go
        shutil.rmtree(d, ignore_errors=True)
    return removed


# (command, variables, the folder being built) -> the command and variables to run it with
Wrap = Callable[[list[str], dict[str, str], str], tuple[list[str], dict[str, str]]]


class EnvCache:
    def __init__(self, root: os.PathLike[str] | str, max_bytes: int = 10 << 30) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.locks = self.root / ".locks"

    def _lock(self, key: str) -> int:
        self.locks.mkdir(parents=True, exist_ok=True)
        return os.open(self.locks / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def ensure(self, req: EnvRequest, log: Callable[[str], None], timeout_s: float = 900.0,
               wrap: Wrap | None = None) -> Env:
        """The environment for ``req``, built now if not cached; the caller must ``release()`` it.
        ``wrap(cmd, env, build_dir)`` gives the command and variables each build step runs with
        (a sandbox: :func:`mljobs.runtime.sandbox.build_argv`)."""
        t0 = time.monotonic()
        key = req.key()
        final = self.root / key
        fd = self._lock(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # users share; a builder or a pruner excludes
            cached = (final / META).is_file()
            if not cached:
                fcntl.flock(fd, fcntl.LOCK_UN)
                fcntl.flock(fd, fcntl.LOCK_EX)
                cached = (final / META).is_file()  # another job built it while we waited
                if not cached:
                    self._build(req, key, final, log, timeout_s, wrap)
                fcntl.flock(fd, fcntl.LOCK_SH)
            (final / LAST_USED).touch()
        except BaseException:
            os.close(fd)
            raise
        env = Env(key, final, str(final / "bin" / "python"), cached, time.monotonic() - t0, fd)
        if not cached:
            self.prune(keep={key})
        return env

    # -- building ---------------------------------------------------------------------------
    def _build(self, req: EnvRequest, key: str, final: Path, log: Callable[[str], None], timeout_s: float,
               wrap: Wrap | None = None) -> None:
        tmp = self.root / f".build-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        uv = uv_binary()
        env = dict(os.environ, **req.index, UV_NO_PROGRESS="1", NO_COLOR="1")
        for pip_var, uv_var in (("PIP_INDEX_URL", "UV_INDEX_URL"), ("PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL"),
                                ("PIP_FIND_LINKS", "UV_FIND_LINKS")):
            if pip_var in req.index and uv_var not in req.index:
                env[uv_var] = req.index[pip_var]
        env.pop("VIRTUAL_ENV", None)
        deadline = time.monotonic() + timeout_s
        try:
            log(f"building environment {key} with Python {interpreter_version(req.python)}: "
                f"{' '.join(req.requirements) or '(no requirements)'}")
            venv = [uv, "venv", "--quiet", "--relocatable", "--python", req.python, str(tmp)]
            server_in_venv = sys.prefix != sys.base_prefix
            if req.same_interpreter and not server_in_venv:
                venv.insert(2, "--system-site-packages")  # the server's packages are the interpreter's
            tmp.mkdir(parents=True)  # a sandboxed build binds it
            if req.uid is not None:  # built as the job's uid (sandbox.build_argv), seen by no other
                os.chown(tmp, req.uid, req.uid)
                os.chmod(tmp, 0o700)

            def step(cmd: list[str], what: str, reqs: list[str] | None = None) -> None:
                self._run(*(wrap(cmd, env, str(tmp)) if wrap else (cmd, env)), log, deadline, what, reqs)

            step(venv, "create the virtual environment")
            site_dir = self._site_packages(tmp)
            if req.same_interpreter and server_in_venv:
                # The server runs in a venv: see exactly what it sees (its site-packages, and the
                # interpreter's only if its venv does), after the environment's own, so pins win.
                dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
                _write_new(tmp, site_dir / "_mljobs_base.pth",
                           "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
            if req.ship_runtime:
                import mljobs

                shutil.copytree(Path(mljobs.__file__).parent, _new_path(tmp, site_dir / "mljobs"),
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            reqs = [*req.runtime_packages, *req.requirements]
            if reqs:
                req_file = tmp / "mljobs-requirements.txt"
                _write_new(tmp, req_file, "\n".join(reqs) + "\n")
                # --compile-bytecode: a job cannot write .pyc files into the shared environment
                # (read-only in the sandbox), so without them every job compiled its imports again
                step([uv, "pip", "install", "--compile-bytecode", "--python", str(tmp / "bin" / "python"),
                      "-r", str(req_file)], "install", req.requirements)
            meta = {"key": key, "requirements": req.requirements, "runtime_packages": req.runtime_packages,
                    "python": req.python, "python_version": interpreter_version(req.python),
                    "index": req.index, "created": time.time(), "size_bytes": _dir_size(tmp)}
            _write_new(tmp, tmp / META, json.dumps(meta))
            if req.uid is not None:
                _seal(tmp, req.uid)
            shutil.rmtree(final, ignore_errors=True)  # a stale half-removed leftover
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _site_packages(venv: Path) -> Path:
        found = glob.glob(str(venv / "lib" / "python3*" / "site-packages"))
        if not found:
            raise EnvironmentBuildError(f"uv made {venv} without a site-packages folder")
        return Path(found[0])

    @staticmethod
    def _run(cmd: list[str], env: dict[str, str], log: Callable[[str], None], deadline: float, what: str,
             requirements: list[str] | None = None) -> None:
        """Run uv in its own process group, streaming its output to ``log``; kill it on any exit."""
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        assert proc.stdout is not None
        out: list[str] = []
        try:
            os.set_blocking(proc.stdout.fileno(), False)
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                buf = b""
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise EnvironmentBuildError(
                            f"{what} timed out: pip requirements {requirements} were still installing when the "
                            "install time limit passed (server setting install_timeout_s)")
                    if not sel.select(min(left, 1.0)):
                        continue
                    chunk = proc.stdout.read()
                    if chunk is None:
                        continue
                    if not chunk:
                        break
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for ln in lines:
                        text = ln.decode("utf-8", "replace").rstrip()
                        out.append(text)
                        log(text)
                if buf:
                    out.append(buf.decode("utf-8", "replace"))
                    log(out[-1])
            code = proc.wait()
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if code != 0:
            raise EnvironmentBuildError(_explain(what, requirements, out))

    # -- listing and pruning ----------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        out = []
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            meta_file = d / META
            if d.name.startswith(".") or not meta_file.is_file():
                continue
            try:
                meta = json.loads(meta_file.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            try:
                last_used = (d / LAST_USED).stat().st_mtime
            except OSError:
                last_used = meta.get("created", 0.0)
            out.append({**meta, "path": str(d), "last_used": last_used, "in_use": self._in_use(meta["key"])})
        return sorted(out, key=lambda e: e["last_used"], reverse=True)

    def _in_use(self, key: str) -> bool:
        fd = self._lock(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def prune(self, max_bytes: int | None = None, *, keep: set[str] | None = None,
              recent_s: float = 60.0) -> list[dict[str, Any]]:
        """Remove least recently used environments not in use until the cache fits ``max_bytes``
        (default: the cache's cap; 0 removes every idle one), and the per-user uv caches no build
        used for :data:`USER_CACHE_IDLE_S` (with 0: every idle one). Returns the environments it removed."""
        prune_user_caches(self.root, 0.0 if max_bytes == 0 else USER_CACHE_IDLE_S)
        cap = self.max_bytes if max_bytes is None else max_bytes
        entries = self.entries()
        total = sum(e["size_bytes"] for e in entries)
        removed = []
        for e in reversed(entries):  # least recently used first
            if total <= cap:
                break
            if keep and e["key"] in keep or time.time() - e["last_used"] < recent_s:
                continue  # just built or just chosen: its user may not hold its lock yet
            fd = self._lock(e["key"])
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a job is using it
            try:
                trash = self.root / f".trash-{e['key']}-{os.getpid()}"
                os.rename(e["path"], trash)  # gone from the cache at once, then deleted
                shutil.rmtree(trash, ignore_errors=True)
                total -= e["size_bytes"]
                removed.append(e)
            finally:
                os.close(fd)
        return removed


def _explain(what: str, requirements: list[str] | None, output: list[str]) -> str:
    """The resolver's reason, first, naming the requirement(s) it is about."""
    cleaned = [re.sub(r"^(error|cause|hint):\s*", "", re.sub(r"^[\s×╰─▶│|>]+", "", ln).strip()) for ln in output]
    reason_lines = [ln for ln in cleaned if ln and not ln.lower().startswith(("using ", "resolved ", "prepared "))]
    reason = ": ".join(reason_lines[-6:]) or "uv failed without saying why"
    if requirements is None:
        return f"could not {what}: {reason}"
    text = " ".join(cleaned).lower()
    named = [r for r in requirements if not r.startswith("-") and
             any(n in text for n in requirement_names([r]))] or requirements
    return f"could not install pip requirement(s) {', '.join(named)}: {reason}"
