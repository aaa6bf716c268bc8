"""The job spec: one document for `POST /jobs`, `helip run` and `GET /jobs/{id}` (field reference: docs/spec.md).

Every field has a default except `model.name` and `data.train`; unknown fields are an error.
`resolve_spec` fills the defaults and the seed and checks values that depend on each other, and
raises `SpecError` naming the field (dotted path, e.g. `train.batch_size`). The sections are in
core.spec_sections, the bounds every value shares in core.spec_values; both are importable from here.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from core.errors import SpecError
from core.families import model_family
from core.spec_sections import (  # noqa: F401 - the sections are part of this module's API
    _METRICS,
    WEBHOOK_EVENTS,
    DataSpec,
    EvalSpec,
    GuardSpec,
    HelipSpec,
    LinearProbeSpec,
    MiningSpec,
    ModelSpec,
    RetrievalSpec,
    TrainSpec,
    WebhookEvent,
    WebhookSpec,
    ZeroShotSpec,
)
from core.spec_values import (  # noqa: F401 - part of this module's API
    MAX_BATCH,
    MAX_STEPS,
    MAX_STRING,
    METADATA_KEY,
    METADATA_KEY_MAX,
    METADATA_MAX_KEYS,
    METADATA_VALUE_MAX,
    NAME_MAX,
    NEVER,
    Strict,
    check_metadata,
    check_model_config,
)


class JobSpec(Strict):
    model: ModelSpec = Field(description="the CLIP model to boost")
    data: DataSpec = Field(description="its training data: what hard pairs are mined from and trained on")
    mining: MiningSpec = Field(default_factory=MiningSpec, description="hard pair mining")
    helip: HelipSpec = Field(default_factory=HelipSpec, description="hard pairs in batches and the margin loss")
    train: TrainSpec = Field(default_factory=TrainSpec, description="the fine-tune")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="evaluation of baseline, control and boosted models")
    control: bool = Field(
        default=True,
        description="also fine-tune without hard pairs, with the same steps and batch size, and evaluate it: the "
                    "lift over that control is what says whether the hard pairs helped (doubles the training cost)",
    )
    name: str | None = Field(default=None, min_length=1, max_length=NAME_MAX,
                             description=f"a label for the job, returned with it (at most {NAME_MAX} characters)")
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description=f"string labels returned with the job and filterable with GET /jobs?metadata.KEY=VALUE: at most "
        f"{METADATA_MAX_KEYS} keys of 1-{METADATA_KEY_MAX} characters (letters, digits, _ . : -), values of at most "
        f"{METADATA_VALUE_MAX} characters")

    webhook: WebhookSpec | None = Field(default=None, description="where to POST signed job events (optional)")
    guard: GuardSpec | None = Field(
        default=None, description="forgetting guard (off unless given): select, among the final weights, the "
        "evaluated steps and WiSE-FT interpolations, the best objective that keeps every protect bound; "
        "written as checkpoints/helip_selected.pt",
    )


    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        return check_metadata(value)

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        family = model_family(self.model.name, self.model.config)
        if family == "coca":
            raise ValueError(
                f"model.name: {self.model.name} is a CoCa model, whose loss adds a captioning term; HELIP "
                "fine-tuning supports the CLIP and SigLIP families only (CoCa is refused rather than trained "
                "with the wrong loss)"
            )
        t = self.train
        if t.warmup >= 1 and t.max_steps is not None and t.warmup > t.max_steps:
            raise ValueError(f"train.warmup ({t.warmup:g} steps) is longer than the run (train.max_steps "
                             f"{t.max_steps})")
        group = 1 + self.helip.hard_per_target
        per_step = self.train.batch_size
        if per_step < group:
            raise ValueError(
                f"train.batch_size ({per_step}) must be at least 1 + helip.hard_per_target ({group})"
            )
        if per_step % (group * self.train.accum_steps) != 0:
            raise ValueError(
                f"train.batch_size ({per_step}) must be a multiple of (1 + helip.hard_per_target) x "
                f"train.accum_steps ({group * self.train.accum_steps})"
            )
        if self.mining.shards is not None and self.mining.shards > 1 and self.mining.method != "exact":
            raise ValueError(f"mining.shards ({self.mining.shards}) applies to method `exact` only; the "
                             f"`{self.mining.method}` miner runs in one process (leave mining.shards null or 1)")
        if self.helip.hard_per_target > 0 and self.mining.top_k < self.helip.sample_from:
            raise ValueError(
                f"mining.top_k ({self.mining.top_k}) must be at least helip.sample_from ({self.helip.sample_from})"
            )
        if self.helip.hard_per_target > self.helip.sample_from:
            raise ValueError(
                f"helip.hard_per_target ({self.helip.hard_per_target}) must be at most helip.sample_from "
                f"({self.helip.sample_from})"
            )
        sets: list[ZeroShotSpec | RetrievalSpec | LinearProbeSpec] = [
            *self.eval.zeroshot, *self.eval.retrieval, *self.eval.linear_probe]
        names = [e.name for e in sets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"eval data set names must be unique; repeated: {dupes}")
        if self.guard is not None:
            self._check_guard()
        return self

    def _check_guard(self) -> None:
        guard = self.guard
        if guard is None:
            return
        kinds = {e.name: kind for kind in _METRICS for e in getattr(self.eval, kind)}
        if not kinds:
            raise ValueError("guard: needs at least one eval data set (eval.zeroshot, eval.retrieval or "
                             "eval.linear_probe) to measure what the model keeps")
        keys = [("guard.objective", guard.objective)] if guard.objective else []
        keys += [("guard.protect", k) for k in guard.protect]
        for field, key in keys:
            ds, _, metric = key.partition("/")
            if ds not in kinds:
                raise ValueError(f"{field}: '{key}' must be DATASET/METRIC with DATASET one of the eval data "
                                 f"sets {sorted(kinds)}")
            if metric not in _METRICS[kinds[ds]]:
                raise ValueError(f"{field}: '{key}': {ds} reports {', '.join(_METRICS[kinds[ds]])}")


# Which field a cross-field message is about: the first field named in it.
_CROSS_FIELD_PARAMS = (
    "model.name", "train.warmup", "guard.objective", "guard.protect", "guard",
    "train.batch_size", "mining.shards", "mining.top_k", "helip.hard_per_target", "eval",
)


def _param_of(err: Mapping[str, Any]) -> str:
    loc = [str(p) for p in err.get("loc", ()) if p != "__root__"]
    if loc:
        return ".".join(loc)
    msg = err.get("msg", "")
    for p in _CROSS_FIELD_PARAMS:
        if p in msg:
            return p
    return ""


def parse_spec(doc: Any) -> JobSpec:
    """Validate a spec document (a dict); raise `SpecError` naming the first offending field."""
    if not isinstance(doc, dict):
        raise SpecError("the job spec must be a JSON object", param="")
    try:
        return JobSpec.model_validate(doc)
    except ValidationError as exc:
        raise spec_error(exc.errors(include_url=False)) from None


def spec_error(errors: list[Any]) -> SpecError:
    """The SpecError for pydantic's errors of a spec (locations relative to the spec): the first one, worded as
    `helip run` and the API both word it."""
    first = errors[0]
    param = _param_of(first)
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = f"unknown field '{param}'"
    elif first.get("type") == "missing":
        msg = f"field '{param}' is required"
    elif param:
        msg = f"{param}: {msg}"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return SpecError(msg.replace("Value error, ", "") + more, param=param or None)


def resolve_spec(doc: Any | JobSpec, *, seed: int | None = None) -> JobSpec:
    """Parse and fill in what is left open: the seed (random when neither the spec nor `seed` gives one)."""
    spec = doc if isinstance(doc, JobSpec) else parse_spec(doc)
    spec = spec.model_copy(deep=True)
    if spec.train.seed is None:
        spec.train.seed = seed if seed is not None else random.SystemRandom().randrange(2**31 - 1)
    return spec


def load_spec_file(path: str | Path) -> JobSpec:
    """Read a JSON or YAML spec file (the file given to `helip run`)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read spec file {p}: {exc.strerror}", param=None) from None
    try:
        doc = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file {p} is neither valid JSON nor YAML: {exc}", param=None) from None
    return resolve_spec(doc)


def spec_locations(spec: JobSpec) -> list[tuple[str, str]]:
    """Every user-supplied location in the spec, as (field, location): what the API checks before queueing."""
    out: list[tuple[str, str]] = [("data.train", spec.data.train)]
    pre = spec.model.pretrained
    if pre and _looks_like_location(pre):
        out.append(("model.pretrained", pre))
    if spec.mining.encoder_pretrained and _looks_like_location(spec.mining.encoder_pretrained):
        out.append(("mining.encoder_pretrained", spec.mining.encoder_pretrained))
    for i, z in enumerate(spec.eval.zeroshot):
        out.append((f"eval.zeroshot.{i}.root", z.root))
    for i, r in enumerate(spec.eval.retrieval):
        out.append((f"eval.retrieval.{i}.data", r.data))
    for i, lp in enumerate(spec.eval.linear_probe):
        out.append((f"eval.linear_probe.{i}.train", lp.train))
        out.append((f"eval.linear_probe.{i}.test", lp.test))
    return out


def _looks_like_location(value: str) -> bool:
    """A pretrained value is a location (not an open_clip tag) when it has a scheme or a path separator."""
    if value.startswith("hf-hub:"):  # a hub repository, not a location: the API's model check decides
        return False
    return any(c in value for c in "./:~\\")  # open_clip tags have none of these (checked in tests)
