"""Session: a connection to a control plane with a current namespace, and its HTTP client."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import httpx

from mljobs import errors
from mljobs.client.embedded import ensure_server
from mljobs.config import load_settings
from mljobs.paths import HomePaths
from mljobs.spec import DEFAULT_DATABASE, DEFAULT_SCHEMA
from mljobs.stages import parse_stage_path

__all__ = ["Session", "SessionBuilder", "get_active_session", "FileOperation"]

_ERRORS: dict[str, type[Exception]] = {
    name: getattr(errors, name) for name in errors.__all__ if isinstance(getattr(errors, name), type)
}
_ERRORS["UnsupportedError"] = errors.InvalidArgumentError
_active: Session | None = None
_active_lock = threading.Lock()


class FileOperation:
    """``session.file``: put, get and list stage files."""

    def __init__(self, session: Session) -> None:
        self._s = session

    def put(self, local_path: str | os.PathLike[str], stage_location: str) -> list[dict[str, Any]]:
        """Upload a file, or every file of a folder, to ``@stage/path/`` (a folder) or a file path."""
        src = Path(local_path)
        if not src.exists():
            raise errors.LocalFileNotFoundError(f"local path {str(src)!r} does not exist")
        stage, rel = parse_stage_path(stage_location)
        if src.is_dir():
            files = [(p, p.relative_to(src).as_posix()) for p in sorted(src.rglob("*")) if p.is_file()]
            base = rel if rel.endswith("/") or not rel else rel + "/"
        else:
            files = [(src, src.name)]
            base = rel if (rel.endswith("/") or not rel) else None
        out = []
        for path, name in files:
            target = f"{base}{name}" if base is not None else rel
            with open(path, "rb") as f:  # streamed in chunks, never read whole
                out.append(self._s.request("PUT", f"/stages/{stage}/files/{target}", content=_chunks(f)).json())
        return out

    def list(self, stage_location: str) -> list[dict[str, Any]]:
        stage, rel = parse_stage_path(stage_location)
        return self._s.request("GET", f"/stages/{stage}/list", params={"path": rel}).json()

    def get(self, stage_location: str, local_dir: str | os.PathLike[str]) -> list[str]:
        """Download a stage file, or every file under a stage folder, into ``local_dir``."""
        stage, rel = parse_stage_path(stage_location)
        entries = self.list(stage_location)
        target = Path(local_dir)
        target.mkdir(parents=True, exist_ok=True)
        prefix = rel.rstrip("/")
        written = []
        for e in entries:
            name = e["name"]
            local_rel = name[len(prefix) + 1:] if prefix and name.startswith(prefix + "/") else Path(name).name
            dest = target / local_rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._s.download(f"/stages/{stage}/files/{name}", dest)
            written.append(str(dest))
        return written


def _chunks(f: Any, size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


class Session:
    """A connection to an mljobs control plane.

    Build one with ``Session.builder.config("url", ...).getOrCreate()``; with no URL configured
    (argument, ``MLJOBS_URL`` or ``$MLJOBS_HOME/config.toml``) the embedded local server is
    started on first use. Inside a job, ``Session.builder.getOrCreate()`` returns the job's own.
    """

    def __init__(self, url: str | None = None, *, token: str | None = None, database: str | None = None,
                 schema: str | None = None, home: str | os.PathLike[str] | None = None) -> None:
        settings = load_settings(home)
        self.home = HomePaths(settings.home)
        self._configured_url = url or settings.url
        self._url: str | None = self._configured_url
        self.token = token or settings.token
        self.database = (database or settings.database or DEFAULT_DATABASE).upper()
        self.schema = (schema or settings.schema or DEFAULT_SCHEMA).upper()
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        self._features: tuple[str, frozenset[str]] | None = None  # (the server's URL, what it said)
        self.file = FileOperation(self)

    class _BuilderDescriptor:
        def __get__(self, obj: Any, owner: type[Session]) -> SessionBuilder:
            return SessionBuilder()

    builder = _BuilderDescriptor()

    @property
    def url(self) -> str:
        """The control plane's URL (starts the embedded server if none is configured)."""
        with self._lock:
            if self._url is None:
                self._url = ensure_server(self.home)
            return self._url

    def _http(self) -> httpx.Client:
        if self._client is None:
            headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
            self._client = httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=60.0)
        return self._client

    def request(self, method: str, path: str, *, timeout: float | None = None, root: bool = False,
                **kw: Any) -> httpx.Response:
        """One API call; errors come back as the mljobs exception the server named. ``root``: the
        path is the server's own (``/health``), not the API's; it follows the server's URL when an
        embedded server started again answers on another port."""

        def send() -> httpx.Response:
            return self._http().request(method, self.url + path if root else path, timeout=timeout or 60.0, **kw)

        try:
            resp = send()
        except httpx.TransportError as e:
            where = ("MLJOBS_URL/config" if self._configured_url else f"the embedded server of {self.home.root}")
            # the embedded server went away before the request reached it: start it again once
            if self._configured_url is None and isinstance(e, httpx.ConnectError):
                self._url, self._client = None, None
                try:
                    resp = send()
                except httpx.TransportError:
                    raise errors.ServerUnavailableError(
                        f"no mljobs server answers at {self._url} ({where}): {e}") from None
            else:
                raise errors.ServerUnavailableError(
                    f"no mljobs server answers at {self.url} (from {where}): {e}; start one with "
                    "`mljobs server start`, or unset MLJOBS_URL to use the embedded one") from None
        if resp.status_code >= 400:
            raise self._error(resp)
        return resp

    @staticmethod
    def _error(resp: httpx.Response) -> Exception:
        try:
            body = resp.json()
        except ValueError:
            return errors.MLJobsError(f"HTTP {resp.status_code}: {resp.text[:500]}")
        cls = _ERRORS.get(body.get("error", ""), errors.MLJobsError)
        detail = body.get("message") or body.get("detail", resp.text)  # 422s carry a readable "message"
        if cls is errors.InvalidTransitionError:
            return errors.ConflictError(detail)
        if cls is errors.JobFailedError:
            return errors.JobFailedError(detail, status=body.get("status"))
        if not isinstance(detail, str):  # FastAPI validation errors
            return errors.InvalidArgumentError(str(detail))
        return cls(detail)

    def download(self, path: str, dest: Path) -> None:
        """Stream a GET's body into the file ``dest`` (written whole or not at all)."""
        tmp = dest.with_name(dest.name + ".part")
        try:
            with self._http().stream("GET", path, timeout=60.0) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise self._error(resp)
                with open(tmp, "wb") as f:
                    for chunk in resp.iter_bytes(1 << 20):
                        f.write(chunk)
            os.replace(tmp, dest)
        except httpx.TransportError as e:
            raise errors.ServerUnavailableError(f"the download of {path} from {self.url} broke off: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def get_current_database(self) -> str:
        return self.database

    def get_current_schema(self) -> str:
        return self.schema

    def use_database(self, name: str) -> None:
        self.database = name.upper()

    def use_schema(self, name: str) -> None:
        self.schema = name.upper()

    def server_info(self) -> dict[str, Any]:
        """The server's ``/health``: its version, Python, isolation, features (an error status or
        no answer raises, as any call does)."""
        return self.request("GET", "/health", root=True).json()

    def features(self) -> frozenset[str]:
        """What the server says it does beyond its version (``/health``'s ``features``; none from
        an older server), asked once per server this session reaches."""
        url = self.url
        if self._features is None or self._features[0] != url:
            self._features = (url, frozenset(self.server_info().get("features") or ()))
        return self._features[1]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __repr__(self) -> str:
        return f"Session(url={self._url or '<embedded>'}, database={self.database}, schema={self.schema})"


class SessionBuilder:
    def __init__(self) -> None:
        self._options: dict[str, Any] = {}

    def config(self, key: str, value: Any) -> SessionBuilder:
        if key not in ("url", "token", "database", "schema", "home"):
            raise errors.InvalidArgumentError(
                f"unknown session option {key!r}; use url, token, database, schema or home")
        self._options[key] = value
        return self

    def configs(self, options: dict[str, Any]) -> SessionBuilder:
        for k, v in options.items():
            self.config(k, v)
        return self

    def create(self) -> Session:
        global _active
        session = Session(**self._options)
        with _active_lock:
            _active = session
        return session

    def getOrCreate(self) -> Session:  # noqa: N802 - mirrors the reference API
        global _active
        with _active_lock:
            if _active is not None and all(getattr(_active, k, None) == v or k == "url" and _active._url == v
                                           for k, v in self._options.items() if k not in ("home",)):
                return _active
        return self.create()


def get_active_session() -> Session:
    """The active session; the default one (from settings, or the embedded server) if none yet."""
    return Session.builder.getOrCreate()
