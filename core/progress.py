"""How a running job talks to whoever runs it: the `Reporter` protocol, and a reporter that only collects."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol


class Stage(StrEnum):
    """The stages of a job, in order; a running job's `stage` is one of these."""

    EMBEDDING = "embedding"
    MINING = "mining"
    TRAINING = "training"
    EVALUATING = "evaluating"


STAGES = tuple(Stage)


class Reporter(Protocol):
    """Callbacks from `core.pipeline.run_job`. The CLI draws progress bars, the worker writes rows."""

    def stage(self, name: Stage) -> None:
        """A new stage starts."""

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        """Something a user should read later (what mining skipped, bad samples, recall of the fast path)."""

    def progress(self, stage: str, done: int, total: int | None, values: dict[str, float] | None = None) -> None:
        """Progress inside a stage (items embedded, queries mined, steps trained)."""

    def step(self, run: str, step: int, total: int, values: dict[str, float]) -> None:
        """Training metrics of `run` ("helip" or "control") at an optimizer step: loss terms, lr, samples/s."""

    def checkpoint(self, run: str, step: int, path: Path, *, final: bool, metrics: dict[str, Any] | None = None) -> None:
        """A checkpoint was written locally; a service uploads it before training goes on."""

    def eval_result(self, model: str, dataset: str, metrics: dict[str, float]) -> None:
        """Evaluation of `model` ("baseline", "helip", "control") on one data set."""

    def should_cancel(self) -> bool:
        """Polled every few steps; True makes the run save a checkpoint and raise JobCancelled."""


@dataclass
class CollectingReporter:
    """Keeps everything in lists: for tests and for callers that only want the result."""

    stages: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    cancel_after_steps: int | None = None

    def stage(self, name: str) -> None:
        self.stages.append(name)

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.events.append({"message": message, "level": level, "data": data or {}})

    def progress(self, stage: str, done: int, total: int | None, values: dict[str, float] | None = None) -> None:
        pass

    def step(self, run: str, step: int, total: int, values: dict[str, float]) -> None:
        self.steps.append({"run": run, "step": step, "total": total, **values})

    def checkpoint(self, run: str, step: int, path: Path, *, final: bool, metrics: dict[str, Any] | None = None) -> None:
        self.checkpoints.append({"run": run, "step": step, "path": Path(path), "final": final, "metrics": metrics})

    def eval_result(self, model: str, dataset: str, metrics: dict[str, float]) -> None:
        self.evals.append({"model": model, "dataset": dataset, "metrics": dict(metrics)})

    def should_cancel(self) -> bool:
        return self.cancel_after_steps is not None and len(self.steps) >= self.cancel_after_steps
