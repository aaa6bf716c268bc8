"""The job spec: one document for `POST /jobs`, `helip run` and `GET /jobs/{id}` (see CONTRACT.md).

Every field has a default except `model.name` and `data.train`; unknown fields are an error.
`resolve_spec` fills the defaults and the seed and checks values that depend on each other, and
raises `SpecError` naming the field (dotted path, e.g. `train.batch_size`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import SpecError
from core.families import model_family


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    name: str = Field(min_length=1, description="open_clip architecture name, e.g. ViT-B-32")
    config: dict[str, Any] | None = Field(
        default=None,
        description="A custom open_clip model config (model_configs/*.json schema), registered as `name`.",
    )
    pretrained: str | None = Field(
        default=None,
        description="An open_clip pretrained tag, a local checkpoint path, or s3://bucket/key. "
        "None means random initialisation (only sensible for tests).",
    )


class DataSpec(_Strict):
    train: str = Field(min_length=1, description="webdataset shards (brace-expanded) or a CSV/TSV file")
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"
    max_bad_fraction: float = Field(
        default=0.01, ge=0.0, le=1.0,
        description="The job fails when more than this fraction of samples is corrupt or missing.",
    )
    max_caption_chars: int = Field(default=10_000, ge=1, description="Longer captions count as bad samples.")
    workers: int = Field(default=2, ge=0, le=64, description="DataLoader worker processes.")


class MiningSpec(_Strict):
    encoder: str = Field(default="self", description="`self`, or an open_clip model name used as the miner")
    encoder_pretrained: str | None = Field(default=None, description="weights for a separate miner")
    top_k: int = Field(default=50, ge=1, le=1000)
    method: Literal["exact", "fast"] = "exact"
    candidates: int | None = Field(default=None, ge=1, description="fast: ANN candidates per query (default 4 x top_k)")
    reference_size: int = Field(default=3_000_000, ge=1, description="fast: size of the reference subset")
    same_caption_threshold: float = Field(default=0.995, ge=-1.0, le=1.0)
    duplicate_threshold: float = Field(default=0.98, ge=-1.0, le=1.0)
    clamp_negative: bool = Field(default=True, description="clamp each cosine at 0 before the product")
    block_size: int = Field(default=4096, ge=1)
    recall_sample: int = Field(default=1000, ge=0, description="fast: queries checked against exact")
    batch_size: int = Field(default=256, ge=1, description="embedding batch size")


class HelipSpec(_Strict):
    hard_per_target: int = Field(default=3, ge=0, le=64)
    sample_from: int = Field(default=50, ge=1)
    gamma: float = Field(default=0.3, ge=0.0)
    margin: float = 0.0
    margin_symmetric: bool = False
    dedupe_captions: bool = True


class TrainSpec(_Strict):
    epochs: float = Field(default=2.0, gt=0.0)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(default=256, ge=1, description="global batch (targets + hard pairs)")
    accum_steps: int = Field(
        default=1, ge=1, description="micro-batches per optimizer step, as open_clip's --accum-freq: features are "
        "cached so the loss sees the whole batch (a target stays with its hard pairs), then each micro-batch is "
        "recomputed with gradients; memory of one micro-batch, gradient of the whole batch")
    lr: float = Field(default=1e-5, gt=0.0)
    weight_decay: float = Field(default=0.1, ge=0.0)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.98, ge=0.0, lt=1.0)
    eps: float = Field(default=1e-6, gt=0.0)
    warmup: float = Field(default=0.03, ge=0.0, description="< 1: fraction of all steps; >= 1: steps "
                          "(refused when longer than the run)")
    grad_clip: float | None = Field(default=1.0, gt=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16", "amp", "amp_bf16", "amp_bfloat16", "pure_bf16",
                       "pure_fp16"] = Field(
        default="auto",
        description="auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16 / fp16 (autocast: open_clip's amp_bf16 / "
        "amp), pure_bf16 / pure_fp16 (weights in that type, as open_clip). open_clip's amp, amp_bf16 and "
        "amp_bfloat16 are accepted and stored as fp16 / bf16; note open_clip's own fp16 means pure_fp16 here.",
    )
    ssl_weight: float = Field(default=0.0, ge=0.0, description="SLIP-style SimCLR image-image term")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="filled in when omitted")
    checkpoint_every: int = Field(default=200, ge=1, description="optimizer steps between checkpoints")
    devices: int | None = Field(default=None, ge=1, description="processes for DDP (default: all GPUs, 1 on CPU)")
    compile: bool = Field(default=False, description="torch.compile the model (GPU)")
    log_every: int = Field(default=10, ge=1)
    lock_image: bool = Field(default=False, description="freeze the image tower (open_clip --lock-image)")
    lock_image_unlocked_groups: int = Field(
        default=0, ge=0, description="with lock_image: leave this many last layer groups trainable")
    lock_image_freeze_bn_stats: bool = Field(
        default=False, description="with lock_image: also freeze BatchNorm running statistics")
    lock_text: bool = Field(default=False, description="freeze the text tower (open_clip --lock-text)")
    lock_text_unlocked_layers: int = Field(
        default=0, ge=0, description="with lock_text: leave this many last layers trainable")
    lock_text_freeze_layer_norm: bool = Field(
        default=True, description="with lock_text: the LayerNorms of the locked layers are frozen too (false: "
        "they stay trainable, as open_clip's --lock-text-freeze-layer-norm off)")
    grad_checkpointing: bool = Field(
        default=False, description="recompute activations in backward (model.set_grad_checkpointing): less "
        "memory for large towers, about a third more compute")

    @field_validator("precision")
    @classmethod
    def _open_clip_precision(cls, v: str) -> str:
        # open_clip's autocast names are the same thing as ours: store one spelling.
        return {"amp": "fp16", "amp_bf16": "bf16", "amp_bfloat16": "bf16"}.get(v, v)


class ZeroShotSpec(_Strict):
    name: str = Field(min_length=1)
    root: str = Field(min_length=1, description="ImageFolder root: one folder per class")
    classnames: list[str] | None = None
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {c}."], min_length=1)


class RetrievalSpec(_Strict):
    name: str = Field(min_length=1)
    data: str = Field(min_length=1, description="same formats as data.train")
    csv_img_key: str | None = None
    csv_caption_key: str | None = None
    csv_separator: str | None = None


class LinearProbeSpec(_Strict):
    name: str = Field(min_length=1)
    train: str = Field(min_length=1, description="ImageFolder root")
    test: str = Field(min_length=1, description="ImageFolder root")
    epochs: int = Field(default=100, ge=1)
    weight_decay: float = Field(default=0.0, ge=0.0)


class EvalSpec(_Strict):
    zeroshot: list[ZeroShotSpec] = Field(default_factory=list)
    retrieval: list[RetrievalSpec] = Field(default_factory=list)
    linear_probe: list[LinearProbeSpec] = Field(default_factory=list)
    batch_size: int = Field(default=256, ge=1)
    every: int | None = Field(
        default=None, ge=0,
        description="evaluate during training every this many optimizer steps (results on the step metrics and "
        "the checkpoint rows); 0: never; unset: four times per run (at each quarter) when one evaluation reads "
        "at most a tenth of the images trained on between two evaluations (small eval sets), else never",
    )


# What each eval kind reports (core.evaluate), for checking DATASET/METRIC names in a guard.
_METRICS = {
    "zeroshot": ("acc1", "acc5", "mean_per_class_recall"),
    "retrieval": tuple(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)),
    "linear_probe": ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"),
}


class GuardSpec(_Strict):
    wise_alphas: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75], max_length=32,
        description="WiSE-FT weight interpolations evaluated after training, each in [0, 1] (0 = the input "
        "model, 1 = the boosted one; both ends are always evaluated)",
    )
    objective: str | None = Field(
        default=None, description="DATASET/METRIC to maximise (e.g. shapes/acc1); unset: the mean over every "
        "metric of every eval data set",
    )
    protect: dict[str, float] = Field(
        default_factory=dict, description="{DATASET/METRIC: max_drop}: the selected model may not lose more "
        "than max_drop on that metric against the input model",
    )

    @field_validator("wise_alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= a <= 1.0 for a in v):
            raise ValueError("every wise_alphas value must be in [0, 1]")
        return sorted(set(v))

    @field_validator("protect")
    @classmethod
    def _drops(cls, v: dict[str, float]) -> dict[str, float]:
        if any(d < 0 for d in v.values()):
            raise ValueError("a protect max_drop must be >= 0")
        return v


class JobSpec(_Strict):
    model: ModelSpec
    data: DataSpec
    mining: MiningSpec = Field(default_factory=MiningSpec)
    helip: HelipSpec = Field(default_factory=HelipSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    control: bool = Field(default=False, description="also run a plain fine-tune with the same steps")
    guard: GuardSpec | None = Field(
        default=None, description="forgetting guard (off unless given): select, among the final weights, the "
        "evaluated steps and WiSE-FT interpolations, the best objective that keeps every protect bound; "
        "written as checkpoints/helip_selected.pt",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
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
        if self.helip.hard_per_target > 0 and self.mining.top_k < self.helip.sample_from:
            raise ValueError(
                f"mining.top_k ({self.mining.top_k}) must be at least helip.sample_from ({self.helip.sample_from})"
            )
        if self.helip.hard_per_target > self.helip.sample_from:
            raise ValueError(
                f"helip.hard_per_target ({self.helip.hard_per_target}) must be at most helip.sample_from "
                f"({self.helip.sample_from})"
            )
        if self.mining.candidates is not None and self.mining.candidates < self.mining.top_k:
            raise ValueError(
                f"mining.candidates ({self.mining.candidates}) must be at least mining.top_k ({self.mining.top_k})"
            )
        names = [e.name for e in (*self.eval.zeroshot, *self.eval.retrieval, *self.eval.linear_probe)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"eval data set names must be unique; repeated: {dupes}")
        if self.guard is not None:
            self._check_guard()
        return self

    def _check_guard(self) -> None:
        kinds = {e.name: kind for kind in _METRICS for e in getattr(self.eval, kind)}
        if not kinds:
            raise ValueError("guard: needs at least one eval data set (eval.zeroshot, eval.retrieval or "
                             "eval.linear_probe) to measure what the model keeps")
        keys = [("guard.objective", self.guard.objective)] if self.guard.objective else []
        keys += [("guard.protect", k) for k in self.guard.protect]
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
    "train.batch_size", "mining.top_k", "helip.hard_per_target", "mining.candidates", "eval",
)


def _param_of(err: dict) -> str:
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
        errors = exc.errors(include_url=False)
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
        raise SpecError(msg.replace("Value error, ", "") + more, param=param or None) from None


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
    return "://" in value or "/" in value or value.startswith((".", "~")) or ":" in value
