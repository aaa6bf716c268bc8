"""The job spec: one document for `POST /jobs`, `helip run` and `GET /jobs/{id}` (field reference: docs/spec.md).

Every field has a default except `model.name` and `data.train`; unknown fields are an error.
`resolve_spec` fills the defaults and the seed and checks values that depend on each other, and
raises `SpecError` naming the field (dotted path, e.g. `train.batch_size`).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import SpecError
from core.families import model_family

# Bounds that no real job needs to exceed: they keep a hostile or mistyped value from holding a worker.
MAX_STRING = 4096  # any string in the spec (locations, templates, names)
MAX_NAME = 128  # data set names: they become metric keys and database values
MAX_STEPS = 10_000_000
NEVER = 1_000_000_000  # an interval (checkpoint_every, log_every) this large means "not during the run"
MAX_BATCH = 1 << 20
MAX_CONFIG_DEPTH = 6
MAX_CONFIG_NODES = 2000
MAX_CONFIG_PARAMS = 10_000_000_000  # an estimate of a custom model's parameters (the largest open_clip: 5B)


def _check_value(value: Any, where: str = "") -> None:
    """Refuse NUL characters and over-long strings anywhere in a field's value (lists, maps and their keys
    included). Iterative: a deeply nested value is walked without recursion."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                raise ValueError(f"{at or 'value'} contains a NUL character")
            if len(v) > MAX_STRING:
                raise ValueError(f"{at or 'value'} is longer than {MAX_STRING} characters")
        elif isinstance(v, (list, tuple)):
            stack.extend((x, f"{at}[{i}]" if at else f"item {i}") for i, x in enumerate(v))
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, f"a key of {at or 'the map'}"))
                stack.append((x, f"{at}.{k}" if at else str(k)))


NAME_MAX, METADATA_MAX_KEYS, METADATA_KEY_MAX, METADATA_VALUE_MAX = 200, 32, 64, 512
METADATA_KEY = re.compile(r"[A-Za-z0-9_.:-]+")


def check_metadata(value: dict[str, str]) -> dict[str, str]:
    """Job metadata within its bounds (key count, key characters and length, value length), else ValueError."""
    if len(value) > METADATA_MAX_KEYS:
        raise ValueError(f"at most {METADATA_MAX_KEYS} keys, got {len(value)}")
    for key, val in value.items():
        if not METADATA_KEY.fullmatch(key) or len(key) > METADATA_KEY_MAX:
            raise ValueError(f"key {key[:80]!r} must be 1-{METADATA_KEY_MAX} letters, digits, _ . : or -")
        if len(val) > METADATA_VALUE_MAX:
            raise ValueError(f"the value of {key!r} is longer than {METADATA_VALUE_MAX} characters")
    return value


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN and Infinity are a 422 naming the field, never a training run with null losses.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _safe_values(cls, value: Any) -> Any:
        _check_value(value)
        return value


def _dataset_name(value: str) -> str:
    if not value or len(value) > MAX_NAME or any(c in value for c in "/\\") or not value.isprintable():
        raise ValueError(f"a data set name is 1 to {MAX_NAME} printable characters without '/' or '\\'")
    return value


DatasetName = Annotated[str, AfterValidator(_dataset_name)]


def check_model_config(config: dict[str, Any]) -> None:
    """A custom open_clip config: JSON values only, finite, bounded in depth and size, and a model of a size that
    a worker can hold (a rough parameter estimate: 12 x layers x width^2 per tower plus the token embedding)."""
    nodes = 0

    def walk(v: Any, path: str, depth: int) -> None:
        nonlocal nodes
        nodes += 1
        if nodes > MAX_CONFIG_NODES:
            raise ValueError(f"model.config has more than {MAX_CONFIG_NODES} values")
        if depth > MAX_CONFIG_DEPTH:
            raise ValueError(f"model.config is nested deeper than {MAX_CONFIG_DEPTH} levels (at {path})")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str) or not k or len(k) > MAX_NAME or "\x00" in k:
                    raise ValueError(f"model.config has an invalid key at {path or 'the top'}")
                walk(x, f"{path}.{k}" if path else k, depth + 1)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]", depth + 1)
        elif isinstance(v, bool) or v is None:
            pass
        elif isinstance(v, (int, float)):
            if not math.isfinite(v) or abs(v) > 1e7:
                raise ValueError(f"model.config.{path} must be a finite number of magnitude at most 1e7")
        elif isinstance(v, str):
            _check_value(v, f"model.config.{path}")
        else:
            raise ValueError(f"model.config.{path} is not a JSON value")

    walk(config, "", 0)
    params = 0.0
    for tower in ("vision_cfg", "text_cfg"):
        cfg = config.get(tower)
        if not isinstance(cfg, dict):
            continue
        width, layers = cfg.get("width", 0), cfg.get("layers", 0)
        layers = sum(x for x in layers if isinstance(x, (int, float))) if isinstance(layers, list) else layers
        if isinstance(width, (int, float)) and isinstance(layers, (int, float)):
            params += 12.0 * max(layers, 0) * float(width) ** 2
            if tower == "text_cfg" and isinstance(cfg.get("vocab_size", 0), (int, float)):
                params += float(cfg.get("vocab_size", 0)) * float(width)
    if params > MAX_CONFIG_PARAMS:
        raise ValueError(f"model.config describes a model of about {params:.2g} parameters; at most "
                         f"{MAX_CONFIG_PARAMS:.0e} are accepted")


class ModelSpec(_Strict):
    name: str = Field(min_length=1, max_length=MAX_NAME, description="open_clip architecture name, e.g. ViT-B-32")
    config: dict[str, Any] | None = Field(
        default=None,
        description="A custom open_clip model config (model_configs/*.json schema), registered as `name`.",
    )
    pretrained: str | None = Field(
        default=None,
        description="An open_clip pretrained tag, a local checkpoint path, or s3://bucket/key. "
        "None means random initialisation (only sensible for tests).",
    )

    @field_validator("name", mode="after")
    @classmethod
    def _architecture_name(cls, value: str) -> str:
        if not re.fullmatch(r"hf-hub:[A-Za-z0-9][\w.\-]*/[\w.\-]+|[A-Za-z0-9][A-Za-z0-9._+\-]*", value):
            raise ValueError("an open_clip architecture name is letters, digits, '.', '_', '+' and '-' "
                             "(or hf-hub:org/name)")
        return value

    @field_validator("config", mode="after")
    @classmethod
    def _bounded_config(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_model_config(value)
        return value


class DataSpec(_Strict):
    train: str = Field(min_length=1, description="webdataset shards (brace-expanded) or a CSV/TSV file")
    csv_img_key: str = Field(default="filepath", description="CSV column holding the image path (open_clip's default)")
    csv_caption_key: str = Field(default="title", description="CSV column holding the caption (open_clip's default)")
    csv_separator: str = Field(default="\t", description="CSV column separator (a tab by default)")
    max_bad_fraction: float = Field(
        default=0.01, ge=0.0, le=1.0,
        description="The job fails when more than this fraction of samples is corrupt or missing.",
    )
    max_caption_chars: int = Field(default=10_000, ge=1, le=1_000_000, description="Longer captions count as bad samples.")
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
    list_size: int = Field(default=512, ge=1, le=MAX_BATCH, description="fast: rows per inverted list (k-means cluster)")
    probe: int = Field(default=8, ge=1, le=100_000, description="fast: lists each list's rows are compared with, its own "
                       "included (more: higher recall, proportionally slower)")
    same_caption_threshold: float = Field(default=0.995, ge=-1.0, le=1.0,
                                          description="a text cosine above this is the same caption: never hard")
    duplicate_threshold: float = Field(default=0.98, ge=-1.0, le=1.0,
                                       description="a cosine above this is set to 0 (a probable duplicate)")
    clamp_negative: bool = Field(default=True, description="clamp each cosine at 0 before the product")
    block_size: int = Field(default=4096, ge=1, le=MAX_BATCH, description="exact: at most this many rows per tile")
    recall_sample: int = Field(default=1000, ge=0, le=1_000_000, description="fast: random queries mined exactly too, to "
                               "measure and report recall@top_k (0: not measured)")
    batch_size: int = Field(default=256, ge=1, le=MAX_BATCH, description="embedding batch size")
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
    hard_per_target: int = Field(default=3, ge=0, le=64, description="hard pairs put in the batch after each target pair")
    sample_from: int = Field(default=50, ge=1, le=1000,
                             description="hard pairs are drawn uniformly from this many first neighbours")
    gamma: float = Field(default=0.3, ge=0.0, le=1000.0,
                         description="weight of the margin loss: L = L_clip + gamma * L_margin")
    margin: float = Field(default=0.0, ge=-2.0, le=2.0,
                          description="m in the margin loss (0 as in the paper); a difference of cosines, in [-2, 2]")
    margin_symmetric: bool = Field(default=False, description="also apply the margin term text-to-image")
    dedupe_captions: bool = Field(
        default=True, description="skip a hard pair whose caption equals one already in the batch (a false negative)")


class TrainSpec(_Strict):
    epochs: float = Field(default=2.0, gt=0.0, le=10_000.0, description="passes over the training targets (fractions allowed)")
    max_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="stop after this many optimizer steps")
    batch_size: int = Field(default=256, ge=1, le=MAX_BATCH, description="global batch (targets + hard pairs)")
    accum_steps: int = Field(
        default=1, ge=1, le=4096,
        description="micro-batches per optimizer step, as open_clip's --accum-freq: features are "
        "cached so the loss sees the whole batch (a target stays with its hard pairs), then each micro-batch is "
        "recomputed with gradients; memory of one micro-batch, gradient of the whole batch")
    lr: float = Field(default=1e-5, gt=0.0, le=10.0, description="peak AdamW learning rate (cosine schedule after warmup)")
    weight_decay: float = Field(default=0.1, ge=0.0, le=100.0, description="AdamW weight decay")
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="AdamW beta1")
    beta2: float = Field(default=0.98, ge=0.0, lt=1.0, description="AdamW beta2")
    eps: float = Field(default=1e-6, gt=0.0, le=1.0, description="AdamW epsilon")
    warmup: float = Field(default=0.03, ge=0.0, le=MAX_STEPS, description="< 1: fraction of all steps; >= 1: steps "
                          "(refused when longer than the run)")
    grad_clip: float | None = Field(default=1.0, gt=0.0, le=1e6,
                                    description="clip the gradient norm to this; null: no clipping")
    precision: Literal["auto", "fp32", "bf16", "fp16", "amp", "amp_bf16", "amp_bfloat16", "pure_bf16",
                       "pure_fp16"] = Field(
        default="auto",
        description="auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16 / fp16 (autocast: open_clip's amp_bf16 / "
        "amp), pure_bf16 / pure_fp16 (weights in that type, as open_clip). open_clip's amp, amp_bf16 and "
        "amp_bfloat16 are accepted and stored as fp16 / bf16; note open_clip's own fp16 means pure_fp16 here.",
    )
    ssl_weight: float = Field(default=0.0, ge=0.0, le=1000.0, description="SLIP-style SimCLR image-image term")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="filled in when omitted")
    checkpoint_every: int = Field(default=200, ge=1, le=NEVER, description="optimizer steps between checkpoints")
    keep_states: int = Field(
        default=2, ge=1, le=1000,
        description="resumable training states (weights + optimizer) kept in the store per run; older ones are "
                    "deleted once a newer one is stored, and all of a run's states once its final weights are",
    )
    devices: int | None = Field(default=None, ge=1, le=64, description="processes for DDP (default: all GPUs, 1 on CPU)")
    compile: bool = Field(default=False, description="torch.compile the model (GPU)")
    log_every: int = Field(default=10, ge=1, le=NEVER, description="optimizer steps between recorded training metrics")
    lock_image: bool = Field(default=False, description="freeze the image tower (open_clip --lock-image)")
    lock_image_unlocked_groups: int = Field(
        default=0, ge=0, le=1000, description="with lock_image: leave this many last layer groups trainable")
    lock_image_freeze_bn_stats: bool = Field(
        default=False, description="with lock_image: also freeze BatchNorm running statistics")
    lock_text: bool = Field(default=False, description="freeze the text tower (open_clip --lock-text)")
    lock_text_unlocked_layers: int = Field(
        default=0, ge=0, le=1000, description="with lock_text: leave this many last layers trainable")
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
    name: DatasetName = Field(description="the data set's name in the results (at most 128 printable characters, no '/')")
    root: str = Field(min_length=1, description="ImageFolder root: one folder per class")
    classnames: list[str] | None = Field(default=None, max_length=100_000,
                                         description="class names in folder order; default the folder names")
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {c}."], min_length=1, max_length=1000,
                                 description="prompt templates; {c} is replaced by the class name")


class RetrievalSpec(_Strict):
    name: DatasetName = Field(description="the data set's name in the results (at most 128 printable characters, no '/')")
    data: str = Field(min_length=1, description="same formats as data.train")
    csv_img_key: str | None = Field(default=None, description="CSV image column (default filepath)")
    csv_caption_key: str | None = Field(default=None, description="CSV caption column (default title)")
    csv_separator: str | None = Field(default=None, description="CSV separator (default a tab)")


class LinearProbeSpec(_Strict):
    name: DatasetName = Field(description="the data set's name in the results (at most 128 printable characters, no '/')")
    train: str = Field(min_length=1, description="ImageFolder root")
    test: str = Field(min_length=1, description="ImageFolder root")
    epochs: int = Field(default=100, ge=1, le=10_000, description="training epochs of the linear classifier")
    weight_decay: float = Field(default=0.0, ge=0.0, le=100.0, description="weight decay of the linear classifier")


class EvalSpec(_Strict):
    zeroshot: list[ZeroShotSpec] = Field(default_factory=list, max_length=32, description="zero-shot classification sets")
    retrieval: list[RetrievalSpec] = Field(default_factory=list, max_length=32, description="image-text retrieval sets")
    linear_probe: list[LinearProbeSpec] = Field(default_factory=list, max_length=32,
                                                description="linear-probe sets (train and test)")
    batch_size: int = Field(default=256, ge=1, le=65536, description="evaluation batch size")

    every: int | None = Field(
        default=None, ge=0, le=NEVER,
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


WEBHOOK_EVENTS = ("job.succeeded", "job.failed", "job.cancelled", "job.stage")
WebhookEvent = Literal["job.succeeded", "job.failed", "job.cancelled", "job.stage"]


class WebhookSpec(_Strict):
    url: str = Field(min_length=1, max_length=2048,
                     description="http(s) URL the events are POSTed to, signed per Standard Webhooks; its host must "
                     "be in the service's HELIP_WEBHOOK_ALLOWED_HOSTS")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list[WebhookEvent](["job.succeeded", "job.failed", "job.cancelled"]), min_length=1,
        description="which events to send: job.succeeded, job.failed, job.cancelled, job.stage (each stage start)")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class JobSpec(_Strict):
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
    "train.batch_size", "mining.top_k", "helip.hard_per_target", "eval",
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
