"""Clean OpenAPI operationIds (`create_job`, `get_job_metrics`, ...): what generated clients name their functions."""

from __future__ import annotations

from fastapi.routing import APIRoute

# Route functions whose names read badly as a client method; every other route is named after its function.
RENAMED = {
    "job_metrics": "get_job_metrics",
    "job_events": "list_job_events",
    "job_checkpoints": "list_job_checkpoints",
    "job_hard_pairs": "get_job_hard_pairs",
    "job_guard": "get_job_guard",
    "job_webhook_deliveries": "list_job_webhook_deliveries",
    "download": "download_file",
    "healthz": "get_health",
    "readyz": "get_readiness",
}


def operation_id(route: APIRoute) -> str:
    """FastAPI's generate_unique_id_function: the route function's name, or its RENAMED entry."""
    return RENAMED.get(route.name, route.name)
