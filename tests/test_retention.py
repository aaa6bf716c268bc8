"""Pruning training states and the store reaper against a real Postgres and a file store (worker.retention)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, update
from sqlalchemy.orm import sessionmaker

from helip import crud, db, transitions
from helip.store import FileStore, job_key
from helip.tables import Job
from worker.retention import list_keys, prune_states, reap_store, state_key

SPEC = {"model": {"name": "tiny"}, "data": {"train": "/nowhere/train.csv"}, "train": {"keep_states": 2}}


@pytest.fixture(scope="module")
def sessions(make_pg_database):
    url = make_pg_database()
    db.upgrade(url)
    engine = create_engine(url)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store", retries=0)


def new_job(sessions, status: str = "running") -> str:
    with sessions() as s:
        job = transitions.create_job(s, owner="local", spec=SPEC, seed=1)
        s.execute(update(Job).where(Job.id == job.id).values(status=status))
        s.commit()
        return job.id


def put_state(sessions, store: FileStore, job_id: str, run: str, step: int, *, record: bool = True) -> str:
    key = state_key(job_id, run, step)
    sha, size = store.put_bytes(key, f"{run} state {step}".encode())
    if record:
        with sessions() as s:
            crud.record_checkpoint(s, job_id=job_id, run=run, step=step, key=key, sha256=sha, size=size)
            s.commit()
    return key


def put_final(sessions, store: FileStore, job_id: str, run: str, step: int) -> str:
    key = job_key(job_id, "checkpoints", f"{run}_final.pt")
    sha, size = store.put_bytes(key, b"final weights")
    with sessions() as s:
        crud.record_checkpoint(s, job_id=job_id, run=run, step=step, key=key, sha256=sha, size=size, final=True)
        s.commit()
    return key


def recorded(sessions, job_id: str) -> list[tuple[str, int, bool]]:
    with sessions() as s:
        return sorted((c.run, c.step, c.final) for c in crud.list_checkpoints(s, job_id=job_id)[0])


def stored_bytes(sessions, job_id: str) -> int:
    with sessions() as s:
        return crud.get_job(s, job_id=job_id).stored_bytes


def test_prune_keeps_the_newest_states_of_each_run_and_none_after_the_final(sessions, store):
    job_id = new_job(sessions)
    keys = {}
    for step in (2, 4, 6, 8):
        for run in ("helip", "control"):
            keys[run, step] = put_state(sessions, store, job_id, run, step)
            prune_states(sessions, store, job_id=job_id, keep=2, run=run)
            # the obvious reference: the two highest steps of this run so far, every other run untouched
            mine = sorted(s for (r, s) in keys if r == run)[-2:]
            assert [s for r, s, _ in recorded(sessions, job_id) if r == run] == mine
            assert {k for k in list_keys(store, job_key(job_id, "states", run) + "/")} == {keys[run, s] for s in mine}
    assert stored_bytes(sessions, job_id) == sum(len(f"{r} state {s}") for r in ("helip", "control") for s in (6, 8))
    final = put_final(sessions, store, job_id, "helip", 10)
    assert prune_states(sessions, store, job_id=job_id, keep=2, run="helip") == [6, 8]
    assert recorded(sessions, job_id) == [("control", 6, False), ("control", 8, False), ("helip", 10, True)]
    assert store.exists(final) and not store.exists(keys["helip", 8]) and store.exists(keys["control", 8])
    assert stored_bytes(sessions, job_id) == len(b"final weights") + len("control state 6") + len("control state 8")


def test_the_store_reaper_removes_what_no_row_accounts_for_and_nothing_else(sessions, store):
    # a job deleted while its objects stayed (the store was down during DELETE)
    gone = new_job(sessions, "succeeded")
    gone_keys = [put_state(sessions, store, gone, "helip", 2), put_final(sessions, store, gone, "helip", 4)]
    with sessions() as s:
        crud.delete_job(s, job_id=gone)
        s.commit()
    # a failed job whose worker died after uploading a state, before recording it
    failed = new_job(sessions, "failed")
    kept_failed = [put_state(sessions, store, failed, "helip", s) for s in (2, 4)]
    stray = put_state(sessions, store, failed, "helip", 6, record=False)
    # a job whose worker died after recording a third state, before deleting the oldest
    surplus = new_job(sessions, "failed")
    surplus_keys = [put_state(sessions, store, surplus, "helip", s) for s in (2, 4, 6)]
    # a running job: its unrecorded upload may be recorded any moment and must stay
    running = new_job(sessions, "running")
    in_flight = put_state(sessions, store, running, "helip", 2, record=False)

    report = reap_store(sessions, store)
    assert report.deleted_jobs == [gone] and not any(store.exists(k) for k in gone_keys)
    assert report.unrecorded_states == [stray] and not store.exists(stray)
    assert all(store.exists(k) for k in kept_failed)
    assert report.surplus_states == {surplus: [2]}
    assert not store.exists(surplus_keys[0]) and store.exists(surplus_keys[1]) and store.exists(surplus_keys[2])
    assert recorded(sessions, surplus) == [("helip", 4, False), ("helip", 6, False)]
    assert store.exists(in_flight)
    assert not reap_store(sessions, store)  # a second round finds nothing
