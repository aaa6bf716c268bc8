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
    top_k: int = Field(default=50, ge=1, le=1000, description="hard pairs kept per training pair, best first")
    method: Literal["exact", "fast"] = Field(
        default="exact",
        description="`exact`: every pair scored (symmetric tiles, threshold selection); `fast`: an inverted-file "
        "self-join over k-means lists of [text; image], recall measured on held-out queries",
    )
    list_size: int = Field(default=512, ge=1, description="fast: rows per inverted list (k-means cluster)")
    probe: int = Field(default=8, ge=1, description="fast: lists each list's rows are compared with, its own "
                       "included (more: higher recall, proportionally slower)")
    same_caption_threshold: float = Field(default=0.995, ge=-1.0, le=1.0,
                                          description="a text cosine above this is the same caption: never hard")
    duplicate_threshold: float = Field(default=0.98, ge=-1.0, le=1.0,
                                       description="a cosine above this is set to 0 (a probable duplicate)")
    clamp_negative: bool = Field(default=True, description="clamp each cosine at 0 before the product")
    block_size: int = Field(default=4096, ge=1, description="exact: at most this many rows per tile")
    recall_sample: int = Field(default=1000, ge=0, description="fast: random queries mined exactly too, to "
                               "measure and report recall@top_k (0: not measured)")
    batch_size: int = Field(default=256, ge=1, description="embedding batch size")
    candidates: None = Field(default=None, exclude=True, description="removed: use `probe` and `list_size`")
    reference_size: None = Field(default=None, exclude=True, description="removed: the fast miner uses every row")

    @field_validator("candidates", "reference_size", mode="before")
    @classmethod
    def _removed(cls, value: Any, info: Any) -> None:
        if value is None:
            return None
        why = {"candidates": "the fast miner compares each row with the members of `mining.probe` lists of about "
                             "`mining.list_size` rows; set those instead",
               "reference_size": "the fast miner no longer samples a reference subset: every valid row is a "
                                 "candidate, and `mining.probe` / `mining.list_size` set the cost"}[info.field_name]
        raise ValueError(f"removed: {why}")


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
    accum_steps: int = Field(default=1, ge=1, description="gradient accumulation micro-steps per optimizer step")
    lr: float = Field(default=1e-5, gt=0.0)
    weight_decay: float = Field(default=0.1, ge=0.0)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.98, ge=0.0, lt=1.0)
    eps: float = Field(default=1e-6, gt=0.0)
    warmup: float = Field(default=0.03, ge=0.0, description="< 1: fraction of all steps; >= 1: steps")
    grad_clip: float | None = Field(default=1.0, gt=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    ssl_weight: float = Field(default=0.0, ge=0.0, description="SLIP-style SimCLR image-image term")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="filled in when omitted")
    checkpoint_every: int = Field(default=200, ge=1, description="optimizer steps between checkpoints")
    devices: int | None = Field(default=None, ge=1, description="processes for DDP (default: all GPUs, 1 on CPU)")
    compile: bool = Field(default=False, description="torch.compile the model (GPU)")
    log_every: int = Field(default=10, ge=1)


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


class JobSpec(_Strict):
    model: ModelSpec
    data: DataSpec
    mining: MiningSpec = Field(default_factory=MiningSpec)
    helip: HelipSpec = Field(default_factory=HelipSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    control: bool = Field(default=False, description="also run a plain fine-tune with the same steps")

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
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
        names = [e.name for e in (*self.eval.zeroshot, *self.eval.retrieval, *self.eval.linear_probe)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"eval data set names must be unique; repeated: {dupes}")
        return self


# Which field a cross-field message is about: the first field named in it.
_CROSS_FIELD_PARAMS = (
    "train.batch_size", "mining.top_k", "helip.hard_per_target", "eval",
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
