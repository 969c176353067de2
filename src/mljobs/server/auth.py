"""Who is calling: users with their own tokens, job-scoped tokens, and the local admin.

- A user's token (``mlu_...``) is printed once when the user is made; the store keeps only its
  SHA-256, so a stolen database gives no credentials.
- A job's token (``mlj_<job id>.<HMAC>``) is signed with a secret of the server's and handed to
  the job's instances in place of any token of a person: it acts for the job's owner (see and
  submit the owner's jobs, use the owner's stages), never as an admin, and stops working once
  the job has ended.
- A server with no users, bound to loopback, treats a call without a token as its local admin
  (the zero-configuration embedded default). Once a user exists, every call needs a token.
- ``MLJOBS_TOKEN`` set on the server stays an admin token (the older single shared token).
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from typing import Any

from mljobs.errors import AuthenticationError, InvalidArgumentError, PermissionDeniedError
from mljobs.server.store import Store
from mljobs.spec import is_job_id
from mljobs.status import TERMINAL_VALUES

__all__ = ["Principal", "Authenticator", "hash_token", "make_user", "is_loopback", "host_name", "USER_TOKEN_PREFIX",
           "JOB_TOKEN_PREFIX"]

USER_TOKEN_PREFIX = "mlu_"
JOB_TOKEN_PREFIX = "mlj_"
_CACHE_S = 2.0  # how long a looked-up user or "no users yet" is trusted without asking the store


@dataclasses.dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    name: str
    admin: bool = False
    job_id: str | None = None  # set for a job's own token

    @property
    def owner_filter(self) -> str | None:
        """The owner whose jobs this caller sees; None for all (an admin)."""
        return None if self.admin else self.name

    def may_use(self, owner: str | None) -> bool:
        """Whether this caller may act on a thing owned by ``owner`` (None: shared)."""
        return self.admin or owner is None or owner == self.name

    def require_admin(self, what: str) -> None:
        if not self.admin:
            who = f"the token of job {self.job_id}" if self.job_id else f"user {self.name!r}"
            raise PermissionDeniedError(f"{what} needs an admin; {who} is not one (an admin makes admins "
                                        "with `mljobs user create NAME --admin`)")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def make_user(store: Store, name: str, admin: bool) -> dict[str, Any]:
    """Record a user; the answer holds their token, which exists nowhere else (only its hash is kept).

    The first user must be an admin: once a user exists, a call without a token is refused, so a
    plain first user would leave nobody able to make another (or to stop the server)."""
    if not admin and not store.has_users():
        raise InvalidArgumentError(
            f"user {name!r} would be this server's first user, and the first user must be an admin: once a "
            f"user exists only tokens are accepted, and a plain user cannot make others. Make an admin first: "
            f"mljobs user create {name} --admin (or another name with --admin, then {name} with its token)")
    if not isinstance(name, str) or not (0 < len(name) <= 64) or not all(c.isalnum() or c in "._-@" for c in name):
        raise InvalidArgumentError(f"invalid user name {name!r}: use 1 to 64 letters, digits, '.', '_', '-' or '@'")
    token = USER_TOKEN_PREFIX + secrets.token_urlsafe(32)
    store.create_user(name, hash_token(token), admin)
    return {"name": name, "admin": admin, "token": token}


def host_name(host: str) -> str:
    """The name in a ``Host`` header, without its port ("[::1]:80" -> "::1", "a:8080" -> "a")."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Authenticator:
    """Turns a request's bearer token (or its absence) into a :class:`Principal`."""

    def __init__(self, store: Store, *, loopback: bool, server_token: str | None = None) -> None:
        self.store = store
        self.loopback = loopback
        self.server_token = server_token
        self.local_admin = Principal(getpass.getuser(), admin=True)
        self._key = store.secret("job_token_key").encode()
        self._lock = threading.Lock()
        self._users: dict[str, tuple[float, Principal | None]] = {}  # token hash -> (when, principal)
        self._no_users: tuple[float, bool] = (0.0, False)

    def job_token(self, job_id: str) -> str:
        return f"{JOB_TOKEN_PREFIX}{job_id}.{self._mac(job_id)}"

    def _mac(self, job_id: str) -> str:
        return hmac.new(self._key, job_id.encode(), hashlib.sha256).hexdigest()

    def anonymous_allowed(self) -> bool:
        """No users, no server token, and loopback only: the local admin needs no token."""
        if self.server_token or not self.loopback:
            return False
        return not self.has_users()

    def has_users(self) -> bool:
        """Whether the server has users (read at most once a second)."""
        now = time.monotonic()
        with self._lock:
            when, none = self._no_users
        if now - when > _CACHE_S:
            none = not self.store.has_users()
            with self._lock:
                self._no_users = (now, none)
        return not none

    def forget(self) -> None:
        """Drop cached answers (after users change)."""
        with self._lock:
            self._users.clear()
            self._no_users = (0.0, False)

    def authenticate(self, token: str | None, host: str | None = None) -> Principal:
        """The principal of a request with ``token`` (None: none sent) and the ``Host`` header ``host``."""
        if not token:
            if self.anonymous_allowed():
                if host is not None and not is_loopback(host_name(host)):
                    # A page of another site that rebinds its DNS name to 127.0.0.1 reaches this
                    # server with its own name as Host: only loopback names get the local admin.
                    raise AuthenticationError(
                        f"a call without a token is answered only at a loopback address, and this one named "
                        f"Host {host!r}: use http://127.0.0.1:<port>/ (or localhost), or send a token")
                return self.local_admin
            raise AuthenticationError(
                "this server needs a token: set MLJOBS_TOKEN (or Session(token=...)) to the token printed by "
                "`mljobs user create NAME`")
        if self.server_token and hmac.compare_digest(token, self.server_token):
            return Principal("admin", admin=True)
        if token.startswith(JOB_TOKEN_PREFIX):
            return self._job_principal(token)
        return self._user_principal(token)

    def _user_principal(self, token: str) -> Principal:
        digest = hash_token(token)
        now = time.monotonic()
        with self._lock:
            cached = self._users.get(digest)
        if cached is None or now - cached[0] > _CACHE_S:
            row = self.store.user_by_token_hash(digest)
            cached = (now, Principal(row["name"], admin=bool(row["admin"])) if row else None)
            with self._lock:
                if len(self._users) > 10_000:
                    self._users.clear()
                self._users[digest] = cached
        if cached[1] is None:
            raise AuthenticationError("unknown token; ask an admin for one (`mljobs user create NAME`), or unset "
                                      "MLJOBS_TOKEN to use your own embedded server")
        return cached[1]

    def _job_principal(self, token: str) -> Principal:
        job_id, _, mac = token[len(JOB_TOKEN_PREFIX):].rpartition(".")
        if not is_job_id(job_id) or not hmac.compare_digest(mac, self._mac(job_id)):
            raise AuthenticationError("invalid job token (it is not one this server signed)")
        job = self.store.job_owner_status(job_id)
        if job is None or job[1] in TERMINAL_VALUES:
            raise AuthenticationError(f"the token of job {job_id} is no longer valid: the job has ended")
        return Principal(job[0], admin=False, job_id=job_id)
