"""The live progress line of a job seen through the API (stage, step, loss, ETA over the whole job), for the CLI and demo."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from api.schemas import JobPublic

RUN_ORDER = ("helip", "control")  # the order core.pipeline trains them in


def fmt_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "--:--"
    seconds = int(max(0, round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def job_eta(job: JobPublic) -> tuple[float | None, bool]:
    """(seconds left, exact): while training, the current run's ETA plus the runs still to come at the same pace
    (a control run has as many steps as the HELIP run); before training only the current stage's ETA is known,
    so the figure is a lower bound (`exact` False). Evaluation after training is not included."""
    if job.status != "running" or job.progress is None:
        return None, False
    p = job.progress
    if p.eta_seconds is None:
        return None, False
    if job.stage != "training" or not p.total_steps or p.step is None or p.run not in RUN_ORDER:
        return p.eta_seconds, job.stage == "evaluating"
    runs = [r for r in RUN_ORDER if r == "helip" or (r == "control" and (job.spec or {}).get("control"))]
    later = runs[runs.index(p.run) + 1:] if p.run in runs else []
    left = p.total_steps - p.step
    if not later:
        return p.eta_seconds, True
    if left <= 0:
        return None, False
    per_step = p.eta_seconds / left
    return p.eta_seconds + per_step * p.total_steps * len(later), True


def progress_line(job: JobPublic, elapsed: float | None = None) -> str:
    """`running   stage=training   helip step 12/20 loss 1.234  ETA 00:42  (31s)`."""
    p = job.progress
    stage = job.stage or "-"
    line = f"{job.status:9s} stage={stage:10s}"
    if p is not None and stage == "training" and p.total_steps and p.step is not None:
        line += f" {p.run or ''} step {p.step}/{p.total_steps}"
        if p.loss is not None:
            line += f" loss {p.loss:.3f}"
    elif p is not None and p.total:
        line += f" {p.done or 0}/{p.total}"
    eta, exact = job_eta(job)
    if job.status == "running":
        line += f" ETA {fmt_eta(eta)}{'' if exact or eta is None else '+'}"
    if elapsed is not None:
        line += f"  ({elapsed:.0f}s)"
    return line


class LiveLine:
    """Redraws one line in place on a terminal; elsewhere (logs, pipes) prints a line when the stage, run or
    status changes, when steps first show, and otherwise at most every `every` seconds when something moved."""

    def __init__(self, out: TextIO = sys.stderr, *, every: float = 5.0):
        self.out, self.every = out, every
        self.tty = out.isatty()
        self.started = time.monotonic()
        self.last, self.last_key, self.last_print = "", None, float("-inf")
        self.last_shown = ""  # the last line written to a log, without the elapsed time

    def __call__(self, job: JobPublic) -> None:
        line = progress_line(job, time.monotonic() - self.started)
        p = job.progress
        key: Any = (job.status, job.stage, p.run if p else None, bool(p and p.step))
        if self.tty:
            self.out.write("\r" + line.ljust(len(self.last)))
            self.out.flush()
        elif key != self.last_key or (time.monotonic() - self.last_print >= self.every
                                      and progress_line(job) != self.last_shown):
            self.out.write(line + "\n")
            self.out.flush()
            self.last_print, self.last_shown = time.monotonic(), progress_line(job)
        self.last, self.last_key = line, key

    def note(self, message: str) -> None:
        """A line above the live one (an event)."""
        if self.tty:
            self.out.write("\r" + " " * len(self.last) + "\r")
        self.out.write(message + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty and self.last:
            self.out.write("\n")
            self.out.flush()
