"""The Python client of the helip REST API: typed calls, one error type, retries on 429/503, verified resumable downloads."""

from __future__ import annotations

import email.utils
import hashlib
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from api.schemas import (
    CheckpointPublic,
    CheckpointsPage,
    EventPublic,
    EventsPage,
    JobPublic,
    JobsPage,
    MetricsPage,
    WebhookDeliveriesPage,
    WebhookDeliveryPublic,
    WebhookSecret,
)

FINISHED = ("succeeded", "failed", "cancelled")
RETRY_STATUSES = (429, 503)
__all__ = ["Client", "HelipAPIError", "FINISHED"]


class HelipAPIError(Exception):
    """Every failure the client reports: the API's error (`status`, `code`, `message`, `param`), or a
    transport / integrity problem (`status` None, `code` e.g. `connection_error`, `checksum_mismatch`)."""

    def __init__(self, status: int | None, code: str, message: str, param: str | None = None, *,
                 retry_after: float | None = None):
        super().__init__(f"{status or '-'} {code}: {message}" + (f" [{param}]" if param else ""))
        self.status, self.code, self.message, self.param = status, code, message, param
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, resp: httpx.Response) -> HelipAPIError:
        try:
            err = resp.json().get("error") or {}
        except (ValueError, AttributeError):
            err = {}
        if not isinstance(err, dict):
            err = {}
        message = err.get("message") or (resp.text[:500] if resp.text else resp.reason_phrase)
        return cls(resp.status_code, err.get("code") or f"http_{resp.status_code}", message, err.get("param"),
                   retry_after=parse_retry_after(resp.headers.get("Retry-After")))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Client:
    """`Client(base_url, api_key)`: every call returns the API's own pydantic models (api.schemas)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0, retries: int = 5,
                 backoff: float = 0.5, max_wait: float = 60.0, download_attempts: int = 8,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep):
        headers = {"User-Agent": "helip-client/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        # Download links are credentials by themselves (presigned S3 or signed /files URLs): never send the key there.
        self.raw = httpx.Client(timeout=timeout, transport=transport, follow_redirects=False)
        self.retries, self.backoff, self.max_wait = retries, backoff, max_wait
        self.download_attempts = download_attempts
        self._sleep = sleep

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()
        self.raw.close()

    # -- transport -------------------------------------------------------------------------------------------

    def _wait_for(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = getattr(exc, "retry_after", None)
        if hinted is not None:
            return min(float(hinted), self.max_wait)
        return min(self.backoff * 2 ** (state.attempt_number - 1), self.max_wait)

    def _request(self, method: str, path: str, *, safe: bool, **kwargs: Any) -> httpx.Response:
        """One API call; 429/503 (and, for requests safe to repeat, a dropped connection) are retried with
        backoff, waiting what Retry-After says when the server says it."""

        def retryable(exc: BaseException) -> bool:
            if isinstance(exc, HelipAPIError):
                return exc.status in RETRY_STATUSES
            return isinstance(exc, httpx.ConnectError) or (safe and isinstance(exc, httpx.TransportError))

        def once() -> httpx.Response:
            resp = self.http.request(method, path, **kwargs)
            if resp.status_code >= 400:
                raise HelipAPIError.from_response(resp)
            return resp

        retrying = Retrying(stop=stop_after_attempt(self.retries + 1), wait=self._wait_for,
                            retry=retry_if_exception(retryable), sleep=self._sleep, reraise=True)
        try:
            return retrying(once)
        except httpx.TransportError as exc:
            raise HelipAPIError(None, "connection_error", f"{method} {self.base_url}{path}: {exc!r}") from exc

    def _get(self, path: str, model: type[BaseModel], **params: Any) -> Any:
        params = {k: v for k, v in params.items() if v is not None}
        return _parse(model, self._request("GET", path, safe=True, params=params))

    # -- jobs ------------------------------------------------------------------------------------------------

    def create(self, spec: Mapping[str, Any] | BaseModel, idempotency_key: str | None = None) -> JobPublic:
        """Submit a job spec (a dict, or a core.spec.JobSpec); with `idempotency_key` a retry returns the same job."""
        body = spec.model_dump(mode="json", exclude_unset=True) if isinstance(spec, BaseModel) else dict(spec)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        resp = self._request("POST", "/jobs", safe=bool(idempotency_key), json=body, headers=headers)
        return _parse(JobPublic, resp)

    def get(self, job_id: str) -> JobPublic:
        return self._get(f"/jobs/{_q(job_id)}", JobPublic)

    def list(self, status: str | None = None, metadata: Mapping[str, str] | None = None, *,
             page_size: int = 100) -> Iterator[JobPublic]:
        """The caller's jobs, newest first, every page (optionally only one `status` / matching `metadata`)."""
        after = None
        extra = {f"metadata.{k}": v for k, v in (metadata or {}).items()}
        while True:
            page = self._get("/jobs", JobsPage, status=status, limit=page_size, after=after, **extra)
            yield from page.data
            if not page.has_more or not page.data:
                return
            after = page.data[-1].id

    def cancel(self, job_id: str) -> JobPublic:
        """queued -> cancelled, running -> cancelling; a finished job is a 409 HelipAPIError."""
        return _parse(JobPublic, self._request("POST", f"/jobs/{_q(job_id)}/cancel", safe=True))

    def wait(self, job_id: str, on_progress: Callable[[JobPublic], None] | None = None, *, poll: float = 1.0,
             timeout: float | None = None) -> JobPublic:
        """Poll until the job has finished (succeeded, failed or cancelled); `on_progress(job)` after every poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.status in FINISHED:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise HelipAPIError(None, "timeout", f"job {job_id} still {job.status} after {timeout:.0f} s")
            self._sleep(poll)

    def events(self, job_id: str, after: int | None = None, *, follow: bool = False,
               poll: float = 1.0) -> Iterator[EventPublic]:
        """The job's events in order, every page from `after` on; with `follow`, keep polling until the job has
        finished and its last event has been read."""
        while True:
            finished = follow and self.get(job_id).status in FINISHED  # read before the pages: no event is missed
            while True:
                page = self._get(f"/jobs/{_q(job_id)}/events", EventsPage, after=after, limit=1000)
                for ev in page.data:
                    after = ev.id
                    yield ev
                if not page.has_more or not page.data:
                    break
            if not follow or finished:
                return
            self._sleep(poll)

    def metrics(self, job_id: str) -> MetricsPage:
        """Every training step (all pages joined: the cursor is the last step read) and the evaluation results."""
        steps, after_step = [], None
        while True:
            page = self._get(f"/jobs/{_q(job_id)}/metrics", MetricsPage, limit=10000, after_step=after_step)
            steps += page.data
            if not page.has_more or not page.data:
                return MetricsPage(data=steps, eval=page.eval, has_more=False)
            after_step = page.data[-1].step

    def checkpoints(self, job_id: str, *, include_states: bool = False) -> list[CheckpointPublic]:
        """The job's final weights (all pages), and with `include_states` its resumable training states too."""
        out: list[CheckpointPublic] = []
        while True:
            page = self._get(f"/jobs/{_q(job_id)}/checkpoints", CheckpointsPage, limit=100,
                             after=out[-1].id if out else None, include="states" if include_states else None)
            out += page.data
            if not page.has_more or not page.data:
                return out

    def webhook_deliveries(self, job_id: str) -> list[WebhookDeliveryPublic]:
        """The job's webhook messages with every attempt (all pages)."""
        out: list[WebhookDeliveryPublic] = []
        while True:
            page = self._get(f"/jobs/{_q(job_id)}/webhook-deliveries", WebhookDeliveriesPage, limit=1000,
                             after=out[-1].id if out else None)
            out += page.data
            if not page.has_more or not page.data:
                return out

    def webhook_secret(self) -> str:
        """The `whsec_...` secret that signs this key's webhooks (verify with the standardwebhooks package)."""
        return self._get("/webhook-secret", WebhookSecret).secret

    # -- downloads -------------------------------------------------------------------------------------------

    def _final_checkpoint(self, job_id: str, run: str) -> CheckpointPublic:
        finals = [c for c in self.checkpoints(job_id) if c.run == run and c.final]
        if not finals:
            raise HelipAPIError(404, "not_available", f"job {job_id} has no final checkpoint of run '{run}'", "run")
        return max(finals, key=lambda c: c.step)

    def download(self, job_id: str, run: str = "helip", dest: str | Path = ".") -> Path:
        """Fetch the final checkpoint of `run` to `dest` (a file, or a directory for `{run}_final.pt`).

        Bytes go to `dest.part` first; a cut transfer resumes from what is there with an HTTP Range request
        (also across calls), and the whole file must match the API's sha256 and size before it is renamed.
        """
        ck = self._final_checkpoint(job_id, run)
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"{run}_final.pt"
        if dest.is_file() and dest.stat().st_size == ck.size and _sha256(dest) == ck.sha256:
            return dest
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        restarted = False
        for attempt in range(self.download_attempts):
            have = part.stat().st_size if part.exists() else 0
            if have > ck.size:
                part.unlink()
                have = 0
            if have < ck.size:
                try:
                    ck = self._fetch_into(part, have, ck, job_id, run)
                except httpx.TransportError:
                    self._sleep(min(self.backoff * 2 ** attempt, self.max_wait))
                    continue
            if part.stat().st_size < ck.size:
                continue
            if _sha256(part) == ck.sha256 and part.stat().st_size == ck.size:
                part.replace(dest)
                return dest
            part.unlink()
            if restarted:
                raise HelipAPIError(None, "checksum_mismatch",
                                    f"the downloaded file does not match the sha256 the API gives ({ck.sha256})")
            restarted = True  # a stale .part of another file: start over once
        raise HelipAPIError(None, "download_failed",
                            f"could not complete the download of {job_id} {run} in {self.download_attempts} attempts")

    def _fetch_into(self, part: Path, have: int, ck: CheckpointPublic, job_id: str, run: str) -> CheckpointPublic:
        """One GET of the rest of the file, appended to `part`; returns the checkpoint (its link renewed if expired)."""
        if ck.expires_at <= datetime.now(UTC):
            ck = self._final_checkpoint(job_id, run)
        headers = {"Range": f"bytes={have}-"} if have else {}
        with self.raw.stream("GET", ck.url, headers=headers) as resp:
            if resp.status_code == 403:  # an expired or revoked link: a fresh one next time
                return self._final_checkpoint(job_id, run)
            if resp.status_code == 416:
                part.unlink(missing_ok=True)
                return ck
            if resp.status_code not in (200, 206):
                resp.read()
                raise HelipAPIError.from_response(resp)
            start = _range_start(resp.headers.get("Content-Range")) if resp.status_code == 206 else 0
            if start not in (0, have):
                raise HelipAPIError(resp.status_code, "bad_range", f"asked for bytes {have}-, got {start}-")
            with open(part, "ab" if start else "wb") as fh:
                for chunk in resp.iter_bytes():  # as received: a cut keeps every byte that arrived
                    fh.write(chunk)
        return ck


def _q(job_id: str) -> str:
    """A job id as one path segment: nothing in it can reach another route."""
    return quote(str(job_id), safe="")


def _parse(model: type[BaseModel], resp: httpx.Response) -> Any:
    try:
        return model.model_validate(resp.json())
    except ValueError as exc:  # not JSON, or not the shape the API documents (pydantic's error is a ValueError)
        raise HelipAPIError(resp.status_code, "invalid_response",
                            f"{resp.request.method} {resp.request.url.path}: unexpected answer: {exc}"[:500]) from exc


def _range_start(content_range: str | None) -> int | None:
    """`bytes 100-199/200` -> 100."""
    try:
        return int(str(content_range).split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
