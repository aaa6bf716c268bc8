"""A Reporter for a terminal: one progress bar per stage and per training run, warnings printed above them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


class TerminalReporter:
    """Draws tqdm bars on stderr; `quiet` prints only warnings and the stage names."""

    def __init__(self, *, quiet: bool = False):
        self.quiet = quiet
        self.bar: tqdm | None = None
        self.bar_key: str | None = None

    def __enter__(self) -> TerminalReporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.bar_key = None, None

    def _bar(self, key: str, total: int | None, unit: str) -> tqdm:
        if self.bar_key != key:
            self._close()
            self.bar = tqdm(total=total, desc=key, unit=unit, dynamic_ncols=True, disable=self.quiet,
                            file=sys.stderr, leave=True)
            self.bar_key = key
        return self.bar

    def stage(self, name: str) -> None:
        self._close()
        tqdm.write(f"== {name}", file=sys.stderr)

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        if level != "info" or not self.quiet:
            tqdm.write(f"[{level}] {message}", file=sys.stderr)

    def progress(self, stage: str, done: int, total: int | None, values: dict[str, float] | None = None) -> None:
        bar = self._bar(stage, total, "it")
        bar.n = done
        bar.refresh()

    def step(self, run: str, step: int, total: int, values: dict[str, float]) -> None:
        bar = self._bar(f"training {run}", total, "step")
        bar.n = step
        bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()
                         if k in ("loss", "contrastive_loss", "margin_loss", "lr", "samples_per_second")})

    def checkpoint(self, run: str, step: int, path: Path, *, final: bool, metrics: dict | None = None) -> None:
        if final:
            tqdm.write(f"[info] {run}: final checkpoint {path}", file=sys.stderr)

    def eval_result(self, model: str, dataset: str, metrics: dict[str, float]) -> None:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if not k.startswith("n_"))
        tqdm.write(f"[eval] {model:8s} {dataset}: {shown}", file=sys.stderr)

    def should_cancel(self) -> bool:
        return False


def metrics_table(metrics: dict[str, dict[str, dict[str, float]]],
                  keys: tuple[str, ...] = ("acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall@1",
                                           "image_retrieval_recall@5", "text_retrieval_recall@1",
                                           "text_retrieval_recall@5", "lp_acc1")) -> str:
    """A Markdown table: one row per data set and metric, one column per model, and the lift."""
    models = [m for m in ("baseline", "control", "helip", "helip_selected") if m in metrics]
    head = ["data set", "metric", *models]
    if "helip" in metrics and "baseline" in metrics:
        head.append("HELIP - baseline")
    if "helip" in metrics and "control" in metrics:
        head.append("HELIP - control")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ds in metrics.get(models[0], {}) if models else {}:
        for k in keys:
            vals = [metrics[m].get(ds, {}).get(k) for m in models]
            if vals[0] is None:
                continue
            row = [ds, k, *(f"{v:.4f}" if v is not None else "" for v in vals)]
            h = metrics.get("helip", {}).get(ds, {}).get(k)
            if "HELIP - baseline" in head:
                row.append(f"{h - metrics['baseline'][ds][k]:+.4f}")
            if "HELIP - control" in head:
                row.append(f"{h - metrics['control'][ds][k]:+.4f}")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def print_metrics(metrics: dict[str, dict[str, dict[str, float]]]) -> None:
    if metrics:
        print(metrics_table(metrics))
