"""The dashboard: its static page (/ui), Swagger UI served from the package (/docs), and its JSON endpoints:
the hard-pair browser's picks and rows, thumbnails of a job's own training images, and (api.routes.guard) the
forgetting guard's curves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.openapi.docs import (
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from api.deps import OwnerDep, SessionDep, SettingsDep, StoreDep
from api.errors import ApiError, not_found
from api.job_data import Embeddings, JobData, MinedTable, key_crc
from api.routes import guard
from api.routes.jobs import ERRORS, INT64_MAX, _owned
from api.thumbnails import Indexes, ThumbnailCache, render_thumbnail
from core.decoding import BadSample
from core.errors import HelipError
from helip import crud

STATIC = Path(__file__).resolve().parent.parent / "ui" / "static"
SWAGGER = "/ui/static/vendor/swagger-ui"
router = APIRouter(prefix="/jobs", tags=["dashboard"])
pages = APIRouter(include_in_schema=False)
Row = Annotated[int, PathParam(ge=0, le=INT64_MAX, description="a training row number (0-based)")]


class PickedRow(BaseModel):
    row: int = Field(description="a training row number (0-based)")
    score: float | None = Field(description="the row's best mined score (its first neighbour's)")


class HardPairRows(BaseModel):
    num_rows: int = Field(description="rows in the job's training index")
    mined_rows: int = Field(description="rows that took part in mining (usable samples)")
    data: list[PickedRow] = Field(description="the rows picked (by number, at random, or by best score)")


class Neighbor(BaseModel):
    row: int = Field(description="the neighbour's training row")
    key: str | None = Field(description="its sample key or file path in the training data")
    caption: str | None = Field(description="null when the training data cannot be read now (see notes)")
    score: float = Field(description="the mined score: text cosine x image cosine after the filters")
    text_cosine: float | None = Field(description="from the job's stored embeddings; null when it kept none")
    image_cosine: float | None = Field(description="from the job's stored embeddings; null when it kept none")


class RowFilterCounts(BaseModel):
    candidates: int = Field(description="other usable rows this row was compared with")
    same_caption: int = Field(description="dropped: text cosine above mining.same_caption_threshold")
    duplicate: int = Field(description="a cosine above mining.duplicate_threshold, zeroed")


class Filters(BaseModel):
    same_caption_threshold: float = Field(description="the job's mining.same_caption_threshold")
    duplicate_threshold: float = Field(description="the job's mining.duplicate_threshold")
    clamp_negative: bool = Field(description="the job's mining.clamp_negative")
    row: RowFilterCounts | None = Field(description="for this row; null when not computed (no embeddings, too big)")
    job: dict[str, Any] = Field(description="the whole job's counts from its mining report")


class HardPairRow(BaseModel):
    row: int = Field(description="the target's training row")
    key: str | None = Field(description="its sample key or file path in the training data")
    caption: str | None = Field(description="its caption; null when the training data cannot be read now")
    num_rows: int = Field(description="rows in the job's training index")
    top_k: int = Field(description="neighbours mined per row")
    neighbors: list[Neighbor] = Field(description="hardest first")
    scores: list[str] = Field(description="which scores the neighbours carry: product, text_cosine, image_cosine")
    notes: list[str] = Field(description="what could not be shown, and why")
    filters: Filters = Field(description="the mining filters and what they dropped")


class Dashboard:
    """What one app keeps for the dashboard: opened tables and embeddings, training indexes, thumbnails."""

    def __init__(self, data_dir: Path):
        self.data = JobData(Path(data_dir) / "dashboard-cache")
        self.indexes = Indexes()
        self.thumbnails = ThumbnailCache()


def _dashboard(request: Request) -> Dashboard:
    return request.app.state.dashboard


# -- pages -----------------------------------------------------------------------------------------------


@pages.get("/ui")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


# The page runs only its own scripts and talks only to this API: an injected script could not send the key
# elsewhere. Images are blobs made from API responses; chart and layout code sets inline styles.
PAGE_CSP = ("default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' blob:; "
            "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


@pages.get("/ui/", response_class=FileResponse)
def ui_page() -> FileResponse:
    """The single page; it asks for the API key and calls the JSON endpoints with it."""
    return FileResponse(STATIC / "index.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_CSP,
                                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


@pages.get("/docs", response_class=HTMLResponse)
def swagger_ui() -> HTMLResponse:
    """Swagger UI from the files vendored in the package: /docs works offline and calls no other host."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json", title="helip - API docs", oauth2_redirect_url="/docs/oauth2-redirect",
        swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js", swagger_css_url=f"{SWAGGER}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER}/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},  # else it sends the spec to a public validator
    )


@pages.get("/docs/oauth2-redirect", response_class=HTMLResponse)
def swagger_oauth2_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


def install(app: FastAPI, data_dir: Path) -> None:
    """The page routes, the static files, the JSON endpoints, and the app's dashboard caches (nothing opened yet)."""
    app.state.dashboard = Dashboard(data_dir)
    app.include_router(router)
    app.include_router(guard.router)
    app.include_router(pages)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")


# -- the hard-pair browser's data ------------------------------------------------------------------------


def _table(request: Request, session, job_id: str, store) -> MinedTable:  # noqa: ANN001
    art = crud.get_artifact(session, job_id=job_id, name="hard_pairs")
    if art is None:
        raise ApiError(404, "not_available", "this job has no mined hard pairs yet")
    return _dashboard(request).data.table(store, art.key, art.sha256, art.size)


def _row_of(table: MinedTable, row: int) -> int:
    if row >= table.num_rows:
        raise ApiError(404, "row_not_found", f"row {row} is out of range: the job has {table.num_rows} rows",
                       param="row")
    pos = table.position(row)
    if pos is None:
        raise ApiError(404, "row_not_mined", f"row {row} was not mined (the sample is unusable)", param="row")
    return pos


@router.get("/{job_id}/hard-pairs/rows", response_model=HardPairRows, responses=ERRORS)
def hard_pair_rows(job_id: str, request: Request, session: SessionDep, owner: OwnerDep, store: StoreDep,
                   order: Annotated[Literal["highest", "lowest", "random"], Query(
                       description="by the row's best neighbour score, or at random")] = "highest",
                   limit: Annotated[int, Query(ge=1, le=100)] = 10, offset: Annotated[int, Query(ge=0)] = 0,
                   seed: Annotated[int | None, Query(ge=0, le=2**32 - 1)] = None) -> dict[str, Any]:
    """Training rows to look at in the hard-pair browser: {num_rows, mined_rows, data: [{row, score}]}."""
    _owned(session, job_id, owner)
    table = _table(request, session, job_id, store)
    picked = table.pick(order, limit, offset, seed)
    return {"num_rows": table.num_rows, "mined_rows": len(table.rows),
            "data": [{"row": r, "score": s} for r, s in picked]}


def _captions(request: Request, job, settings, table: MinedTable,  # noqa: ANN001
              rows: list[int]) -> tuple[list[str | None], str | None]:
    """Captions of `rows` from the job's index, or (Nones, why) when the data cannot be read now."""
    try:
        index = _dashboard(request).indexes.get(job.id, job.spec, settings.access())
    except HelipError as exc:
        return [None] * len(rows), f"the training data cannot be read now: {exc.message}"
    if len(index) != table.num_rows:
        return [None] * len(rows), (f"the training data changed since the job ran ({len(index)} rows now, "
                                    f"{table.num_rows} then)")
    return [index.captions[r] for r in rows], None


def _cosines(request: Request, session, store, job_id: str, row: int, rows: list[int],  # noqa: ANN001
             mining: dict[str, Any]) -> tuple[list | None, list | None, dict | None, str | None]:
    art = crud.get_artifact(session, job_id=job_id, name="embeddings")
    if art is None:
        return None, None, None, "text and image cosines are not shown: this job kept no embeddings"
    emb: Embeddings | None = _dashboard(request).data.embeddings(store, art.key, art.sha256, art.size)
    if emb is None:
        return None, None, None, "text and image cosines are not shown: the embeddings file is too large to open here"
    ct, cv = emb.cosines(row, rows)
    counts = emb.filter_counts(row, same_caption_threshold=mining["same_caption_threshold"],
                               duplicate_threshold=mining["duplicate_threshold"])
    return ct, cv, counts, None


@router.get("/{job_id}/hard-pairs/{row}", response_model=HardPairRow, responses=ERRORS)
def hard_pair_row(job_id: str, row: Row, request: Request, session: SessionDep, owner: OwnerDep,
                  settings: SettingsDep, store: StoreDep) -> dict[str, Any]:
    """One training row with its mined neighbours: captions, the stored product score, and the text and image
    cosines recomputed from the job's own embeddings; the filters' counts for this row and for the whole job."""
    job = _owned(session, job_id, owner)
    table = _table(request, session, job_id, store)
    _row_of(table, row)
    rec = table.record(row)
    if rec is None:  # a row the mining left out (an unusable sample)
        raise not_found("mined row")
    neighbors = [int(n) for n in rec["neighbors"]]
    captions, data_note = _captions(request, job, settings, table, [row, *neighbors])
    mining = (job.spec or {})["mining"]
    ct, cv, counts, cos_note = _cosines(request, session, store, job_id, row, neighbors, mining)
    keys = _neighbor_keys(table, neighbors)
    out_neighbors = []
    for i, n in enumerate(neighbors):
        out_neighbors.append({
            "row": n, "key": keys[i], "caption": captions[1 + i], "score": float(rec["scores"][i]),
            "text_cosine": None if ct is None else ct[i], "image_cosine": None if cv is None else cv[i],
        })
    report = table.report
    return {
        "row": row, "key": rec["key"], "caption": captions[0], "num_rows": table.num_rows, "top_k": table.top_k,
        "neighbors": out_neighbors,
        "scores": ["product"] + ([] if ct is None else ["text_cosine", "image_cosine"]),
        "notes": [n for n in (data_note, cos_note) if n],
        "filters": {
            "same_caption_threshold": mining["same_caption_threshold"],
            "duplicate_threshold": mining["duplicate_threshold"], "clamp_negative": mining["clamp_negative"],
            "row": counts,
            "job": {k: report.get(k) for k in ("method", "counted_over", "same_caption_filtered",
                                               "duplicate_filtered", "valid_rows")},
        },
    }


def _neighbor_keys(table: MinedTable, rows: list[int]) -> list[str | None]:
    import pyarrow.parquet as pq

    if not rows:
        return []
    got = pq.read_table(table.path, columns=["row", "key"], filters=[("row", "in", rows)])
    keys = dict(zip(got.column("row").to_pylist(), got.column("key").to_pylist(), strict=True))
    return [keys.get(r) for r in rows]


@router.get("/{job_id}/thumbnails/{row}", response_class=Response, responses={
    **ERRORS, 200: {"content": {"image/jpeg": {}}, "description": "the row's image, fitted into size x size"}})
def thumbnail(job_id: str, row: Row, request: Request, session: SessionDep, owner: OwnerDep, settings: SettingsDep,
              store: StoreDep, size: Annotated[int, Query(ge=32, le=512)] = 160) -> Response:
    """A training image of the job, read from the job's own data through the job's location checks, resized
    and cached. Only rows of the job's index exist here; another key's job is a 404."""
    job = _owned(session, job_id, owner)
    dash = _dashboard(request)
    cached = dash.thumbnails.get((job.id, row, size))
    if cached is None:
        cached = _render(dash, session, store, job, row, size, settings)
        dash.thumbnails.put((job.id, row, size), cached)
    return Response(cached, media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})


def _render(dash: Dashboard, session, store, job, row: int, size: int, settings) -> bytes:  # noqa: ANN001
    try:
        index = dash.indexes.get(job.id, job.spec, settings.access())
    except HelipError as exc:
        raise ApiError(409, "data_unavailable", f"the job's training data cannot be read now: {exc.message}",
                       param="data.train") from None
    if row >= len(index):
        raise ApiError(404, "row_not_found", f"row {row} is out of range: the job has {len(index)} rows", param="row")
    art = crud.get_artifact(session, job_id=job.id, name="hard_pairs")
    if art is not None:  # the rebuilt index must be the one the job mined, row for row
        table = dash.data.table(store, art.key, art.sha256, art.size)
        pos = table.position(row)
        if len(index) != table.num_rows or (pos is not None and table.crcs[pos] != key_crc(index.keys[row])):
            raise ApiError(409, "data_changed", "the job's training data changed since the job ran",
                           param="data.train")
    try:
        return render_thumbnail(index, row, settings.access(), size)
    except BadSample as exc:
        raise ApiError(404, "row_unusable", f"row {row} has no usable image ({exc.reason})", param="row") from None
