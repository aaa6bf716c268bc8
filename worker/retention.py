"""What a job keeps in the store: training-state keys, pruning states beyond `train.keep_states`, and the
store reaper that removes what a crash left behind (objects of deleted jobs, unrecorded or surplus states).

The cache of embeddings and hard pairs (core.cache, `cache/` next to `jobs/`) has its own round, reap_cache:
entries past an age or beyond a size bound go, least recently used first, never one a job used recently.

A state lives alone under its own key prefix (`jobs/<id>/states/<run>/<step>/state.pt`), so deleting it is
one `Store.delete_prefix` call. The order is always: the newer state is uploaded and its row committed,
then each older object is deleted, then its row. A crash between two of these leaves either a surplus row
(its object may already be gone) or an object without a row; the reaper clears both.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from core.errors import StorageError
from helip import crud
from helip.store import Store, job_key
from helip.tables import FINISHED_STATUSES

log = logging.getLogger(__name__)

STATES_DIR = "states"
JOBS_DIR = "jobs"
# Test hook, unset in production: `<point>=<seconds>` sleeps at that point of storing a training state, so
# a fault test can SIGKILL the worker exactly there. Points: after_state_upload (the object is stored, its
# row not yet recorded), after_state_record (the row is committed, older states not yet deleted) and
# shard_mined (a mining shard's lists are computed, not yet stored: worker/shards.py).
PAUSE_ENV = "HELIP_TEST_PAUSE"
PAUSE_POINTS = ("after_state_upload", "after_state_record", "shard_mined")


def state_prefix(job_id: str, run: str, step: int) -> str:
    """The key prefix that holds one training state (and nothing else)."""
    return job_key(job_id, STATES_DIR, run, f"{step:09d}")


def state_key(job_id: str, run: str, step: int) -> str:
    return f"{state_prefix(job_id, run, step)}/state.pt"


def final_key(job_id: str, run: str, filename: str) -> str:
    """Final weights keep the file name core wrote (`checkpoints/<run>_final.pt`)."""
    return job_key(job_id, "checkpoints", filename)


def fault_pause(point: str) -> None:
    """Sleep when HELIP_TEST_PAUSE names `point` (see PAUSE_ENV); a no-op otherwise."""
    name, _, seconds = (os.environ.get(PAUSE_ENV) or "").partition("=")
    if name == point and float(seconds or 0) > 0:
        log.warning("test hook %s: sleeping %s s at %s", PAUSE_ENV, seconds, point)
        time.sleep(float(seconds))


def prune_states(sessions: sessionmaker[Session], store: Store, *, job_id: str, keep: int,
                 run: str | None = None) -> list[int]:
    """Delete the job's surplus states (object first, then row); returns the steps removed."""
    with sessions() as session:
        surplus = [(ck.id, ck.step, ck.key) for ck in crud.surplus_states(session, job_id=job_id, keep=keep, run=run)]
    states = f"{job_key(job_id, STATES_DIR)}/"
    removed = []
    for ck_id, step, key in surplus:
        if not key.startswith(states):
            continue  # a key of an older layout: one object that delete_prefix cannot single out; kept
        store.delete_prefix(key.rsplit("/", 1)[0])
        with sessions() as session:
            crud.delete_checkpoint(session, checkpoint_id=ck_id)
            session.commit()
        removed.append(step)
    return removed


def list_keys(store: Store, prefix: str) -> Iterator[str]:
    """Every object key under `prefix` (which ends with '/')."""
    yield from store.list_keys(prefix)


@dataclass
class StoreReapReport:
    """What one store round removed."""

    deleted_jobs: list[str] = field(default_factory=list)  # job prefixes with no job row
    unrecorded_states: list[str] = field(default_factory=list)  # state objects of finished jobs with no row
    surplus_states: dict[str, list[int]] = field(default_factory=dict)  # job id -> steps pruned

    def __bool__(self) -> bool:
        return bool(self.deleted_jobs or self.unrecorded_states or self.surplus_states)


def reap_store(sessions: sessionmaker[Session], store: Store) -> StoreReapReport:
    """One pass: prune surplus states (by the rows), then remove objects that no row accounts for.

    Objects of a job that still runs are left alone unless a row marks them surplus: its worker may have
    uploaded a state whose row it is about to commit.
    """
    report = StoreReapReport()
    with sessions() as session:
        candidates = crud.jobs_with_surplus_states(session)
    for job_id, keep in candidates:
        steps = prune_states(sessions, store, job_id=job_id, keep=keep)
        if steps:
            report.surplus_states[job_id] = steps
    by_job: dict[str, list[str]] = {}
    for key in list_keys(store, f"{JOBS_DIR}/"):
        parts = key.split("/")
        if len(parts) >= 3:
            by_job.setdefault(parts[1], []).append(key)
    with sessions() as session:
        statuses = crud.job_statuses(session, job_ids=list(by_job))
    for job_id, keys in by_job.items():
        if job_id not in statuses:
            store.delete_prefix(job_key(job_id))
            report.deleted_jobs.append(job_id)
            continue
        if statuses[job_id] not in FINISHED_STATUSES:
            continue
        with sessions() as session:
            recorded = {ck.key for ck in crud.list_checkpoints(session, job_id=job_id)[0]}
        states = f"{job_key(job_id, STATES_DIR)}/"
        for key in keys:
            if key.startswith(states) and key not in recorded:
                store.delete_prefix(key.rsplit("/", 1)[0])
                report.unrecorded_states.append(key)
    return report


@dataclass
class CacheReapReport:
    """What one cache round removed (entry prefixes `cache/<kind>/<key>`) and what the cache holds after it."""

    expired: list[str] = field(default_factory=list)  # unused for longer than the age bound
    evicted: list[str] = field(default_factory=list)  # least recently used, beyond the size bound
    incomplete: list[str] = field(default_factory=list)  # no readable meta.json and not written recently
    kept_bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.expired or self.evicted or self.incomplete)


def _json_or_none(store: Store, key: str) -> dict | None:
    import json

    try:
        doc = json.loads(store.get_bytes(key))
    except (StorageError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def reap_cache(store: Store, *, max_age_seconds: float, max_bytes: int | None, in_use_seconds: float,
               now: float | None = None) -> CacheReapReport:
    """One pass over core.cache's entries: drop incomplete ones, those unused past the age bound, then the least
    recently used until the rest fits `max_bytes`. An entry used (looked up or written) within `in_use_seconds`
    is never touched: a job may be downloading it. (A job whose entry vanishes mid-download recomputes.)"""
    from core.cache import CACHE_DIR, META, USED

    now = time.time() if now is None else now
    report = CacheReapReport()
    entries: dict[str, set[str]] = {}
    for key in store.list_keys(f"{CACHE_DIR}/"):
        prefix, _, name = key.rpartition("/")
        if prefix.count("/") == 2:  # cache/<kind>/<key>/<file>
            entries.setdefault(prefix, set()).add(name)
    live: list[tuple[float, int, str]] = []  # (last used, bytes, prefix)
    for prefix, names in entries.items():
        meta = _json_or_none(store, f"{prefix}/{META}") if META in names else None
        used = _json_or_none(store, f"{prefix}/{USED}") if USED in names else None
        times = [float(d[f]) for d, f in ((meta, "created"), (used, "at"))
                 if d is not None and isinstance(d.get(f), (int, float))]
        last = max(times) if times else None
        if last is not None and now - last < in_use_seconds:
            live.append((last, int(meta.get("size", 0)) if meta else 0, prefix))
            continue
        if meta is None or not isinstance(meta.get("size"), int):
            store.delete_prefix(prefix)
            report.incomplete.append(prefix)
        elif last is None or now - last > max_age_seconds:
            store.delete_prefix(prefix)
            report.expired.append(prefix)
        else:
            live.append((last, meta["size"], prefix))
    total = sum(size for _, size, _ in live)
    if max_bytes is not None:
        for last, size, prefix in sorted(live):
            if total <= max_bytes:
                break
            if now - last < in_use_seconds:
                continue
            store.delete_prefix(prefix)
            report.evicted.append(prefix)
            total -= size
    report.kept_bytes = total
    return report
