"""`helip demo`: the whole service on embedded defaults, used like any client would use it over HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from api.schemas import JobPublic
from helip.client import Client, HelipAPIError
from helip.terminal import TerminalReporter, metrics_table
from helip.watch import LiveLine

# Sized to show what the controlled experiment (docs/results.md) measured. HELIP's zero-shot gain needs a base
# whose image tower already half-sees shape, and grows with the fine-tuning: so the experiment's world (8,000
# pairs) and base recipe (its 8.1M-parameter `tiny-rn16`, pretrained 1,000 steps), and 400 steps at lr 5e-4 per
# run (1.6 epochs of targets; the experiment runs 500 at 3e-4). The first run takes about 17 minutes on 2 idle
# CPU cores (8 of them the base's pretraining, cached for later runs): over the 10 minutes the previous demo fit,
# which (5,000 pairs, a 500-step base, 156 steps at 3e-4) showed HELIP ahead on retrieval but level with the
# control on zero-shot acc1. 200 zero-shot images a class (9,600), so that the zero-shot number is not noise: the
# standard error of acc1 there is 0.005, and HELIP led the control by 0.0165 to 0.023 on it (README, the demo's
# table). lr 5e-4 rather than the experiment's 3e-4: the same job at 3e-4 (seed 0) gave +0.020, at lower accuracy
# for both.
DEMO_NAME = "helip-demo-rn16"
DEMO_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
DEMO_WORLD = {"n_train": 8000, "zeroshot_per_class": 200, "image_size": 32, "seed": 0}
DEMO_PRETRAIN = {"steps": 1000, "batch_size": 128, "lr": 1e-3, "seed": 0, "workers": 1,
                 "config": DEMO_CONFIG, "name": DEMO_NAME}


def demo_spec(world, base: Path, seed: int = 0) -> dict[str, Any]:
    """The job the demo submits: HELIP with 3 hard pairs per target, the plain control of equal length, and the
    forgetting guard (WiSE-FT at alpha 0.5 too; the best mean of the eval metrics that keeps zero-shot acc1
    within 0.01 of the input model). Zero-shot and retrieval only: the table shows no linear probe, and each of
    the job's six evaluations would fit one. `seed` is train.seed (the demo runs 0; other seeds check the effect)."""
    return {
        "model": {"name": DEMO_NAME, "config": DEMO_CONFIG, "pretrained": str(base)},
        "data": {"train": str(world.train_csv), "workers": 1},
        "mining": {"top_k": 50, "method": "exact"},
        "helip": {"hard_per_target": 3, "sample_from": 50, "gamma": 0.3},
        "train": {"epochs": 1.6, "batch_size": 128, "lr": 5e-4, "warmup": 0.05, "seed": seed, "checkpoint_every": 50},
        "eval": {**world.eval_spec(), "linear_probe": []},
        "control": True,
        "guard": {"wise_alphas": [0.5], "protect": {"shapes/acc1": 0.01}},
    }


def _say(msg: str) -> None:
    print(msg, flush=True)


def wait_http(url: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    """Wait until `url` answers 200, failing early when `proc` (the server) exits."""
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the API process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


@contextlib.contextmanager
def local_service(env: dict[str, str], logs: Path, port: int, *, cwd: Path | None = None,
                  ready_seconds: float = 60) -> Iterator[str]:
    """`helip serve` and one `helip worker` as subprocesses (logs under `logs`); yields the API's base URL
    once /healthz answers, and stops both (SIGTERM, then SIGKILL) on the way out."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        with open(logs / "api.log", "w") as api_log, open(logs / "worker.log", "w") as worker_log:
            procs.append(subprocess.Popen([sys.executable, "-m", "helip.cli", "serve", "--port", str(port)],
                                          env=env, stdout=api_log, stderr=subprocess.STDOUT, cwd=cwd))
            procs.append(subprocess.Popen([sys.executable, "-m", "helip.cli", "worker", "--concurrency", "1",
                                           "--loglevel", "warning"], env=env, stdout=worker_log,
                                          stderr=subprocess.STDOUT, cwd=cwd))
        base_url = f"http://127.0.0.1:{port}"
        wait_http(base_url + "/healthz", procs[0], seconds=ready_seconds)
        yield base_url
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _poll(client: Client, job_id: str) -> JobPublic:
    """Show stage, step, loss and the whole job's ETA until the job ends (notable events above); return it."""
    live, after = LiveLine(sys.stdout), None

    def show(job: JobPublic) -> None:
        nonlocal after
        for ev in client.events(job_id, after=after):
            after = ev.id
            if ev.level in ("warning", "error") or ev.message.startswith(("mined", "embedded", "helip:", "control:")):
                live.note(f"  [{ev.level}] {ev.message}")
        live(job)

    try:
        return client.wait(job_id, show)
    finally:
        live.close()


def run_demo(*, port: int, data_dir: Path) -> int:
    from synthworld.pretrain import pretrain_base
    from synthworld.world import generate_world

    t0 = time.time()
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HELIP_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for var in ("HELIP_DATABASE_URL", "HELIP_BROKER_URL", "HELIP_STORAGE_URL", "HELIP_API_KEYS"):
        env.pop(var, None)  # embedded defaults: no servers needed
    os.environ.update({k: v for k, v in env.items() if k.startswith(("HELIP_", "HF_", "OMP_"))})

    _say(f"helip demo: embedded database, broker and storage under {data_dir}")
    _say("1/4 synthetic world (cached after the first run)")
    # Under datasets/: the one folder of the data directory that jobs may read (the rest is service state).
    world = generate_world(data_dir / "datasets" / "world", **DEMO_WORLD)
    _say(f"    {world.root}: {DEMO_WORLD['n_train']} training pairs, {len(world.classnames)} zero-shot classes")
    _say("2/4 base CLIP pretrained on it (cached after the first run)")
    t1 = time.time()
    with TerminalReporter() as bars:
        base = pretrain_base(world.train_csv, data_dir / "datasets" / "models" / f"{DEMO_NAME}.pt", reporter=bars,
                             **DEMO_PRETRAIN)
    _say(f"    {base} ({time.time() - t1:.0f}s)")

    _say("3/4 starting the API and a worker")
    logs = data_dir / "logs"
    with local_service(env, logs, port) as base_url:
        _say(f"    API {base_url} (logs in {logs})")
        client = Client(base_url, timeout=30)
        spec = demo_spec(world, base)
        try:
            job = client.create(spec)
        except HelipAPIError as exc:
            _say(f"submission refused: {exc}")
            return 1
        _say(f"4/4 job {job.id} submitted: HELIP (3 hard pairs per target) and a plain fine-tune of equal length")
        job = _poll(client, job.id)
        if job.status != "succeeded":
            _say(f"job ended {job.status}: {job.error.model_dump_json() if job.error else None}")
            return 1
        metrics = client.metrics(job.id).eval
        _say("\n" + metrics_table(metrics, keys=("acc1", "image_retrieval_recall@1", "image_retrieval_recall@5",
                                                    "text_retrieval_recall@1", "text_retrieval_recall@5")))
        final = [c for c in client.checkpoints(job.id) if c.final and c.run == "helip"]
        pairs = client.http.get(f"/jobs/{job.id}/hard-pairs").json()
        store = data_dir / "store" / "jobs" / job.id
        _say("")
        _say(f"boosted checkpoint: {store / 'checkpoints' / 'helip_final.pt'}")
        if final:
            _say(f"                    {final[-1].url}")
        _say(f"mined hard pairs:   {store / 'hard_pairs.parquet'}")
        _say(f"                    {pairs['url']}")
        _say(f"metrics:            {store / 'metrics.json'}")
        _say(f"job:                {base_url}/jobs/{job.id}")
        _say(f"API docs:           {base_url}/docs")
        _say(f"dashboard:          {base_url}/ui/#/jobs/{job.id} (hard pairs: .../hard-pairs)")
        _say(f"demo took {time.time() - t0:.0f}s. The API stops with the demo; to see the job in the dashboard "
             f"again: HELIP_DATA_DIR={data_dir} helip serve --port {port}")
        _say(f"then open {base_url}/ui/#/jobs/{job.id}")
        return 0
