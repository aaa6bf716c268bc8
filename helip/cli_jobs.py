"""`helip jobs ...`: drive a running helip API from the shell (submit, wait, list, show, events, metrics, cancel, download)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from helip.client import Client, HelipAPIError

app = typer.Typer(no_args_is_help=True, help="Drive a helip API: HELIP_API_URL and HELIP_API_KEY, or --api/--api-key.")

Api = Annotated[str, typer.Option("--api", envvar="HELIP_API_URL", help="base URL of the helip API")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="HELIP_API_KEY", help="bearer token",
                                               show_default=False)]
JobId = Annotated[str, typer.Argument(help="job id (job-...)")]
DEFAULT_API = "http://127.0.0.1:8000"


def _client(api: str, api_key: str | None) -> Client:
    return Client(api, api_key)


def _fail(exc: HelipAPIError) -> None:
    where = f" [{exc.param}]" if exc.param else ""
    status = f"{exc.status} " if exc.status else ""
    typer.secho(f"error ({status}{exc.code}){where}: {exc.message}", fg="red", err=True)
    raise typer.Exit(1)


def _dump(model) -> None:  # noqa: ANN001 - any pydantic model
    typer.echo(model.model_dump_json(indent=2))


def _load_spec(path: Path) -> dict:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as exc:
        typer.secho(f"error: cannot read the spec file {path}: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    if not isinstance(doc, dict):
        typer.secho(f"error: the spec file {path} must hold one JSON/YAML object", fg="red", err=True)
        raise typer.Exit(1)
    return doc


def _print_lift(client: Client, job_id: str) -> None:
    from helip.terminal import metrics_table

    ev = client.metrics(job_id).eval
    if ev:
        typer.echo(metrics_table(ev))


def _follow(client: Client, job_id: str, poll: float):  # noqa: ANN202
    """Wait for the job with a live line on stderr, warnings and errors printed above it; the finished job."""
    from helip.watch import LiveLine

    live, after = LiveLine(sys.stderr), None

    def show(job) -> None:  # noqa: ANN001
        nonlocal after
        for ev in client.events(job_id, after=after):
            after = ev.id
            if ev.level != "info" or ev.message.startswith("stage: "):
                live.note(f"[{ev.level}] {ev.message}")
        live(job)

    try:
        return client.wait(job_id, show, poll=poll)
    finally:
        live.close()


def _finish(client: Client, job) -> None:  # noqa: ANN001
    """Print the lift table of a succeeded job; a failed or cancelled one exits 1 with its error."""
    if job.status == "succeeded":
        _print_lift(client, job.id)
        return
    err = job.error
    detail = f" ({err.code}{f' [{err.param}]' if err.param else ''}): {err.message}" if err else ""
    typer.secho(f"job {job.id} {job.status}{detail}", fg="red", err=True)
    raise typer.Exit(1)


@app.command()
def submit(spec: Annotated[Path, typer.Argument(help="job spec file, JSON or YAML")],
           wait: Annotated[bool, typer.Option("--wait", help="follow the job to its end, then print the lift table")] = False,
           idempotency_key: Annotated[str | None, typer.Option(help="resubmitting with it returns the same job")] = None,
           poll: Annotated[float, typer.Option(help="seconds between polls with --wait", min=0.05)] = 1.0,
           api: Api = DEFAULT_API, api_key: ApiKey = None) -> None:
    """Submit a job; prints `job ID STATUS`. With --wait: a live line (stage, step, loss, ETA of the whole job)."""
    body = _load_spec(spec)
    with _client(api, api_key) as client:
        try:
            job = client.create(body, idempotency_key=idempotency_key)
            typer.echo(f"job {job.id} {job.status}")
            if wait:
                _finish(client, _follow(client, job.id, poll))
        except HelipAPIError as exc:
            _fail(exc)


@app.command("list")
def list_(status: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed, cancelling, cancelled")] = None,
          metadata: Annotated[list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE (repeatable)")] = None,
          limit: Annotated[int, typer.Option(help="at most this many jobs", min=1)] = 50,
          api: Api = DEFAULT_API, api_key: ApiKey = None) -> None:
    """The caller's jobs, newest first: id, status, stage, created, name."""
    pairs = {}
    for item in metadata or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--metadata")
        pairs[key] = value
    with _client(api, api_key) as client:
        try:
            for i, job in enumerate(client.list(status=status, metadata=pairs or None, page_size=min(limit, 100))):
                if i >= limit:
                    break
                name = job.name or ""
                typer.echo(f"{job.id}  {job.status:10s} {job.stage or '-':10s} {job.created_at:%Y-%m-%d %H:%M:%S}  {name}")
        except HelipAPIError as exc:
            _fail(exc)


@app.command()
def show(job_id: JobId, api: Api = DEFAULT_API, api_key: ApiKey = None) -> None:
    """The job as JSON: status, stage, progress, the resolved spec, the result or the error."""
    with _client(api, api_key) as client:
        try:
            _dump(client.get(job_id))
        except HelipAPIError as exc:
            _fail(exc)


@app.command()
def events(job_id: JobId, after: Annotated[int | None, typer.Option(help="only events after this id")] = None,
           follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the job ends")] = False,
           api: Api = DEFAULT_API, api_key: ApiKey = None) -> None:
    """The job's events: id, time, level, message."""
    with _client(api, api_key) as client:
        try:
            for ev in client.events(job_id, after=after, follow=follow):
                typer.echo(f"{ev.id}  {ev.created_at:%H:%M:%S}  {ev.level:7s} {ev.message}")
        except HelipAPIError as exc:
            _fail(exc)


@app.command()
def metrics(job_id: JobId, as_json: Annotated[bool, typer.Option("--json", help="every step and result as JSON")] = False,
            api: Api = DEFAULT_API, api_key: ApiKey = None) -> None:
    """The evaluation table (baseline, control, helip and the lift); --json for the training step series too."""
    with _client(api, api_key) as client:
        try:
            if as_json:
                _dump(client.metrics(job_id))
            else:
                _print_lift(client, job_id)
        except HelipAPIError as exc:
            _fail(exc)


@app.command()
def cancel(job_id: JobId, api: Api = DEFAULT_API, api_key: ApiKey = None) -> None:
    """Cancel a job (queued: at once; running: at the worker's next check)."""
    with _client(api, api_key) as client:
        try:
            typer.echo(f"job {job_id} {client.cancel(job_id).status}")
        except HelipAPIError as exc:
            _fail(exc)


@app.command()
def download(job_id: JobId, run: Annotated[str, typer.Option(help="helip, control or helip_selected")] = "helip",
             dest: Annotated[Path, typer.Option(help="file, or directory for RUN_final.pt")] = Path("."),
             api: Api = DEFAULT_API, api_key: ApiKey = None) -> None:
    """Download the final checkpoint of a run; verifies its sha256, resumes a cut transfer."""
    with _client(api, api_key) as client:
        try:
            typer.echo(str(client.download(job_id, run=run, dest=dest)))
        except HelipAPIError as exc:
            _fail(exc)


@app.command("wait")
def wait_(job_id: JobId, poll: Annotated[float, typer.Option(min=0.05)] = 1.0,
          api: Api = DEFAULT_API, api_key: ApiKey = None) -> None:
    """Follow a submitted job to its end with the live line, then print the lift table."""
    with _client(api, api_key) as client:
        try:
            _finish(client, _follow(client, job_id, poll))
        except HelipAPIError as exc:
            _fail(exc)
