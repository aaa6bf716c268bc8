"""Shared benchmark plumbing: machine facts, timers, peak memory in a fresh process, JSON results and tables."""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
IMG = REPO / "docs" / "img"
_MARK = "@@BENCH-RESULT@@"


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the figures were measured on: written into every result file."""
    import torch

    info: dict[str, Any] = {
        "date": now_iso(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except ImportError:
        info["open_clip"] = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def sync(device: Any) -> None:
    """Wait for queued GPU work, so that a wall-clock timer measures the work and not its launch."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any = "cpu") -> tuple[float, Any]:
    wall, _, out = timed_both(fn, device)
    return wall, out


def timed_both(fn: Callable[[], Any], device: Any = "cpu") -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result).

    On a shared CPU box the wall time of a single-threaded run grows with everyone else's load; the
    process's CPU time does not, so CPU-side ratios and growth exponents are taken from it.
    """
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles (the spread reported next to a median)."""
    if len(xs) < 2:
        x = xs[0] if xs else float("nan")
        return float(x), float(x)
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return float(q[0]), float(q[2])


def _proc_status_mib(field: str) -> float | None:
    """A kB field of /proc/self/status (VmHWM, VmRSS) in MiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark, from /proc's VmHWM where there is one.

    Not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a fresh process started by a large
    parent (a long pytest session) reports the parent's peak until it grows past it."""
    peak = _proc_status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    rss = _proc_status_mib("VmRSS")
    return rss if rss is not None else float("nan")


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Atomic write: a benchmark killed mid-way never leaves a half-written result file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table (also readable in a terminal) of the given columns."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "-"
            if abs(v) >= 1000:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.3g}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def isolated(target: str, *, timeout: float = 3600, env: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run `module:function(**kwargs)` in a fresh Python process and return its dict result.

    A fresh process is the only way to read one measurement's peak memory on CPU: the RSS high-water
    mark never goes down within a process, and tracemalloc does not see torch's allocations. The
    result gains `rss_base_mib` (after imports, before the call) and `rss_peak_mib`.
    """
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), child_env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "bench.common", target, json.dumps(kwargs)], env=child_env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    raise RuntimeError(f"{target} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _child(target: str, kwargs_json: str) -> None:
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = current_rss_mib()
    out = fn(**json.loads(kwargs_json))
    out = {**out, "rss_base_mib": round(base, 1), "rss_peak_mib": round(peak_rss_mib(), 1)}
    print(_MARK + json.dumps(out, default=_jsonable), flush=True)


def fit_exponent(ns: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log n: the b of y ~ n^b."""
    import math

    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys, strict=True) if n > 0 and y and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else float("nan")


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
