"""Run a training run across several processes (DDP: NCCL on GPUs, gloo on CPU) and relay their reports.

As torchrun does, the ranks are fresh interpreters (`python -m core.rank`, one per rank, with RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), never children forked or spawned through the
caller's multiprocessing: a Celery prefork child cannot hand its billiard state (the authkey) to them.
Their inputs go through a file in the job's workdir; their Reporter calls come back as JSON lines
on a pipe per rank and are replayed on the caller's reporter, which answers `should_cancel` with a
`cancel` line down the pipe. Ranks die with this process (PR_SET_PDEATHSIG, and the end of their pipe).
"""

from __future__ import annotations

import json
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import errors
from core.progress import Reporter
from core.rank import encode

# After a rank failed, the others get this long without a message before they are stopped: they may be
# stuck in a collective waiting for the failed one (gloo's own timeout is 30 minutes).
FAILURE_GRACE_SECONDS = 10.0
# A rank that exited is read until its pipe ends, or this long (its DataLoader workers may hold the pipe).
DRAIN_SECONDS = 5.0
REPORTED = ("stage", "event", "progress", "step", "eval_result")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Rank:
    """The parent's view of one rank process: its process, its two pipe ends, what it said."""

    rank: int
    proc: subprocess.Popen
    up: int                      # read end: messages from the rank
    down: int                    # write end: acks and cancel to the rank
    buf: bytes = b""
    eof: bool = False
    done: bool = False
    exited_at: float | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)

    def send(self, message: dict[str, Any]) -> None:
        try:
            os.write(self.down, encode(message))
        except OSError:
            pass  # the rank is gone; its exit status tells why

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines if line]


def _launch(rank: int, world_size: int, port: int, inputs: Path) -> _Rank:
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    root = str(Path(__file__).resolve().parent.parent)  # so that `-m core.rank` finds this very package
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "core.rank", "--inputs", str(inputs), "--up", str(up_w), "--down", str(down_r),
             "--parent", str(os.getpid())],
            env=env, stdin=subprocess.DEVNULL, pass_fds=(up_w, down_r), close_fds=True)
    except BaseException:
        for fd in (up_r, up_w, down_r, down_w):
            os.close(fd)
        raise
    os.close(up_w)
    os.close(down_r)
    return _Rank(rank, proc, up_r, down_w)


def _handle(r: _Rank, msg: dict[str, Any], reporter: Reporter) -> None:
    kind = msg["kind"]
    if kind in REPORTED:
        getattr(reporter, kind)(*msg["args"], **msg["kwargs"])
    elif kind == "checkpoint":
        run, step, path = msg["args"]
        reporter.checkpoint(run, step, Path(path), **msg["kwargs"])
        r.send({"kind": "ack"})
    elif kind in ("error", "crash"):
        r.failures.append(msg)
    elif kind == "done":
        r.done = True


def _relay(ranks: list[_Rank], reporter: Reporter) -> None:
    """Replay every rank's messages until all have exited; stop the rest once one failed and they go quiet."""
    sel = selectors.DefaultSelector()
    for r in ranks:
        sel.register(r.up, selectors.EVENT_READ, r)
    cancel_sent = False
    last_message = time.monotonic()
    while True:
        for key, _ in sel.select(timeout=0.2):
            r = key.data
            chunk = os.read(r.up, 65536)
            if not chunk:
                r.eof = True
                sel.unregister(r.up)
                continue
            for msg in r.feed(chunk):
                _handle(r, msg, reporter)
                last_message = time.monotonic()
        now = time.monotonic()
        if not cancel_sent and reporter.should_cancel():
            cancel_sent = True
            for r in ranks:
                r.send({"kind": "cancel"})
        for r in ranks:
            if r.exited_at is None and r.proc.poll() is not None:
                r.exited_at = now
            if r.exited_at is not None and not r.eof and now - r.exited_at > DRAIN_SECONDS:
                r.eof = True
                sel.unregister(r.up)
        if all(r.exited_at is not None and r.eof for r in ranks):
            break
        failed = any(r.failures or (r.exited_at is not None and r.proc.returncode != 0) for r in ranks)
        if failed and now - last_message > FAILURE_GRACE_SECONDS:
            _stop(ranks)
    sel.close()


def _stop(ranks: list[_Rank], grace: float = 3.0) -> None:
    """SIGTERM every live rank, then SIGKILL what is left after `grace` seconds."""
    for r in ranks:
        if r.proc.poll() is None:
            r.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for r in ranks:
        try:
            r.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


def _outcome(ranks: list[_Rank]) -> None:
    """Raise what went wrong: a rank's HelipError (its own class, message and param) before any crash."""
    failures = [f for r in ranks for f in r.failures]
    for f in failures:
        if f["kind"] == "error":
            cls = getattr(errors, f["cls"], None)
            if not (isinstance(cls, type) and issubclass(cls, errors.HelipError)):
                cls = errors.HelipError
            raise cls(f["message"], param=f["param"], code=f["code"] if f["code"] != cls.code else None)
    for f in failures:
        raise RuntimeError(f"a training process failed:\n{f['traceback']}")
    codes = {r.rank: r.proc.returncode for r in ranks}
    if any(code != 0 for code in codes.values()) or not all(r.done for r in ranks):
        raise RuntimeError(f"a training process exited without finishing (exit status by rank: {codes})")


def train_distributed(world_size: int, device_type: str, reporter: Reporter, *, workdir: str | Path,
                      **inputs: Any) -> None:
    """Run core.train.train_run in `world_size` fresh rank processes with `inputs` (plan, spec, index,
    neighbors, tokens, access); return when all finished, or raise a rank's HelipError (JobCancelled
    when cancelled) or a RuntimeError carrying a crashed rank's traceback."""
    workdir = Path(workdir)
    folder = workdir / "ddp"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{inputs['plan'].run}-inputs.pkl"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump({**inputs, "workdir": str(workdir), "device_type": device_type}, f,
                    protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    port = _free_port()
    ranks: list[_Rank] = []
    try:
        for rank in range(world_size):
            ranks.append(_launch(rank, world_size, port, path))
        _relay(ranks, reporter)
    finally:
        _stop(ranks)
        for r in ranks:
            os.close(r.up)
            os.close(r.down)
        path.unlink(missing_ok=True)
    _outcome(ranks)
