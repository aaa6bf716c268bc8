"""Request and response shapes of the REST API (one schema per direction)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.progress import Stage
from core.spec import JobSpec
from helip.tables import JobStatus

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
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Progress(BaseModel):
    model_config = ConfigDict(extra="allow")

    stage: Stage | None = None
    done: int | None = None
    total: int | None = None
    step: int | None = None
    total_steps: int | None = None
    eta_seconds: float | None = None
    run: str | None = Field(default=None, description="the training run of step/total_steps: helip or control")
    loss: float | None = Field(default=None, description="the training loss at that step (all terms summed)")


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: str = "job"
    status: JobStatus
    stage: Stage | None = Field(default=None, description="the stage a running job is in")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    spec: dict[str, Any] = Field(description="the resolved spec: every default filled in, the seed included")
    seed: int
    error: ErrorInfo | None = None
    result: dict[str, Any] | None = None
    progress: Progress | None = None
    attempts: int
    cancel_requested: bool
    stored_bytes: int = Field(default=0, description="bytes of this job's checkpoints and files in the store")


class JobsPage(BaseModel):
    data: list[JobPublic]
    has_more: bool


class EventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime
    level: str
    message: str
    data: dict[str, Any] | None = None


class EventsPage(BaseModel):
    data: list[EventPublic]
    has_more: bool


class StepPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    run: str
    step: int
    values: dict[str, Any]


class MetricsPage(BaseModel):
    data: list[StepPublic] = Field(description="training step series: loss terms, lr, samples/s")
    eval: dict[str, dict[str, dict[str, float]]] = Field(description="{model: {dataset: {metric: value}}}")
    has_more: bool


class Download(BaseModel):
    url: str
    expires_at: datetime
    sha256: str
    size: int


class CheckpointPublic(BaseModel):
    id: int = Field(description="the cursor for the next page (`after`)")
    run: str
    step: int
    final: bool
    metrics: dict[str, Any] | None = None
    sha256: str
    size: int
    created_at: datetime
    url: str
    expires_at: datetime


class CheckpointsPage(BaseModel):
    data: list[CheckpointPublic]
    has_more: bool


class HardPairsSampleRow(BaseModel):
    row: int
    key: str | None
    neighbors: list[int]
    neighbor_keys: list[str | None]
    scores: list[float]


class HardPairsPublic(BaseModel):
    url: str
    expires_at: datetime
    sha256: str
    size: int
    num_rows: int
    sample: list[HardPairsSampleRow]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
