"""The forgetting guard: WiSE-FT weight interpolation, the selection among final weights, evaluated steps and
interpolations under the protect bounds, and the curves (JSON and PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import SpecError
from core.layout import SELECTED_RUN  # noqa: F401 - one name for the selection, defined with the layout

if TYPE_CHECKING:  # torch is not imported here: worker.files reads SELECTED_RUN without it
    import torch


Metrics = dict[str, dict[str, float]]


def split_key(key: str, param: str) -> tuple[str, str]:
    """"DATASET/METRIC" -> (dataset, metric); the metric name may itself hold '/' (never the data set name)."""
    ds, sep, metric = key.partition("/")
    if not sep or not ds or not metric:
        raise SpecError(f"{param}: '{key}' is not DATASET/METRIC", param=param)
    return ds, metric


def metric_value(metrics: Metrics, key: str) -> float:
    ds, metric = split_key(key, "guard")
    return float(metrics[ds][metric])


def objective_value(metrics: Metrics, objective: str | None) -> float:
    """The objective's value: one DATASET/METRIC, or the mean over every metric of every eval data set."""
    if objective:
        return metric_value(metrics, objective)
    values = [float(v) for vals in metrics.values() for m, v in vals.items() if not m.startswith("n_")]
    return sum(values) / len(values) if values else math.nan


def violations(metrics: Metrics, baseline: Metrics, protect: dict[str, float]) -> dict[str, float]:
    """Protect bounds broken: {DATASET/METRIC: drop from the baseline} where the drop exceeds its max_drop."""
    out = {}
    for key, max_drop in protect.items():
        drop = metric_value(baseline, key) - metric_value(metrics, key)
        if drop > max_drop + 1e-12:
            out[key] = drop
    return out


def judge(metrics: Metrics, baseline: Metrics, guard) -> dict[str, Any]:
    """A candidate's entry in the curve: its metrics, objective and whether it keeps every protect bound."""
    broken = violations(metrics, baseline, guard.protect)
    return {"metrics": metrics, "objective": objective_value(metrics, guard.objective), "ok": not broken,
            "violations": broken}


def wise_state(input_state: dict[str, torch.Tensor], boosted_state: dict[str, torch.Tensor],
               alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: (1 - alpha) * input + alpha * boosted for float tensors (exactly each end at 0 and 1);
    integer buffers (BatchNorm's step counters) come from the boosted model unless alpha is 0."""
    out = {}
    for k, b in boosted_state.items():
        a = input_state[k]
        if b.is_floating_point():
            out[k] = ((1.0 - alpha) * a.to(b.dtype) + alpha * b).to(b.dtype)
        else:
            out[k] = (a if alpha == 0 else b).clone()
    return out


def select(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The best objective among candidates that keep every protect bound (ties: earlier in the list wins).

    The list always holds the input model (alpha 0, no drop), so a selection always exists."""
    ok = [c for c in candidates if c["ok"] and not math.isnan(c["objective"])]
    if not ok:
        raise ValueError("no candidate keeps the protect bounds (alpha 0 always should)")
    return max(ok, key=lambda c: c["objective"])  # max keeps the first of equals


class StepKeeper:
    """During training: the evaluated steps' curve (JSON in the workdir) and the weights of the best step
    that keeps every protect bound, so that it can be selected after training."""

    def __init__(self, workdir: Path, run: str, guard, baseline: Metrics):
        self.guard, self.baseline = guard, baseline
        self.curve_path = Path(workdir) / f"guard_steps_{run}.json"
        self.weights_path = Path(workdir) / "checkpoints" / f"{run}_guard_best_step.pt"
        self.entries: list[dict[str, Any]] = (json.loads(self.curve_path.read_text())
                                              if self.curve_path.exists() else [])

    def best(self) -> dict[str, Any] | None:
        kept = [e for e in self.entries if e.get("kept")]
        return kept[-1] if kept else None

    def record(self, step: int, metrics: Metrics, save) -> None:
        """Add a step's evaluation; `save(path)` writes the current weights when this step is the new best."""
        entry = {"source": "step", "step": int(step), "alpha": 1.0, **judge(metrics, self.baseline, self.guard)}
        best = self.best()
        if entry["ok"] and (best is None or entry["objective"] > best["objective"]):
            save(self.weights_path)
            entry["kept"] = True
        self.entries = [e for e in self.entries if e["step"] != step] + [entry]
        tmp = self.curve_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1))
        tmp.replace(self.curve_path)


def plot_curves(guard_doc: dict[str, Any], path: Path) -> Path:
    """A PNG of the curves: each tracked metric against the step, and against the WiSE alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [guard_doc["objective"], *guard_doc["protect"]]
    fig, (ax_step, ax_alpha) = plt.subplots(1, 2, figsize=(10, 4))
    steps = sorted(guard_doc["steps"] + [guard_doc["final"]], key=lambda e: e["step"])
    wise = sorted(guard_doc["wise"], key=lambda e: e["alpha"])
    for key in keys:
        value = (lambda e: e["objective"]) if key == guard_doc["objective"] else (
            lambda e, k=key: metric_value(e["metrics"], k))
        ax_step.plot([0] + [e["step"] for e in steps], [value(guard_doc["input"])] + [value(e) for e in steps],
                     marker="o", label=key)
        ax_alpha.plot([e["alpha"] for e in wise], [value(e) for e in wise], marker="o", label=key)
    sel = guard_doc["selected"]
    for ax, x in ((ax_step, sel["step"] if sel["source"] != "wise" else None),
                  (ax_alpha, sel["alpha"] if sel["source"] == "wise" else None)):
        if x is not None:
            ax.axvline(x, color="grey", linestyle="--", label="selected")
    ax_step.set_xlabel("step (HELIP run)")
    ax_alpha.set_xlabel("WiSE alpha (0 = input model, 1 = boosted)")
    for ax in (ax_step, ax_alpha):
        ax.set_ylabel("metric")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("forgetting guard")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
