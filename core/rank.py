"""One DDP rank as a fresh interpreter (`python -m core.rank`): reads its inputs, trains, reports over a pipe.

core.distributed starts one of these per rank, as torchrun would, so that nothing of the caller's
multiprocessing state (a Celery prefork child's billiard context, its authkey) reaches the ranks. The
parent passes two pipe descriptors: `--up` carries JSON lines from this rank (the Reporter's calls,
then `done`, `error` or `crash`), `--down` carries JSON lines to it (`ack` after a checkpoint is
stored, `cancel`). The end of `--down` means the parent is gone, and so is this rank then.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from core.errors import HelipError

PR_SET_PDEATHSIG = 1
PARENT_GONE = 75  # exit status of a rank whose parent vanished


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux prctl), and exit now if it is already gone."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # the end of the down pipe still stops this rank
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(PARENT_GONE)


def _plain(value: Any) -> Any:
    """json.dumps fallback: numpy/torch scalars and arrays, paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def encode(message: dict[str, Any]) -> bytes:
    """One protocol line."""
    return (json.dumps(message, default=_plain) + "\n").encode()


class Channel:
    """This rank's end of the two pipes: `send` a message up, `cancel` and acks arrive from a reader thread."""

    def __init__(self, up_fd: int, down_fd: int):
        self._up = up_fd
        self._lock = threading.Lock()
        self.cancel = threading.Event()
        self._acks: queue.Queue[dict] = queue.Queue()
        self._down = os.fdopen(down_fd, "rb", buffering=0)
        threading.Thread(target=self._read, name="helip-relay", daemon=True).start()

    def send(self, message: dict[str, Any]) -> None:
        data = encode(message)
        with self._lock:
            try:
                while data:
                    data = data[os.write(self._up, data):]
            except OSError:  # the parent closed its end: it is gone
                os._exit(PARENT_GONE)

    def wait_ack(self) -> None:
        self._acks.get()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = self._down.read(65536)
            if not chunk:  # every write end closed: the parent died (or gave up on this rank)
                os._exit(PARENT_GONE)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if msg["kind"] == "cancel":
                    self.cancel.set()
                elif msg["kind"] == "ack":
                    self._acks.put(msg)


class RelayReporter:
    """core.progress.Reporter inside a rank: every call goes up the pipe; a checkpoint waits until stored.

    Rank 0 reports everything; other ranks only their warnings (the rest would repeat rank 0's)."""

    def __init__(self, channel: Channel, rank: int):
        self.channel, self.rank = channel, rank

    def _call(self, kind: str, *args: Any, **kwargs: Any) -> None:
        self.channel.send({"kind": kind, "args": list(args), "kwargs": kwargs})

    def stage(self, name):
        if self.rank == 0:
            self._call("stage", name)

    def event(self, message, *, level="info", data=None):
        if self.rank == 0 or level != "info":
            extra = {"rank": self.rank} if self.rank else {}
            self._call("event", message, level=level, data={**(data or {}), **extra})

    def progress(self, stage, done, total, values=None):
        if self.rank == 0:
            self._call("progress", stage, done, total, values)

    def step(self, run, step, total, values):
        self._call("step", run, step, total, values)

    def checkpoint(self, run, step, path, *, final, metrics=None):
        # Uploaded and recorded by the parent before training goes on (another worker may resume from it).
        self._call("checkpoint", run, step, str(path), final=final, metrics=metrics)
        self.channel.wait_ack()

    def eval_result(self, model, dataset, metrics):
        self._call("eval_result", model, dataset, metrics)

    def should_cancel(self):
        return self.channel.cancel.is_set()


def _train(inputs: dict[str, Any], reporter: RelayReporter, rank: int, world_size: int) -> None:
    import torch

    from core.models import model_from_spec
    from core.train import train_run

    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if inputs["device_type"] == "cuda":
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        device, backend = torch.device("cpu"), "gloo"
    torch.distributed.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    spec, workdir = inputs["spec"], Path(inputs["workdir"])
    loaded = model_from_spec(spec.model, access=inputs["access"], device=device, cache_dir=workdir / "weights")
    train_run(inputs["plan"], loaded=loaded, index=inputs["index"], access=inputs["access"],
              neighbors=inputs["neighbors"], spec=spec, workdir=workdir, reporter=reporter, device=device,
              rank=rank, world_size=world_size, tokens=inputs["tokens"])
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m core.rank", description=__doc__.splitlines()[0])
    p.add_argument("--inputs", required=True, help="pickle written by core.distributed in the job's workdir")
    p.add_argument("--up", type=int, required=True)
    p.add_argument("--down", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    args = p.parse_args(argv)
    die_with_parent(args.parent)
    channel = Channel(args.up, args.down)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        with open(args.inputs, "rb") as f:
            inputs = pickle.load(f)  # our own objects, written by our parent a moment ago (not user data)
        _train(inputs, RelayReporter(channel, rank), rank, world_size)
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent, which decides
        if isinstance(exc, HelipError):
            channel.send({"kind": "error", "cls": type(exc).__name__, "code": exc.code, "message": exc.message,
                          "param": exc.param})
        else:
            channel.send({"kind": "crash", "traceback": traceback.format_exc()[-6000:]})
        sys.stderr.flush()
        # Not a normal exit: the other ranks may be waiting in a collective; the parent stops them.
        os._exit(1)
    channel.send({"kind": "done"})
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
