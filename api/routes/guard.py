"""GET /jobs/{id}/guard: the forgetting guard's curves and selection, as the job wrote them to metrics.json.

A job whose spec has a `guard` writes `metrics.json["guard"]` (core.pipeline._guard): the input model, each
evaluated step of the HELIP run, the final weights, each WiSE interpolation, and the selected one. This
endpoint returns that section as stored, with the protect bounds worked out (the input model's value minus
each max_drop), for the job page's charts.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import OwnerDep, SessionDep, StoreDep
from api.errors import ApiError
from api.job_data import Lru
from api.routes.jobs import ERRORS, _owned
from helip import crud
from helip.store import Store
from helip.tables import ACTIVE_STATUSES, JobStatus

router = APIRouter(prefix="/jobs", tags=["dashboard"])
_docs = Lru(16)  # parsed metrics.json by its sha256: a stored file never changes under its hash

Metrics = dict[str, dict[str, float | None]]
METRICS = "{dataset: {metric: value}}, the shape of an eval result (null: not a finite number)"


class GuardPoint(BaseModel):
    source: str | None = Field(default=None, description="step (an evaluation during training), final (the HELIP "
                               "run's final weights) or wise (an interpolation); absent for the input model")
    step: int | None = Field(default=None, description="the HELIP run's step of these weights (wise: the last "
                             "step, whose weights were interpolated); absent for the input model")
    alpha: float | None = Field(default=None, description="WiSE alpha: 0 = the input model, 1 = the boosted one; "
                                "1 for a step, null for the final weights")
    metrics: Metrics = Field(description=METRICS)
    objective: float | None = Field(description="the guard's objective on these weights")
    ok: bool = Field(description="every protect bound kept")
    violations: dict[str, float] = Field(description="{DATASET/METRIC: drop from the input model} for each bound "
                                         "broken")
    kept: bool | None = Field(default=None, description="a step only: the best step so far that kept the bounds "
                              "(its weights were saved as a candidate)")


class GuardSelected(BaseModel):
    source: str = Field(description="final, step or wise: where the selected weights (helip_selected) come from")
    step: int = Field(description="the HELIP run's step of the selected weights")
    alpha: float | None = Field(description="the WiSE alpha when source is wise, else null")
    metrics: Metrics = Field(description=METRICS)
    objective: float | None = Field(description="the objective of the selected weights (the best that keeps every "
                                    "bound)")


class GuardCurves(BaseModel):
    objective: str = Field(description="the objective: a DATASET/METRIC, or `mean` (the mean of every eval metric)")
    protect: dict[str, float] = Field(description="the spec's protect bounds: {DATASET/METRIC: max_drop}")
    bounds: dict[str, float | None] = Field(description="{DATASET/METRIC: the lowest value the selection may have}: "
                                            "the input model's value minus max_drop")
    input: GuardPoint = Field(description="the input model (the job's baseline), step 0 / alpha 0 of the curves")
    steps: list[GuardPoint] = Field(description="the HELIP run's evaluations during training (eval.every), by step")
    final: GuardPoint = Field(description="the HELIP run's final weights")
    wise: list[GuardPoint] = Field(description="the WiSE-FT interpolations, by alpha (0 and 1 always)")
    selected: GuardSelected = Field(description="the selection, as metrics.json[\"selected\"]")


def _finite(constant: str) -> None:
    return None  # NaN / Infinity in metrics.json: JSON has no such numbers, the API says null


def _metrics_doc(store: Store, key: str, sha256: str) -> dict[str, Any]:
    hit = _docs.get(sha256)
    if hit is None:
        hit = _docs.put(sha256, json.loads(store.get_bytes(key), parse_constant=_finite))
    return hit


def _bound(baseline: dict[str, Any], key: str, max_drop: float) -> float | None:
    ds, _, metric = key.partition("/")
    value = (baseline.get(ds) or {}).get(metric)
    return None if value is None else float(value) - max_drop


@router.get("/{job_id}/guard", response_model=GuardCurves, responses=ERRORS)
def job_guard(job_id: str, session: SessionDep, owner: OwnerDep, store: StoreDep) -> dict[str, Any]:
    """The forgetting guard's curves of a finished job (`metrics.json["guard"]`): the objective and each protected
    metric for the input model, each evaluated step, the final weights and each WiSE alpha; the protect bounds;
    and the selected weights. A 404 `no_guard` when the job's spec has no guard, `not_available` until the job
    has succeeded (the guard runs last)."""
    job = _owned(session, job_id, owner)
    if not (job.spec or {}).get("guard"):
        raise ApiError(404, "no_guard", "this job's spec has no guard (the forgetting guard is off unless the spec "
                       "asks for it), so it has no guard curves", param="guard")
    art = crud.get_artifact(session, job_id=job.id, name="metrics")
    doc = _metrics_doc(store, art.key, art.sha256) if art is not None else {}
    if "guard" not in doc or "selected" not in doc:
        why = ("the guard's curves are written when the job finishes" if job.status in ACTIVE_STATUSES
               else "the job ended before its guard ran")
        raise ApiError(404, "not_available", f"{why} (the job is {JobStatus(job.status).value})")
    guard = doc["guard"]
    baseline = guard["input"]["metrics"]
    bounds = {k: _bound(baseline, k, float(d)) for k, d in guard["protect"].items()}
    return {**guard, "bounds": bounds, "selected": doc["selected"]}
