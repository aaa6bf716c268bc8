"""Run a training run across several processes (DDP: NCCL on GPUs, gloo on CPU) and relay their reports.

Rank processes cannot hold the caller's reporter (it may own a database session), so they send its
calls through a queue; the parent replays them and answers `should_cancel` through a shared event.
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from core.errors import HelipError
from core.progress import Reporter


class QueueReporter:
    """A Reporter inside a rank process: forwards every call to the parent."""

    def __init__(self, q, cancel_event):
        self.q, self.cancel_event = q, cancel_event

    def stage(self, name):
        self.q.put(("stage", (name,), {}))

    def event(self, message, *, level="info", data=None):
        self.q.put(("event", (message,), {"level": level, "data": data}))

    def progress(self, stage, done, total, values=None):
        self.q.put(("progress", (stage, done, total, values), {}))

    def step(self, run, step, total, values):
        self.q.put(("step", (run, step, total, values), {}))

    def checkpoint(self, run, step, path, *, final, metrics=None):
        self.q.put(("checkpoint", (run, step, str(path)), {"final": final, "metrics": metrics}))

    def eval_result(self, model, dataset, metrics):
        self.q.put(("eval_result", (model, dataset, metrics), {}))

    def should_cancel(self):
        return self.cancel_event.is_set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, device_type: str, q, cancel_event, kwargs: dict) -> None:
    from core.models import model_from_spec
    from core.train import train_run

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        device = torch.device("cpu")
    torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)
    reporter = QueueReporter(q, cancel_event)
    try:
        spec = kwargs["spec"]
        loaded = model_from_spec(spec.model, access=kwargs["access"], device=device,
                                 cache_dir=Path(kwargs["workdir"]) / "weights")
        train_run(kwargs["plan"], loaded=loaded, index=kwargs["index"], access=kwargs["access"],
                  neighbors=kwargs["neighbors"], spec=spec, workdir=Path(kwargs["workdir"]),
                  reporter=reporter, device=device, rank=rank, world_size=world_size,
                  tokens=kwargs.get("tokens"))
        q.put(("done", (rank,), {}))
    except HelipError as exc:
        q.put(("error", (type(exc).__name__, exc.message, exc.param), {}))
        raise
    except Exception:
        q.put(("crash", (traceback.format_exc(limit=20),), {}))
        raise
    finally:
        torch.distributed.destroy_process_group()


def train_distributed(world_size: int, device_type: str, reporter: Reporter, **kwargs: Any) -> None:
    """Spawn `world_size` ranks running core.train.train_run with kwargs; re-raise a rank's HelipError."""
    import core.errors as errors

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    cancel_event = ctx.Event()
    port = _free_port()
    procs = mp.start_processes(_rank_main, args=(world_size, port, device_type, q, cancel_event, kwargs),
                               nprocs=world_size, join=False, start_method="spawn")
    failure: tuple | None = None

    def drain() -> None:
        nonlocal failure
        while True:
            try:
                kind, args, kw = q.get_nowait()
            except queue_mod.Empty:
                return
            if kind in ("error", "crash"):
                failure = failure or (kind, *args)
            elif kind == "checkpoint":
                reporter.checkpoint(args[0], args[1], Path(args[2]), **kw)
            elif kind != "done":
                getattr(reporter, kind)(*args, **kw)

    try:
        while True:
            drain()
            if reporter.should_cancel():
                cancel_event.set()
            try:
                if procs.join(timeout=0.5):
                    break
            except Exception:
                drain()
                break
        drain()
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    if failure is not None:
        if failure[0] == "error":
            cls = getattr(errors, failure[1], errors.HelipError)
            raise cls(failure[2], param=failure[3])
        raise RuntimeError(f"a training process failed:\n{failure[1]}")
    if any(p.exitcode not in (0, None) for p in procs.processes):
        raise RuntimeError(f"a training process exited with {[p.exitcode for p in procs.processes]}")

