"""Job webhooks: per-key secrets, Standard Webhooks signatures, allowed destinations, and the outbox that delivers them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from helip.settings import Settings
from helip.tables import FINISHED_STATUSES, Event, Job, WebhookDelivery, utcnow

log = logging.getLogger(__name__)
TERMINAL_EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}
LEASE = timedelta(seconds=120)  # a claimed delivery another dispatcher may retry once this passed (a dead sender)
MAX_BACKOFF_SECONDS = 3600.0


# -- secrets and signatures (https://www.standardwebhooks.com) ---------------------------------------------


def owner_secret(service_secret: bytes, owner: str) -> str:
    """The signing secret of one API key's webhooks, `whsec_` + base64: derived, never stored."""
    key = hmac.new(service_secret, b"helip-webhook-v1:" + owner.encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(key).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`: the webhook-signature header."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, message_id: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    ts = int(time.time() if now is None else now)
    return {"webhook-id": message_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret, message_id, ts, body), "content-type": "application/json",
            "user-agent": "helip-webhooks/1"}


# -- destinations ---------------------------------------------------------------------------------------


def allowed_hosts(settings: Settings) -> tuple[str, ...]:
    return tuple(h.strip().lower() for h in (settings.webhook_allowed_hosts or "").split(",") if h.strip())


def destination_problem(url: str, settings: Settings) -> str | None:
    """Why `url` may not receive webhooks (None: it may): http(s) only, no credentials, a host the operator
    listed in HELIP_WEBHOOK_ALLOWED_HOSTS (an entry `name` allows any port, `name:port` that port only)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "has an invalid port"
    host = parts.hostname.lower()
    allowed = allowed_hosts(settings)
    if host in allowed or f"{host}:{port}" in allowed or f"[{host}]:{port}" in allowed:
        return None
    if not allowed:
        return f"host {host} is not allowed: this service sends webhooks nowhere (HELIP_WEBHOOK_ALLOWED_HOSTS is empty)"
    return f"host {host} is not in this service's allowed webhook hosts"


# -- the outbox -----------------------------------------------------------------------------------------


def _insert_ignore(session: Session, values: dict[str, Any]) -> None:
    name = session.get_bind().dialect.name
    dialect = {"postgresql": postgresql, "sqlite": sqlite}.get(name)
    if dialect is None:
        raise RuntimeError(f"unsupported database dialect {name!r} (Postgres or SQLite)")
    session.execute(dialect.insert(WebhookDelivery).values(**values)
                    .on_conflict_do_nothing(index_elements=["job_id", "dedupe_key"]))


def _job_data(job: Job) -> dict[str, Any]:
    return {"id": job.id, "object": "job", "status": job.status, "stage": job.stage, "name": job.name,
            "metadata": job.meta or {}}


def _enqueue(session: Session, job: Job, event: str, key: str, data: dict[str, Any], at: datetime) -> None:
    payload = {"type": event, "timestamp": at.isoformat(), "data": data}
    _insert_ignore(session, {
        "job_id": job.id, "event": event, "dedupe_key": key, "message_id": "msg_" + secrets.token_hex(16),
        "url": job.spec["webhook"]["url"], "payload": payload, "status": "pending", "attempts": 0,
        "attempt_log": [], "created_at": utcnow(), "next_attempt_at": utcnow(),
    })


def collect(session: Session, *, limit: int = 200) -> int:
    """Turn what happened to jobs with a webhook (stage events, a finished status) into pending deliveries.
    Idempotent: a (job, event) pair is enqueued once, however many dispatchers run. Returns the jobs looked at."""
    jobs = list(session.scalars(select(Job).where(Job.webhook_cursor.is_not(None)).limit(limit)))
    for job in jobs:
        hook = (job.spec or {}).get("webhook") or {}
        wanted, cursor = set(hook.get("events") or ()), job.webhook_cursor
        finished = job.status in FINISHED_STATUSES  # read before the events: nothing written before it is missed
        new = list(session.scalars(select(Event).where(Event.job_id == job.id, Event.id > cursor)
                                   .order_by(Event.id).limit(1000)))
        for ev in new:
            stage = (ev.data or {}).get("stage")
            if "job.stage" in wanted and stage and ev.message.startswith("stage: "):
                _enqueue(session, job, "job.stage", f"stage:{ev.id}",
                         {**_job_data(job), "status": "running", "stage": stage}, ev.created_at)
        done = finished and len(new) < 1000
        if done and TERMINAL_EVENTS.get(job.status) in wanted:
            data = {**_job_data(job), "error": job.error, "finished_at": job.finished_at and job.finished_at.isoformat()}
            if job.status == "succeeded":
                data["result"] = job.result
            _enqueue(session, job, TERMINAL_EVENTS[job.status], TERMINAL_EVENTS[job.status], data,
                     job.finished_at or utcnow())
        session.execute(update(Job).where(Job.id == job.id, Job.webhook_cursor == cursor)
                        .values(webhook_cursor=None if done else (new[-1].id if new else cursor)))
    return len(jobs)


def _claim(session: Session, now: datetime, limit: int) -> list[WebhookDelivery]:
    due = list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.status == "pending",
                                                             WebhookDelivery.next_attempt_at <= now)
                               .order_by(WebhookDelivery.next_attempt_at).limit(limit)))
    won = []
    for d in due:  # compare-and-set: one dispatcher sends each attempt
        res = session.execute(update(WebhookDelivery).where(
            WebhookDelivery.id == d.id, WebhookDelivery.attempts == d.attempts, WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= now).values(next_attempt_at=now + LEASE))
        if getattr(res, "rowcount", 0) == 1:  # an UPDATE's CursorResult
            won.append(d)
    return won


async def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=httpx.Timeout(timeout)) as http:
        async with http.stream("POST", url, content=body, headers=headers) as resp:
            return resp.status_code  # the answer's body is never read


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int | None, str | None]:
    """One POST within `timeout` seconds in all (connect, send, the answer's headers: a receiver that drips its
    answer is cut off too): (status code, error). Redirects are not followed, no proxy from the environment."""
    try:
        code = asyncio.run(asyncio.wait_for(_post(url, body, headers, timeout), timeout))
    except (TimeoutError, httpx.TimeoutException):
        return None, f"no answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"
    if 200 <= code < 300:
        return code, None
    return code, f"HTTP {code}" + (" (redirects are not followed)" if 300 <= code < 400 else "")


def deliver_due(settings: Settings, sessions: sessionmaker[Session], *, limit: int = 20) -> int:
    """Send every due delivery once; a failure is retried later (backoff doubling), until max attempts."""
    with sessions() as session:
        claimed = _claim(session, utcnow(), limit)
        owners = {j.id: j.owner for j in session.scalars(select(Job).where(Job.id.in_({d.job_id for d in claimed})))}
        session.commit()
    secret = settings.signing_secret()
    for d in claimed:
        body = json.dumps(d.payload, separators=(",", ":"), sort_keys=True).encode()
        problem = destination_problem(d.url, settings)  # the allowed hosts may have changed since the submit
        t0 = time.monotonic()
        if problem is None:
            code, error = post(d.url, body, signed_headers(owner_secret(secret, owners[d.job_id]), d.message_id, body),
                               settings.webhook_timeout_seconds)
        else:
            code, error = None, f"destination refused: {problem}"
        attempts, now = d.attempts + 1, utcnow()
        entry = {"at": now.isoformat(), "status_code": code, "error": error,
                 "ms": round((time.monotonic() - t0) * 1000)}
        values: dict[str, Any] = {"attempts": attempts, "attempt_log": [*(d.attempt_log or []), entry]}
        if error is None:
            values.update(status="delivered", delivered_at=now)
        elif problem is not None or attempts >= settings.webhook_max_attempts:
            values.update(status="failed")
        else:
            wait = min(settings.webhook_backoff_seconds * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS)
            values.update(next_attempt_at=now + timedelta(seconds=wait))
        with sessions() as session:
            session.execute(update(WebhookDelivery).where(WebhookDelivery.id == d.id,
                                                          WebhookDelivery.attempts == d.attempts).values(**values))
            session.commit()
        if error is not None:
            log.warning("webhook %s of %s, attempt %d: %s", d.event, d.job_id, attempts, error)
    return len(claimed)


def dispatch_round(settings: Settings, sessions: sessionmaker[Session]) -> int:
    """One round: collect new events into the outbox, then send what is due. Returns deliveries attempted."""
    with sessions() as session:
        collect(session)
        session.commit()
    return deliver_due(settings, sessions)
