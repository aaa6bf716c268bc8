"""The one S3 module: the endpoint, the minio client (timeouts, CA bundle, no redirects), which failures are
transient, and the retry policy (tenacity) that both job reads (core.io) and the artifact store (helip.store) use.

Only failures named here are retried: a dropped or refused connection, a timeout, a 5xx answer, S3's own
"slow down / try again" codes. Anything else (a missing object, a refused credential, a bug in our code)
is raised at once, so a bug is never retried and then reported as a storage outage.
"""

from __future__ import annotations

import functools
import http.client
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from core.errors import StorageError

if TYPE_CHECKING:
    import minio

log = logging.getLogger(__name__)
T = TypeVar("T")

# S3 error codes by what they mean for the caller.
MISSING = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject", "NotFound", "ResourceNotFound", "NoSuchUpload"})
DENIED = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidBucketName", "InvalidObjectName", "InvalidRange"})
CREDENTIALS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AuthorizationHeaderMalformed"})
TRANSIENT = frozenset({"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "OperationAborted",
                       "RequestTimeTooSkewed", "Throttling", "ThrottlingException", "ServerBusy"})


@dataclass(frozen=True)
class S3Config:
    """An S3-compatible endpoint and how calls to it are made. Built by helip.settings from HELIP_S3_* and
    HELIP_STORE_* settings; core never reads the environment itself."""

    endpoint: str  # "host:port" or "http(s)://host:port"
    access_key: str | None = None
    secret_key: str | None = None
    secure: bool = False  # derived from the endpoint's scheme when given as a URL
    region: str | None = None
    attempts: int = 5  # tries in all for one call (HELIP_STORE_RETRIES + 1)
    backoff: float = 0.5  # seconds before the first retry, doubling after each (HELIP_STORE_BACKOFF_SECONDS)
    connect_timeout: float = 10.0  # minio's default waits 5 minutes to connect: a dead endpoint fails in seconds
    read_timeout: float = 120.0

    def __post_init__(self) -> None:
        if "://" in self.endpoint:
            parts = urlsplit(self.endpoint)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/") or parts.query:
                raise StorageError(f"S3 endpoint must be host:port or http(s)://host:port, not {self.endpoint!r}")
            object.__setattr__(self, "secure", parts.scheme == "https")
        if self.attempts < 1 or self.backoff < 0:
            raise StorageError("S3 attempts must be at least 1 and the backoff at least 0")

    @property
    def host(self) -> str:
        """host:port, the form the minio client wants."""
        return urlsplit(self.endpoint).netloc if "://" in self.endpoint else self.endpoint.rstrip("/")


def s3_client(cfg: S3Config) -> minio.Minio:
    """The minio client for `cfg`, cached per config and per process (a forked worker builds its own pool)."""
    return _client(cfg, os.getpid())


@functools.lru_cache(maxsize=16)
def _client(cfg: S3Config, pid: int) -> minio.Minio:
    import certifi
    import minio
    import urllib3

    http_client = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=cfg.connect_timeout, read=cfg.read_timeout),
        maxsize=16,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        # Retries are ours (below); redirects are never followed, so no request goes to another host.
        retries=urllib3.Retry(total=0, redirect=0, raise_on_redirect=False, raise_on_status=False),
    )
    return minio.Minio(cfg.host, access_key=cfg.access_key, secret_key=cfg.secret_key, secure=cfg.secure,
                       region=cfg.region, http_client=http_client)


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of a minio S3Error, else None."""
    from minio.error import S3Error

    return exc.code if isinstance(exc, S3Error) else None


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a failure that the same call may not meet again: the only ones retried."""
    import urllib3.exceptions
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, S3Error):
        return exc.code in TRANSIENT
    if isinstance(exc, ServerError):  # a 5xx whose body was not S3's XML
        return True
    if isinstance(exc, InvalidResponseError):  # e.g. a proxy's HTML error page while the server restarts
        return True
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError,
                            http.client.IncompleteRead, http.client.RemoteDisconnected))


def call(fn: Callable[[], T], cfg: S3Config, *, what: str, transient: Callable[[BaseException], bool] = is_transient) -> T:
    """Run `fn`; retry transient failures `cfg.attempts` times in all with doubling waits. The last failure,
    or the first one that is not transient, is raised as it is: the caller maps it to a domain error."""
    return retrying(cfg.attempts, cfg.backoff, what=what, transient=transient)(fn)


def retrying(attempts: int, backoff: float, *, what: str,
             transient: Callable[[BaseException], bool] = is_transient) -> Callable[[Callable[[], T]], T]:
    """The retry policy as a callable: `retrying(...)(fn)` calls fn under it (tenacity)."""
    import tenacity

    def log_retry(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("%s failed (%s: %s); retrying (%d of %d) in %.2fs", what, type(exc).__name__, exc,
                    state.attempt_number, attempts - 1, state.next_action.sleep if state.next_action else 0.0)

    policy = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=backoff, exp_base=2, min=backoff, max=max(backoff, 60.0)),
        retry=tenacity.retry_if_exception(transient),
        before_sleep=log_retry,
        reraise=True,
    )

    def run(fn: Callable[[], T]) -> T:
        return policy(fn)

    return run


def describe(exc: BaseException) -> str:
    """A short, host-free description of an S3 failure for error messages."""
    code = error_code(exc)
    return code if code else type(exc).__name__


def close_response(resp: Any) -> None:
    """Release a minio response's connection (used after reads and when a stream is dropped)."""
    if resp is None:
        return
    try:
        resp.close()
        resp.release_conn()
    except Exception:  # noqa: BLE001 - the connection is being discarded anyway
        pass
