"""Request and response shapes of the REST API (one schema per direction)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from core.progress import Stage
from core.spec import JobSpec
from helip.status import JobStatus

# A complete, small job: the example shown in /docs for POST /jobs.
EXAMPLE_SPEC: dict[str, Any] = {
    "model": {"name": "ViT-B-32", "pretrained": "/srv/models/vit_b_32_cc3m.pt"},
    "data": {"train": "s3://datasets/cc3m/{00000..00331}.tar"},
    "mining": {"top_k": 50, "method": "fast"},
    "helip": {"hard_per_target": 3, "sample_from": 50, "gamma": 0.3},
    "train": {"epochs": 2, "batch_size": 512, "lr": 1e-5},
    "eval": {
        "zeroshot": [{"name": "imagenet-val", "root": "s3://datasets/imagenet/val/"}],
        "retrieval": [{"name": "coco-5k", "data": "s3://datasets/coco/karpathy_test.csv"}],
    },
    "control": True,
}


class JobCreate(JobSpec):
    """The body of POST /jobs: a job spec (docs/spec.md). Unknown fields are an error."""

    model_config = ConfigDict(title="JobCreate", json_schema_extra={"examples": [EXAMPLE_SPEC]})


class ErrorInfo(BaseModel):
    code: str = Field(description="stable machine-readable error code, e.g. invalid_spec, not_found")
    message: str = Field(description="what went wrong, for a person")
    param: str | None = Field(default=None, description="the field at fault as a dotted path (e.g. train.lr), if any")


class ErrorResponse(BaseModel):
    error: ErrorInfo = Field(description="the error")


class Progress(BaseModel):
    model_config = ConfigDict(extra="allow")

    stage: Stage | None = Field(default=None, description="the stage this progress belongs to")
    done: int | None = Field(default=None, description="items done in the stage (batches embedded, blocks mined ...)")
    total: int | None = Field(default=None, description="items in the stage, when known")
    step: int | None = Field(default=None, description="training: the last optimizer step of the current run")
    total_steps: int | None = Field(default=None, description="training: optimizer steps of the current run")
    eta_seconds: float | None = Field(default=None, description="seconds left in the current stage or training run")
    run: str | None = Field(default=None, description="the training run of step/total_steps: helip or control")
    loss: float | None = Field(default=None, description="the training loss at that step (all terms summed)")


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="the job id (job-...)")
    object: str = Field(default="job", description="always `job`")
    status: JobStatus = Field(description="queued | running | succeeded | failed | cancelling | cancelled")
    stage: Stage | None = Field(default=None, description="while running: embedding | mining | training | evaluating")
    created_at: datetime = Field(description="when the job was submitted")
    started_at: datetime | None = Field(default=None, description="when a worker first started it")
    finished_at: datetime | None = Field(default=None, description="when it succeeded, failed or was cancelled")
    heartbeat_at: datetime | None = Field(default=None, description="the running worker's last sign of life")
    spec: dict[str, Any] = Field(description="the resolved spec: every default filled in, the seed included")
    name: str | None = Field(default=None, description="the spec's name")
    metadata: dict[str, str] = Field(default_factory=dict, validation_alias=AliasChoices("meta", "metadata"),
                                     description="the spec's metadata (string labels; filter with metadata.KEY=VALUE)")
    seed: int = Field(description="the training seed (spec.train.seed, drawn at submit when not given)")
    error: ErrorInfo | None = Field(default=None, description="why a failed job failed")
    result: dict[str, Any] | None = Field(
        default=None, description="a succeeded job's summary: evaluation metrics {model: {dataset: {metric: value}}}, "
        "lift, mining statistics")
    progress: Progress | None = Field(default=None, description="live progress of a running job")
    attempts: int = Field(description="how many times a worker started the job (a job resumes after a lost worker)")
    cancel_requested: bool = Field(description="a cancel was asked for")
    stored_bytes: int = Field(default=0, description="bytes of this job's checkpoints and files in the store")


class JobsPage(BaseModel):
    data: list[JobPublic] = Field(description="jobs, newest first")
    has_more: bool = Field(description="more jobs follow: pass the last id as `after`")


class EventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int = Field(description="increasing event id: the `after` cursor")
    created_at: datetime = Field(description="when it happened")
    level: str = Field(description="info | warning | error")
    message: str = Field(description="what happened, for a person")
    data: dict[str, Any] | None = Field(default=None, description="structured details (stage, counts, timings ...)")


class EventsPage(BaseModel):
    data: list[EventPublic] = Field(description="events in order")
    has_more: bool = Field(description="more events follow: pass the last id as `after`")


class StepPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    run: str = Field(description="the training run: helip or control")
    step: int = Field(description="optimizer step")
    values: dict[str, Any] = Field(description="loss terms, lr, samples_per_second, logit_scale at that step")


class MetricsPage(BaseModel):
    data: list[StepPublic] = Field(description="training step series: loss terms, lr, samples/s")
    eval: dict[str, dict[str, dict[str, float]]] = Field(description="{model: {dataset: {metric: value}}}")
    has_more: bool = Field(description="more steps follow: pass the last step as `after_step`")


URL = "download link: works without an API key until expires_at (a presigned URL or a signed /files link)"


class Download(BaseModel):
    url: str = Field(description=URL)
    expires_at: datetime = Field(description="when the link stops working")
    sha256: str = Field(description="sha256 of the file, hex")
    size: int = Field(description="bytes")


class CheckpointPublic(BaseModel):
    id: int = Field(description="the cursor for the next page (`after`)")
    run: str = Field(description="the training run: helip, control or helip_selected")
    step: int = Field(description="optimizer step it was saved at")
    final: bool = Field(description="the run's final weights (else a resumable training state)")
    metrics: dict[str, Any] | None = Field(default=None, description="evaluation or training values at that step")
    sha256: str = Field(description="sha256 of the file, hex")
    size: int = Field(description="bytes")
    created_at: datetime = Field(description="when it was uploaded")
    url: str = Field(description=URL)
    expires_at: datetime = Field(description="when the link stops working")


class CheckpointsPage(BaseModel):
    data: list[CheckpointPublic] = Field(description="checkpoints by run and step")
    has_more: bool = Field(description="more checkpoints after the last one (pass its id as `after`)")


class HardPairsSampleRow(BaseModel):
    row: int = Field(description="row index of the pair in the training set")
    key: str | None = Field(description="the pair's own sample key (CSV path or shard key)")
    neighbors: list[int] = Field(description="row indices of its hard pairs, best first")
    neighbor_keys: list[str | None] = Field(description="their sample keys")
    scores: list[float] = Field(description="their scores: text cosine x image cosine")


class HardPairsPublic(BaseModel):
    url: str = Field(description=URL)
    expires_at: datetime = Field(description="when the link stops working")
    sha256: str = Field(description="sha256 of hard_pairs.parquet, hex")
    size: int = Field(description="bytes")
    num_rows: int = Field(description="rows in the mined table (training pairs)")
    sample: list[HardPairsSampleRow] = Field(description="the first rows with their keys")


class Health(BaseModel):
    status: str = Field(description="ok, or unavailable when a dependency is unreachable")
    checks: dict[str, str] = Field(default_factory=dict, description="each dependency checked and its state")


class WebhookSecret(BaseModel):
    secret: str = Field(description="whsec_ + base64 key: verify the webhook-signature header of this key's webhooks "
                                    "with it (Standard Webhooks, HMAC-SHA256)")


class WebhookAttempt(BaseModel):
    at: datetime = Field(description="when the attempt ended")
    status_code: int | None = Field(description="the receiver's HTTP status; null when no answer came")
    error: str | None = Field(description="why it failed; null when it was delivered")
    ms: int = Field(description="how long it took, milliseconds")


class WebhookDeliveryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int = Field(description="increasing delivery id: the `after` cursor")
    event: str = Field(description="job.succeeded | job.failed | job.cancelled | job.stage")
    message_id: str = Field(description="the webhook-id header, the same on every attempt (deduplicate on it)")
    url: str = Field(description="where it is sent")
    status: str = Field(description="pending (will be tried again) | delivered | failed (gave up)")
    attempts: int = Field(description="attempts so far")
    attempt_log: list[WebhookAttempt] = Field(description="every attempt, oldest first")
    payload: dict[str, Any] = Field(description="the JSON body sent: {type, timestamp, data: the job}")
    created_at: datetime = Field(description="when the event happened and the delivery was queued")
    next_attempt_at: datetime = Field(description="pending: when it is tried next")
    delivered_at: datetime | None = Field(default=None, description="when a 2xx answer came")


class WebhookDeliveriesPage(BaseModel):
    data: list[WebhookDeliveryPublic] = Field(description="deliveries in the order they were queued")
    has_more: bool = Field(description="more follow: pass the last id as `after`")
