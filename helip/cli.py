"""The `helip` command: run or mine a job locally, serve the API, start a worker, the demo, the synthetic world."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from helip.cli_jobs import app as jobs_app
from helip.entry import configure_process

configure_process()  # the CLI is an entry point: offline hub, quiet random-init warning

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="helip: boost a trained CLIP model with hard pairs mined from its own data (HELIP).")
app.add_typer(jobs_app, name="jobs",
              help="Drive a running helip API: submit, wait, list, show, events, metrics, cancel, download.")


def _fail(exc: Exception) -> None:
    """One domain exception becomes a clear message and exit code 1 at the edge."""
    code, param = getattr(exc, "code", "error"), getattr(exc, "param", None)
    where = f" [{param}]" if param else ""
    typer.secho(f"error ({code}){where}: {getattr(exc, 'message', str(exc))}", fg="red", err=True)
    raise typer.Exit(1)


def _core_options() -> dict:
    """What core.pipeline.run_job takes from the settings (HELIP_CPU_PROCESSES, HELIP_WEIGHTS_CACHE)."""
    from helip.settings import get_settings

    settings = get_settings()
    return {"cpu_processes": settings.cpu_processes, "weights_cache": settings.weights_cache}


@app.command()
def run(spec: Path = typer.Argument(..., help="job spec, JSON or YAML (docs/spec.md)"),
        out: Path = typer.Option(..., "--out", help="output directory (re-running resumes from it)"),
        device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: first GPU, else CPU)"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars")) -> None:
    """Run a whole job locally: embed, mine, fine-tune, evaluate. Writes metrics.json, hard_pairs.parquet,
    checkpoints/*.pt under OUT."""
    from core.errors import HelipError
    from core.pipeline import run_job
    from core.spec import load_spec_file
    from helip.terminal import TerminalReporter, print_metrics

    try:
        job = load_spec_file(spec)
        with TerminalReporter(quiet=quiet) as rep:
            res = run_job(job, out, reporter=rep, device=device, **_core_options())
    except HelipError as exc:
        _fail(exc)
    print_metrics(res.metrics)
    typer.echo(f"\nmetrics: {out / 'metrics.json'}\nhard pairs: {res.artifacts['hard_pairs']}")
    for k, v in res.artifacts.items():
        if k.startswith("checkpoint:"):
            typer.echo(f"{k.split(':')[1]} checkpoint: {v}")


@app.command()
def mine(spec: Path | None = typer.Argument(None, help="job spec, JSON or YAML: embed its data, then mine"),
         out: Path = typer.Option(..., "--out", help="output directory"),
         embeddings: Path | None = typer.Option(
             None, "--embeddings", help=".npz with `text` and `image` arrays [N, d] (float16/float32) and optional "
             "`keys`: mine these precomputed embeddings instead (rows are L2-normalised first)"),
         method: str | None = typer.Option(None, "--method", help="exact | fast (overrides the spec)"),
         top_k: int | None = typer.Option(None, "--top-k", help="hard pairs per row (overrides the spec)"),
         spec_file: Path | None = typer.Option(
             None, "--spec", help="with --embeddings: mining options from a spec file (its `mining` section, or a "
             "file that is only that section)"),
         device: str | None = typer.Option(None), quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
    """Only mine: writes OUT/hard_pairs.parquet. Either embed a job spec's data (SPEC) or mine precomputed
    embeddings (--embeddings FILE)."""
    from core.errors import HelipError, SpecError

    try:
        if (spec is None) == (embeddings is None):
            raise SpecError("give either a job spec (SPEC) or --embeddings FILE, not both", param=None)
        if embeddings is None and (method or top_k or spec_file):
            raise SpecError("--method, --top-k and --spec go with --embeddings; for a job spec set them in it",
                            param=None)
        if embeddings is not None:
            _mine_embeddings(embeddings, out, method=method, top_k=top_k, spec_file=spec_file, device=device,
                             quiet=quiet)
            return
        from core.pipeline import run_job
        from core.spec import load_spec_file
        from helip.terminal import TerminalReporter

        job = load_spec_file(spec)
        with TerminalReporter(quiet=quiet) as rep:
            res = run_job(job, out, reporter=rep, device=device, mine_only=True, **_core_options())
    except HelipError as exc:
        _fail(exc)
    typer.echo(json.dumps(res.summary["mining"], indent=1, default=str))
    typer.echo(f"hard pairs: {res.artifacts['hard_pairs']}")


def _mine_embeddings(path: Path, out: Path, *, method: str | None, top_k: int | None,
                     spec_file: Path | None, device: str | None, quiet: bool) -> None:
    from core.mining.embeddings import mine_embeddings_file, mining_options
    from core.train import pick_device
    from helip.terminal import TerminalReporter

    options = mining_options(spec_file, method=method, top_k=top_k)
    with TerminalReporter(quiet=quiet) as rep:
        mined, dest = mine_embeddings_file(path, out, options, device=pick_device(device),
                                           progress=lambda done, total: rep.progress("mining", done, total))
    typer.echo(json.dumps(mined.report, indent=1, default=str))
    typer.echo(f"hard pairs: {dest}")


@app.command()
def synth(out: Path = typer.Argument(..., help="directory of the synthetic world"),
          n_train: int = typer.Option(12_000, help="training pairs"),
          image_size: int = typer.Option(32), seed: int = typer.Option(0)) -> None:
    """Generate the synthetic image-caption world (train CSV + shards, zero-shot, retrieval, probe splits)."""
    from synthworld.world import generate_world

    world = generate_world(out, n_train=n_train, image_size=image_size, seed=seed)
    typer.echo(json.dumps({k: str(v) for k, v in vars(world).items() if k not in ("classnames", "templates")},
                          indent=1))


@app.command()
def pretrain(world: Path = typer.Argument(..., help="a synthetic world directory (helip synth)"),
             out: Path = typer.Option(..., "--out", help="where the base checkpoint goes"),
             steps: int = typer.Option(1500), batch_size: int = typer.Option(128), lr: float = typer.Option(1e-3),
             seed: int = typer.Option(0), device: str | None = typer.Option(None)) -> None:
    """Pretrain the small base CLIP on a synthetic world (the model HELIP then boosts)."""
    from helip.terminal import TerminalReporter
    from synthworld.pretrain import pretrain_base
    from synthworld.world import load_world

    w = load_world(world)
    with TerminalReporter() as rep:
        path = pretrain_base(w.train_csv, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                             device=device, reporter=rep)
    typer.echo(f"base checkpoint: {path}")


@app.command()
def serve(host: str = typer.Option("127.0.0.1", envvar="HELIP_HOST"),
          port: int = typer.Option(8000, envvar="HELIP_PORT"),
          workers: int = typer.Option(1, help="uvicorn worker processes")) -> None:
    """The REST API (OpenAPI docs at /docs)."""
    import uvicorn

    uvicorn.run("api.main:create_app", factory=True, host=host, port=port, workers=workers, log_level="info")


@app.command()
def worker(concurrency: int = typer.Option(1, help="jobs at once: one per GPU"),
           queues: str | None = typer.Option(None, help="comma-separated Celery queues"),
           loglevel: str = typer.Option("info")) -> None:
    """A Celery worker that runs jobs (one per GPU)."""
    from worker.celery_app import worker_argv

    argv = worker_argv(concurrency=concurrency, queues=queues, loglevel=loglevel)
    os.execv(sys.executable, [sys.executable, "-m", "celery", *argv])


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (alembic upgrade head)."""
    from helip.db import upgrade_database
    from helip.settings import get_settings

    upgrade_database(get_settings())
    typer.echo("database at head")


@app.command()
def reap() -> None:
    """Re-queue or fail running jobs whose worker stopped sending heartbeats."""
    from helip.settings import get_settings
    from worker.reaper import reap_stale_jobs

    typer.echo(json.dumps(reap_stale_jobs(get_settings()), default=str))


@app.command()
def demo(port: int = typer.Option(8765, help="API port"),
         data_dir: Path = typer.Option(Path(".helip"), envvar="HELIP_DATA_DIR")) -> None:
    """End-to-end demo on embedded defaults: API + worker, synthetic world, base model, a HELIP job over HTTP."""
    from helip.demo import run_demo

    raise typer.Exit(run_demo(port=port, data_dir=data_dir))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
