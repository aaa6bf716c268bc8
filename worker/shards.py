"""Sharded mining in the service: the job's process and any worker mine shards of one plan together.

The job's process (`ServiceShards.run`, core.mining.shards' backend) records the plan's rows
(helip.tables.MiningShard), uploads the valid rows' embeddings once (`jobs/<id>/mining/<plan>/input.npz`),
sends `helip.mine_shards` messages that any worker may take (`help_mine`), then mines shards itself while
any is unclaimed, so a single worker of concurrency 1 finishes the job alone. Each shard's lists go to
the store (`.../shard-<i>-<worker>.npz`) before its row says done, so a retried job reuses them. A shard
whose worker stops heartbeating for stale_after_seconds is claimed again by whoever asks next (the
job's process keeps asking while it waits). Cancelling the job makes every claim fail (helip.shard_claims)
and stops the shards being mined at their next block of rows.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from core.errors import JobCancelled
from core.mining.scores import Filters
from core.mining.shards import ShardPlan, ShardResult, mine_shard, prepare
from helip import crud, shard_claims
from helip.settings import Settings
from helip.store import Store, job_key
from worker.files import json_safe
from worker.retention import fault_pause

log = logging.getLogger(__name__)

SHARDS_DIR = "mining"
POLL_SECONDS = 0.5
MAX_HELPERS = 32  # messages sent per plan: each helper mines shards until none is left


class _Stop(Exception):
    """The shard being mined is no longer ours (re-claimed) or its job stopped."""


def input_key(job_id: str, plan: str) -> str:
    return job_key(job_id, SHARDS_DIR, plan, "input.npz")


def result_key(job_id: str, plan: str, shard: int, worker_id: str) -> str:
    tag = "".join(c if c.isalnum() else "-" for c in worker_id)[-40:]
    return job_key(job_id, SHARDS_DIR, plan, f"shard-{shard:05d}-{tag}.npz")


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def scratch_dir(settings: Settings, job_id: str) -> Path:
    """A folder of this process's own under the data dir (workers on one host may share the data dir)."""
    return Path(settings.data_dir) / "work" / job_id / f"shards-{uuid.uuid4().hex[:8]}"


def upload_input(store: Store, job_id: str, plan: ShardPlan, scratch: Path) -> None:
    """The plan's embeddings and options, once per plan (kept when an earlier attempt stored them)."""
    key = input_key(job_id, plan.fingerprint)
    if store.exists(key):
        return
    meta = {"ranges": plan.ranges, "top_k": plan.top_k, "same": plan.filters.same, "dup": plan.filters.dup,
            "clamp": plan.filters.clamp, "block_size": plan.block_size}
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "input.npz"
    np.savez(path, text=plan.text, image=plan.image, meta=np.array(json.dumps(meta)))
    store.put_file(key, path)
    path.unlink()


def download_input(store: Store, job_id: str, plan_id: str, scratch: Path) -> ShardPlan:
    path = store.get_file(input_key(job_id, plan_id), scratch / "input.npz")
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return ShardPlan(z["text"], z["image"], [tuple(r) for r in meta["ranges"]], int(meta["top_k"]),
                         Filters(meta["same"], meta["dup"], bool(meta["clamp"])), block_size=int(meta["block_size"]),
                         fingerprint=plan_id)


def download_result(store: Store, row: shard_claims.ShardRow) -> ShardResult:
    assert row.result_key is not None
    with np.load(io.BytesIO(store.get_bytes(row.result_key))) as z:
        nb, sc = z["neighbors"], z["scores"]
    if nb.shape[0] != row.row_end - row.row_start:
        raise ValueError(f"stored shard {row.shard} holds {nb.shape[0]} rows, its range {row.row_end - row.row_start}")
    counts = row.counts or {}
    return ShardResult(row.shard, row.row_start, row.row_end, nb, sc, int(counts.get("same_caption", 0)),
                       int(counts.get("duplicate", 0)), float(row.seconds or 0.0), str(row.worker_id))


class ShardBeat:
    """Heartbeats a claimed shard every `interval` seconds; `lost` once it is not ours or its job stopped."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, shard_id: int, worker_id: str, interval: float):
        self.sessions, self.job_id, self.shard_id, self.worker_id = sessions, job_id, shard_id, worker_id
        self.interval = interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"shard-beat-{shard_id}", daemon=True)

    def start(self) -> ShardBeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self.sessions() as session:
                    ours = shard_claims.heartbeat(session, shard_id=self.shard_id, worker_id=self.worker_id)
                    runs = shard_claims.job_running(session, job_id=self.job_id)
                    session.commit()
                if not (ours and runs):
                    self.lost.set()
                    return
            except Exception:  # a database blip: keep beating; the shard goes stale only after minutes
                log.exception("shard %s: heartbeat failed", self.shard_id)


def mine_claimed(plan: ShardPlan, row: shard_claims.ShardRow, t, v, *, job_id: str, worker_id: str,
                 sessions: sessionmaker[Session], store: Store, settings: Settings,
                 should_stop: Callable[[], bool] = lambda: False) -> ShardResult | None:
    """Mine a shard this worker claimed, store its lists, mark it done and say so in the job's events.
    None when it stopped being ours midway (re-claimed after a long silence, or its job stopped)."""
    beat = ShardBeat(sessions, job_id, row.id, worker_id, settings.heartbeat_seconds).start()

    def check(_: int) -> None:
        if beat.lost.is_set() or should_stop():
            raise _Stop

    try:
        result = mine_shard(plan, row.shard, t, v, worker=worker_id, tick=check)
        fault_pause("shard_mined")  # tests: a worker killed here dies holding a mined, unstored shard
        check(0)
        key = result_key(job_id, plan.fingerprint, row.shard, worker_id)
        store.put_bytes(key, _npz(neighbors=result.neighbors, scores=result.scores))
        counts = {"same_caption": result.same_caption, "duplicate": result.duplicate}
        with sessions() as session:
            won = shard_claims.finish(session, shard_id=row.id, worker_id=worker_id, result_key=key,
                                      seconds=result.seconds, counts=counts)
            if won:
                n = len(plan.ranges)
                crud.add_event(session, job_id=job_id, message=(
                    f"mining shard {row.shard + 1} of {n} (rows {row.row_start}-{row.row_end - 1}) done by "
                    f"{worker_id} in {result.seconds:.2f} s"), data=json_safe({
                        "shard": row.shard, "shards": n, "rows": [row.row_start, row.row_end], "worker": worker_id,
                        "seconds": result.seconds, "claims": row.claims}))
            session.commit()
        return result
    except _Stop:
        return None
    finally:
        beat.stop()


class ServiceShards:
    """core.mining.shards.ShardBackend for a job run by a worker: shards through the database and the store."""

    def __init__(self, *, settings: Settings, sessions: sessionmaker[Session], store: Store, job_id: str,
                 worker_id: str, send: Callable[[str, str], None]):
        self.settings, self.sessions, self.store = settings, sessions, store
        self.job_id, self.worker_id, self.send = job_id, worker_id, send
        self.memory_budget = settings.shard_memory_bytes

    def run(self, plan: ShardPlan, *, device, on_done: Callable[[ShardResult], None],
            should_cancel: Callable[[], bool]) -> list[ShardResult]:
        with self.sessions() as session:
            rows = shard_claims.ensure_plan(session, job_id=self.job_id, plan=plan.fingerprint, ranges=plan.ranges)
            session.commit()
        left = sum(r.status != shard_claims.DONE for r in rows)
        if left:
            scratch = scratch_dir(self.settings, self.job_id)
            try:
                upload_input(self.store, self.job_id, plan, scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        for _ in range(min(left - 1, MAX_HELPERS)):
            try:
                self.send(self.job_id, plan.fingerprint)
            except Exception:  # no broker: this process mines every shard itself
                log.exception("job %s: could not send a shard message", self.job_id)
                break
        t, v = prepare(plan.text, plan.image, device)
        mine = dict(job_id=self.job_id, worker_id=self.worker_id, sessions=self.sessions, store=self.store,
                    settings=self.settings, should_stop=should_cancel)
        mined: dict[int, ShardResult] = {}
        seen: dict[int, ShardResult] = {}
        while True:
            with self.sessions() as session:
                rows = shard_claims.read_plan(session, job_id=self.job_id, plan=plan.fingerprint)
            for r in rows:
                if r.status == shard_claims.DONE and r.shard not in seen:
                    seen[r.shard] = mined.get(r.shard) or download_result(self.store, r)
                    seen[r.shard].worker, seen[r.shard].seconds = str(r.worker_id), float(r.seconds or 0.0)
                    on_done(seen[r.shard])
            if len(seen) == len(plan.ranges):
                return [seen[i] for i in range(len(plan.ranges))]
            if should_cancel():
                raise JobCancelled("cancelled while mining shards")
            with self.sessions() as session:
                row = shard_claims.claim_next(session, job_id=self.job_id, plan=plan.fingerprint,
                                              worker_id=self.worker_id,
                                              stale_after_seconds=self.settings.stale_after_seconds)
                session.commit()
            if row is None:
                time.sleep(POLL_SECONDS)  # the others' shards are being mined; a silent one goes stale
                continue
            result = mine_claimed(plan, row, t, v, **mine)  # type: ignore[arg-type]
            if result is not None:
                mined[row.shard] = result


def help_mine(job_id: str, plan_id: str, *, settings: Settings, worker_id: str,
              sessions: sessionmaker[Session] | None = None, store: Store | None = None) -> int:
    """The `helip.mine_shards` task: mine the plan's shards while any is claimable; returns how many."""
    import torch

    from helip.store import store_from_settings

    if sessions is None:
        from helip.db import session_factory

        sessions = session_factory(settings)
    store = store or store_from_settings(settings)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    plan: ShardPlan | None = None
    tensors: tuple[Any, Any] | None = None
    done = 0
    scratch = scratch_dir(settings, job_id)
    try:
        while True:
            with sessions() as session:
                row = shard_claims.claim_next(session, job_id=job_id, plan=plan_id, worker_id=worker_id,
                                              stale_after_seconds=settings.stale_after_seconds)
                session.commit()
            if row is None:
                return done
            if plan is None or tensors is None:
                plan = download_input(store, job_id, plan_id, scratch)
                tensors = prepare(plan.text, plan.image, device)
                shutil.rmtree(scratch, ignore_errors=True)
            if mine_claimed(plan, row, *tensors, job_id=job_id, worker_id=worker_id, sessions=sessions,
                            store=store, settings=settings) is not None:
                done += 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
