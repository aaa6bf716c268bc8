"""DbReporter: the worker's Reporter, writing rows and uploading checkpoints; and the heartbeat that keeps the lease."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import StorageError
from core.progress import Stage
from helip import crud, transitions
from worker.files import JobFiles, json_safe
from worker.retention import fault_pause, final_key, prune_states, state_key

log = logging.getLogger(__name__)


class Lease:
    """This worker's hold on a job, as the heartbeat last saw it: `lost` once someone else owns it (re-claimed,
    finished, deleted), `cancel` once the user asked to stop."""

    def __init__(self, job_id: str, worker_id: str):
        self.job_id = job_id
        self.worker_id = worker_id
        self.lost = threading.Event()
        self.cancel = threading.Event()


class Heartbeat:
    """A daemon thread that refreshes the job's heartbeat every `interval` seconds while the job runs; the same
    UPDATE returns the cancel flag, so the run learns of a cancellation within one interval."""

    def __init__(self, *, sessions: sessionmaker[Session], lease: Lease, interval: float):
        self.sessions = sessions
        self.lease = lease
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{lease.job_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def beat(self) -> bool:
        """One heartbeat; False (and the lease marked lost) when the job is no longer ours."""
        with self.sessions() as session:
            beat = transitions.heartbeat(session, job_id=self.lease.job_id, worker_id=self.lease.worker_id)
            session.commit()
        if beat.cancel_requested:
            self.lease.cancel.set()
        if not beat.owned:
            self.lease.lost.set()
        return beat.owned

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.beat():
                    log.warning("job %s: lease lost (another worker or the reaper took it over)", self.lease.job_id)
                    return
            except Exception:  # a database blip: keep beating; the reaper tolerates stale_after_seconds of silence
                log.exception("job %s: heartbeat failed", self.lease.job_id)


class DbReporter:
    """core.progress.Reporter for a job run by the worker.

    Events, step metrics and evaluation results become rows; stage and progress update the job row
    (progress at most every `progress_seconds`); each checkpoint is uploaded to the store and recorded
    before training goes on, so another worker can resume from it. `should_cancel` answers from what the
    heartbeat last read (a cancellation, or a lease lost to another worker); a lost lease silences every write.
    """

    def __init__(self, *, sessions: sessionmaker[Session], lease: Lease, files: JobFiles,
                 keep_states: int = 2, progress_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic,
                 retry_delays: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)):
        self.sessions = sessions
        self.lease = lease
        self.job_id = lease.job_id
        self.files = files
        self.keep_states = keep_states
        self._totals: dict[str, int] = {}  # run -> its total steps, from the step reports
        self.progress_seconds = progress_seconds
        self.clock = clock
        # about 15 s in all: enough to ride out a database restart before a non-essential row is dropped
        self.retry_delays = retry_delays
        self._progress: dict[str, Any] = {"stage": None, "done": 0, "total": None, "step": None,
                                          "total_steps": None, "eta_seconds": None}
        self._stage_t0 = clock()
        self._last_progress_write = float("-inf")
        self._run_t0: dict[str, tuple[float, int]] = {}  # run -> (clock, step) when this attempt first saw it

    # -- writing ---------------------------------------------------------------------------------------

    def _write(self, what: str, fn: Callable[[Session], Any], *, essential: bool = False) -> Any:
        """Run `fn` in its own transaction, retrying a dropped connection; a non-essential write that keeps
        failing is logged and dropped (a lost event must not kill hours of training)."""
        for attempt, delay in enumerate((*self.retry_delays, None)):
            try:
                with self.sessions() as session:
                    out = fn(session)
                    session.commit()
                    return out
            except (OperationalError, InterfaceError):
                if delay is None:
                    if essential:
                        raise
                    log.exception("job %s: dropped %s after %d attempts", self.job_id, what, attempt + 1)
                    return None
                time.sleep(delay)
        return None

    def _progress_write(self, *, force: bool) -> None:
        now = self.clock()
        if not force and now - self._last_progress_write < self.progress_seconds:
            return
        self._last_progress_write = now
        progress, stage = dict(self._progress), self._progress["stage"]
        self._write("progress", lambda s: transitions.set_progress(s, job_id=self.job_id, progress=progress,
                                                                    stage=stage))

    def _sync_files(self) -> None:
        if self.lease.lost.is_set():
            return
        uploaded = self.files.sync()
        if uploaded:
            self._write("event", lambda s: crud.add_event(
                s, job_id=self.job_id, message=f"saved for resume: {', '.join(uploaded)}", data={"files": uploaded}))

    # -- the Reporter protocol ---------------------------------------------------------------------------

    def stage(self, name: Stage) -> None:
        if self.lease.lost.is_set():
            return
        name = Stage(name)
        self._sync_files()  # what the previous stage produced (embeddings before mining, hard pairs before training)
        self._stage_t0 = self.clock()
        self._progress.update(stage=name, done=0, total=None, eta_seconds=None)
        self._write("stage event", lambda s: crud.add_event(s, job_id=self.job_id, message=f"stage: {name}",
                                                            data={"stage": name}))
        self._progress_write(force=True)

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        if self.lease.lost.is_set():
            return
        payload = json_safe(data or {})
        self._write("event", lambda s: crud.add_event(s, job_id=self.job_id, message=message, level=level,
                                                      data=payload))

    def progress(self, stage: str, done: int, total: int | None, values: dict[str, float] | None = None) -> None:
        if self.lease.lost.is_set():
            return
        elapsed = self.clock() - self._stage_t0
        eta = elapsed / done * (total - done) if total and done > 0 else None
        self._progress.update(stage=stage, done=int(done), total=None if total is None else int(total),
                              eta_seconds=None if eta is None else round(eta, 1))
        self._progress_write(force=total is not None and done >= total)

    def step(self, run: str, step: int, total: int, values: dict[str, float]) -> None:
        if self.lease.lost.is_set():
            return
        now = self.clock()
        self._totals[run] = int(total)
        t0, s0 = self._run_t0.setdefault(run, (now, step))
        # ETA from this attempt's own pace: steps restored from a checkpoint cost nothing here.
        eta = (now - t0) / (step - s0) * (total - step) if step > s0 else None
        loss = values.get("loss")
        self._progress.update(run=run, step=int(step), total_steps=int(total),
                              eta_seconds=None if eta is None else round(eta, 1),
                              loss=None if loss is None or loss != loss else round(float(loss), 4))
        row = json_safe(values)
        self._write("step", lambda s: crud.record_step(s, job_id=self.job_id, run=run, step=int(step), values=row))
        self._progress_write(force=step >= total)

    def checkpoint(self, run: str, step: int, path: Path, *, final: bool,
                   metrics: dict[str, Any] | None = None) -> None:
        """Upload a state or the final weights and record its row; then delete the run's states the store no
        longer needs (beyond `keep_states`, or all of them once the final weights are recorded)."""
        if self.lease.lost.is_set():
            return  # the new owner writes these keys now; do not overwrite its state with ours
        if not final and step >= self._totals.get(run, step + 1) and not self.lease.cancel.is_set():
            return  # the state at the last step: the final weights follow at once and replace it
        path = Path(path)
        key = final_key(self.job_id, run, path.name) if final else state_key(self.job_id, run, step)
        stored = self.files.upload(path, key)
        if not final:
            fault_pause("after_state_upload")
        extra = json_safe(metrics) if metrics else None
        self._write("checkpoint row", lambda s: crud.record_checkpoint(
            s, job_id=self.job_id, run=run, step=int(step), key=stored.key, sha256=stored.sha256, size=stored.size,
            final=final, metrics=extra), essential=True)
        self._write("event", lambda s: crud.add_event(
            s, job_id=self.job_id, message=f"{run}: {'final ' if final else ''}checkpoint at step {step} stored",
            data={"run": run, "step": int(step), "final": final, "key": stored.key, "sha256": stored.sha256,
                  "size": stored.size}))
        if not final:
            fault_pause("after_state_record")
        try:
            prune_states(self.sessions, self.files.store, job_id=self.job_id, keep=self.keep_states, run=run)
        except (StorageError, OperationalError, InterfaceError):  # the store reaper deletes them later
            log.exception("job %s: could not delete older training states of %s", self.job_id, run)
        self._sync_files()

    def eval_result(self, model: str, dataset: str, metrics: dict[str, float]) -> None:
        if self.lease.lost.is_set():
            return
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._write("eval result", lambda s: crud.record_eval(s, job_id=self.job_id, model=model, dataset=dataset,
                                                              metrics=values))
        self._sync_files()  # the evaluation cache of the model evaluated before this one

    def should_cancel(self) -> bool:
        return self.lease.lost.is_set() or self.lease.cancel.is_set()
