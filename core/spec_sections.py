"""The sections of a job spec (model, data, mining, helip, train, eval, guard, webhook): fields, defaults, bounds."""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from core.spec_values import (
    MAX_BATCH,
    MAX_NAME,
    MAX_STEPS,
    NEVER,
    DatasetName,
    Strict,
    check_model_config,
)


class ModelSpec(Strict):
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


class DataSpec(Strict):
    train: str = Field(min_length=1, description="webdataset shards (brace-expanded) or a CSV/TSV file")
    csv_img_key: str = Field(default="filepath", description="CSV column holding the image path (open_clip's default)")
    csv_caption_key: str = Field(default="title", description="CSV column holding the caption (open_clip's default)")
    csv_separator: str = Field(default="\t", description="CSV column separator (a tab by default)")
    max_bad_fraction: float = Field(
        default=0.01, ge=0.0, le=1.0,
        description="The job fails when more than this fraction of samples is corrupt or missing.",
    )
    max_caption_chars: int = Field(default=10_000, ge=1, le=1_000_000, description="Longer captions count as bad samples.")
    decode: Literal["auto", "cpu", "device"] = Field(
        default="auto",
        description="Where JPEG images are decoded for embedding and training: `device` decodes each batch on the "
                    "job's device (nvJPEG on a GPU) with the model's resize and crop there, the workers only read "
                    "bytes; `cpu` decodes in the workers; `auto`: `device` on a GPU, `cpu` otherwise. Other formats "
                    "are always decoded by the workers.",
    )
    workers: int | None = Field(
        default=None, ge=0, le=64,
        description="DataLoader worker processes per training process (default: the host's cores divided among the "
                    "job's processes, minus one for each main process; at least 1, at most 16). 0 reads in the main "
                    "process.",
    )


class MiningSpec(Strict):
    encoder: str = Field(default="self", description="`self`, or an open_clip model name used as the miner")
    encoder_pretrained: str | None = Field(default=None, description="weights for a separate miner")
    top_k: int = Field(default=50, ge=1, le=1000, description="hard pairs kept per training pair, best first")
    method: Literal["exact", "fast"] = Field(
        default="exact",
        description="`exact`: every pair scored (symmetric tiles, threshold selection); `fast`: an inverted-file "
        "self-join over k-means lists of [text; image], recall measured on held-out queries",
    )
    list_size: int = Field(default=128, ge=1, le=MAX_BATCH, description="fast: rows per inverted list (k-means cluster)")
    probe: int = Field(default=32, ge=1, le=100_000, description="fast: lists each list's rows are compared with, its own "
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
    cache: bool = Field(
        default=True,
        description="reuse embeddings and hard pairs an earlier job computed from the same model weights, data "
        "content and mining options (kept in the service's store), and store this job's for later ones; false: "
        "embed and mine afresh and store nothing (the job's events and result.summary.cache say what was reused)")
    shards: int | None = Field(
        default=None, ge=1, le=100_000,
        description="exact: split mining into this many row-range shards that any worker may mine (the table is "
        "the same as unsharded); null: automatic, 1 below 200,000 valid pairs, else one per 250,000 pairs or more "
        "when a shard would not fit a worker's memory budget (HELIP_SHARD_MEMORY_BYTES); more than 1 needs "
        "method `exact`")
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


class HelipSpec(Strict):
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


class TrainSpec(Strict):
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
    compile: bool | None = Field(
        default=None,
        description="torch.compile the model for training (default: on a GPU, off on a CPU). When compilation "
                    "fails, the run goes on uncompiled and says so in an event",
    )
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


class ZeroShotSpec(Strict):
    name: DatasetName = Field(description="the data set's name in the results (at most 128 printable characters, no '/')")
    root: str = Field(min_length=1, description="ImageFolder root: one folder per class")
    classnames: list[str] | None = Field(default=None, max_length=100_000,
                                         description="class names in folder order; default the folder names")
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {c}."], min_length=1, max_length=1000,
                                 description="prompt templates; {c} is replaced by the class name")


class RetrievalSpec(Strict):
    name: DatasetName = Field(description="the data set's name in the results (at most 128 printable characters, no '/')")
    data: str = Field(min_length=1, description="same formats as data.train")
    csv_img_key: str | None = Field(default=None, description="CSV image column (default filepath)")
    csv_caption_key: str | None = Field(default=None, description="CSV caption column (default title)")
    csv_separator: str | None = Field(default=None, description="CSV separator (default a tab)")


class LinearProbeSpec(Strict):
    name: DatasetName = Field(description="the data set's name in the results (at most 128 printable characters, no '/')")
    train: str = Field(min_length=1, description="ImageFolder root")
    test: str = Field(min_length=1, description="ImageFolder root")
    epochs: int = Field(default=100, ge=1, le=10_000, description="training epochs of the linear classifier")
    weight_decay: float = Field(default=0.0, ge=0.0, le=100.0, description="weight decay of the linear classifier")


class EvalSpec(Strict):
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


class GuardSpec(Strict):
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


class WebhookSpec(Strict):
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
