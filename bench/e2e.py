"""Item 4: a whole job on the synthetic world, per stage, through `helip run` and through the service.

The service path is `helip serve` + `helip worker` on embedded defaults (SQLite, the embedded broker,
file storage), the job submitted over HTTP and polled to the end, as helip/demo.py does. Its overhead
is the service's submit-to-finished wall time minus `helip run`'s wall time on the same spec; service
start-up is reported on its own (a service starts once, not per job).

    python -m bench.e2e                                    # CPU: 1,500 pairs, tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS, machine, table, write_json

STAGES = ("embedding", "mining", "training", "evaluating")


def prepare(data_dir: Path, *, n_train: int, pretrain_steps: int) -> tuple[Any, Path, dict[str, float]]:
    """The synthetic world and its pretrained base model, both cached under data_dir (same args, no work)."""
    from synthworld.pretrain import pretrain_base
    from synthworld.world import generate_world

    t0 = time.perf_counter()
    world = generate_world(data_dir / "datasets" / "world", n_train=n_train, n_retrieval=200, zeroshot_per_class=5,
                           probe_per_class=(5, 5), image_size=32, seed=0, shards=2)
    t1 = time.perf_counter()
    base = pretrain_base(world.train_csv, data_dir / "datasets" / "models" / "helip-tiny-vit.pt", steps=pretrain_steps,
                         batch_size=128, lr=1e-3, seed=0)
    return world, base, {"world_s": t1 - t0, "pretrain_s": time.perf_counter() - t1}


def job_spec(world: Any, base: Path, *, max_steps: int) -> dict[str, Any]:
    """A short HELIP job (no control run) with every evaluation of the world."""
    from synthworld.pretrain import TINY_CONFIG, TINY_NAME

    return {
        "model": {"name": TINY_NAME, "config": TINY_CONFIG, "pretrained": str(base)},
        "data": {"train": str(world.train_csv), "workers": 0},
        "mining": {"top_k": 50, "method": "exact"},
        "helip": {"hard_per_target": 3, "sample_from": 50, "gamma": 0.3},
        "train": {"epochs": 1, "max_steps": max_steps, "batch_size": 64, "lr": 3e-4, "warmup": 0.05, "seed": 0,
                  "checkpoint_every": 10**6, "log_every": 10},
        "eval": world.eval_spec(),
        "control": False,
    }


def _env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "HELIP_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    for var in ("HELIP_DATABASE_URL", "HELIP_BROKER_URL", "HELIP_STORAGE_URL", "HELIP_API_KEYS", "HELIP_ALLOWED_DATA"):
        env.pop(var, None)  # embedded defaults: no servers
    return env


def run_cli(spec: dict[str, Any], work: Path, env: dict[str, str]) -> dict[str, Any]:
    """`helip run` in its own process: wall time, and the per-stage timings run_job writes to summary.json."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    out = work / "out"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "helip.cli", "run", str(spec_path), "--out", str(out), "-q"],
                          env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"helip run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    timings = summary["timings"]
    return {"wall_s": wall, "stages_s": {k: timings.get(k) for k in STAGES}, "run_job_s": timings.get("total"),
            "outside_run_job_s": wall - timings.get("total", 0.0), "steps": summary.get("steps")}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def run_service(spec: dict[str, Any], data_dir: Path, env: dict[str, str], *, timeout: float) -> dict[str, Any]:
    """`helip serve` + `helip worker`, one job over HTTP, polled every 0.5 s to a terminal status."""
    import httpx

    from helip.demo import local_service

    port = _free_port()
    t0 = time.perf_counter()
    with local_service(env, data_dir / "logs", port, cwd=REPO, ready_seconds=120) as base_url:
        startup = time.perf_counter() - t0
        with httpx.Client(base_url=base_url, timeout=30) as client:
            t1 = time.perf_counter()
            resp = client.post("/jobs", json=spec)
            if resp.status_code not in (200, 201):
                raise RuntimeError(f"submission refused: {resp.status_code} {resp.text[:500]}")
            job_id = resp.json()["id"]
            while True:
                job = client.get(f"/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                if time.perf_counter() - t1 > timeout:
                    raise RuntimeError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
                time.sleep(0.5)
            wall = time.perf_counter() - t1
    if job["status"] != "succeeded":
        raise RuntimeError(f"job ended {job['status']}: {job.get('error')}")
    created, started, finished = (_ts(job.get(k)) for k in ("created_at", "started_at", "finished_at"))
    return {"startup_s": startup, "submit_to_done_wall_s": wall,
            "queue_wait_s": (started - created) if started and created else None,
            "worker_run_s": (finished - started) if finished and started else None, "job_id": job_id}


def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"benchmark": "e2e", "machine": machine("cpu"),
                           "config": {"n_train": args.n_train, "pretrain_steps": args.pretrain_steps,
                                      "max_steps": args.max_steps}}
    world, base, prep = prepare(data_dir, n_train=args.n_train, pretrain_steps=args.pretrain_steps)
    doc["prepare"] = prep
    spec = job_spec(world, base, max_steps=args.max_steps)
    env = _env(data_dir)
    stamp = str(int(time.time()))
    doc["helip_run"] = run_cli(spec, data_dir / "runs" / f"cli-{stamp}", env)
    write_json(args.out, doc)
    print(f"helip run: {doc['helip_run']['wall_s']:.1f} s", flush=True)
    if args.service:
        doc["service"] = run_service(spec, data_dir, env, timeout=args.timeout)
        svc, cli = doc["service"], doc["helip_run"]
        doc["overhead_s"] = svc["submit_to_done_wall_s"] - cli["wall_s"]
        doc["overhead_fraction"] = doc["overhead_s"] / cli["wall_s"]
        # `helip run` pays a cold process start (imports) that a running worker has already paid:
        # against run_job alone, the difference is the API, the queue and the worker's bookkeeping.
        doc["overhead_vs_run_job_s"] = svc["submit_to_done_wall_s"] - cli["run_job_s"]
        print(f"service: {svc['submit_to_done_wall_s']:.1f} s (start-up {svc['startup_s']:.1f} s)", flush=True)
    write_json(args.out, doc)
    return doc


def print_report(doc: dict[str, Any]) -> None:
    cli = doc["helip_run"]
    rows = [{"stage": s, "seconds": cli["stages_s"].get(s)} for s in STAGES]
    rows.append({"stage": "run_job total", "seconds": cli["run_job_s"]})
    rows.append({"stage": "`helip run` process (wall)", "seconds": cli["wall_s"]})
    if "service" in doc:
        svc = doc["service"]
        rows += [{"stage": "service: submit to succeeded (wall)", "seconds": svc["submit_to_done_wall_s"]},
                 {"stage": "service: queue wait (created -> started)", "seconds": svc["queue_wait_s"]},
                 {"stage": "service overhead vs `helip run`", "seconds": doc["overhead_s"]},
                 {"stage": "service overhead vs run_job alone", "seconds": doc.get("overhead_vs_run_job_s")},
                 {"stage": "service start-up (once)", "seconds": svc["startup_s"]}]
    print(table(rows, ["stage", "seconds"]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/helip-bench-e2e"))
    p.add_argument("--n-train", type=int, default=1500)
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--no-service", dest="service", action="store_false")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--out", type=Path, default=RESULTS / "e2e_cpu.json")
    args = p.parse_args(argv)
    doc = run(args)
    print_report(doc)
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
