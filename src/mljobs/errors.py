"""The exception family of mljobs. Every message names the bad value and what to do."""

from __future__ import annotations

__all__ = [
    "MLJobsError",
    "InvalidArgumentError",
    "NotFoundError",
    "LocalFileNotFoundError",
    "AuthenticationError",
    "PermissionDeniedError",
    "PayloadTooLargeError",
    "StoreBusyError",
    "ConflictError",
    "QuotaExceededError",
    "InvalidTransitionError",
    "ServerUnavailableError",
    "VersionMismatchError",
    "PayloadError",
    "EnvironmentBuildError",
    "SandboxError",
    "InstancesUnavailableError",
    "JobFailedError",
    "RemoteError",
    "RemoteTraceback",
]


class MLJobsError(Exception):
    """Base of every error mljobs raises itself."""


class InvalidArgumentError(MLJobsError, ValueError):
    """A value given by the caller is wrong; the message says which and how to fix it."""


class NotFoundError(MLJobsError, LookupError):
    """A named job, pool, stage or stage path does not exist."""


class LocalFileNotFoundError(NotFoundError, FileNotFoundError):
    """A local file or folder given to the client does not exist (``except FileNotFoundError`` works)."""


class AuthenticationError(MLJobsError):
    """No credentials, or credentials the server does not know (HTTP 401)."""


class PermissionDeniedError(MLJobsError, PermissionError):
    """The caller is known but may not do this (HTTP 403); the message says who may."""


class PayloadTooLargeError(MLJobsError, ValueError):
    """An upload is larger than the server accepts (HTTP 413); the message names the cap and its setting."""



    """The server's database stayed locked or unreachable for too long (HTTP 503); try again."""


class ConflictError(MLJobsError):
    """The request clashes with the current state (a pool that already exists, a busy pool)."""


class QuotaExceededError(MLJobsError):
    """A submission over one of its user's hard quotas (HTTP 429); the message names the limit,
    the current use and who can raise it."""


class InvalidTransitionError(MLJobsError):
    """A job status change that the transition table does not allow."""

    def __init__(self, job_id: str, old: str, new: str) -> None:
        super().__init__(f"job {job_id}: cannot move from {old} to {new}")
        self.job_id, self.old, self.new = job_id, old, new


class ServerUnavailableError(MLJobsError, ConnectionError):
    """The control plane did not answer."""


class StoreBusyError(ServerUnavailableError):
    """The server's database stayed locked or unreachable for too long (HTTP 503); try again."""


class VersionMismatchError(MLJobsError):
    """Client and runtime Python or cloudpickle versions cannot exchange pickles."""


class PayloadError(MLJobsError, ValueError):
    """A payload (function, argument, file, directory) cannot be packaged."""


class EnvironmentBuildError(MLJobsError):
    """A job's pip requirements could not be installed; the message names them and says why."""


class SandboxError(MLJobsError):
    """A job's sandbox (bubblewrap) could not be made; the message names the cause and the fix."""


class InstancesUnavailableError(MLJobsError):
    """A multi-node job's head saw fewer than ``min_instances`` nodes join within its timeout."""


class JobFailedError(MLJobsError):
    """A job ended without a result (cancelled, platform failure, killed by a signal)."""

    def __init__(self, message: str, *, job_id: str | None = None, status: str | None = None) -> None:
        super().__init__(message)
        self.job_id, self.status = job_id, status


class RemoteTraceback(Exception):
    """Carries the job's traceback text; set as ``__cause__`` of a re-raised job exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class RemoteError(MLJobsError):
    """A job raised an exception whose type cannot be rebuilt on the client."""

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name, self.message, self.traceback = type_name, message, traceback

    def __reduce__(self):  # keep it picklable with its three fields
        return (RemoteError, (self.type_name, self.message, self.traceback))
