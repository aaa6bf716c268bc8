"""The FastAPI application factory: `create_app(settings)` (uvicorn: `api.main:create_app --factory`)."""

from __future__ import annotations

from fastapi import FastAPI

from api.deps import ServiceContext
from api.errors import install_error_handlers
from api.middleware import BodyLimitMiddleware, RateLimitMiddleware
from api.openapi import operation_id
from api.routes import files, health, jobs, ui, webhooks
from helip.entry import configure_process
from helip.settings import Settings, get_settings

DESCRIPTION = (
    "Boost a trained CLIP model with HELIP: mine hard pairs from its own training data and fine-tune it "
    "with a margin loss. Submit a job spec, follow its metrics and events, download checkpoints and the "
    "mined table. Errors are JSON {\"error\": {\"code\", \"message\", \"param\"}}."
)

def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app on `settings` (default: the environment). Connects to nothing until the first request."""
    configure_process()
    settings = settings or get_settings()
    # /docs comes from api.routes.ui (Swagger UI files vendored in the package, no CDN); no ReDoc page.
    app = FastAPI(title="helip", version="0.1.0", description=DESCRIPTION, generate_unique_id_function=operation_id,
                  docs_url=None, redoc_url=None)
    app.state.context = ServiceContext(settings)
    install_error_handlers(app)
    app.include_router(jobs.router)
    app.include_router(health.router)
    app.include_router(files.router)
    app.include_router(webhooks.router)
    ui.install(app, settings.data_dir)  # /ui/, /docs, and the dashboard's endpoints under /jobs/{id}/
    # Added last = runs first: refuse floods and oversized bodies before any work is done.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RateLimitMiddleware, rate_per_minute=settings.rate_limit_per_minute,
                       api_keys=settings.api_key_list())
    return app
