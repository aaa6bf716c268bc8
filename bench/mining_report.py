"""The mining benchmark's summary (ratios, exponents, met / not met per target), table and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import fit_exponent, table


def _by(doc: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in doc["rows"]:
        by.setdefault(r["method"], {})[r["n"]] = r
    return by


def _recall(r: dict[str, Any]) -> float | None:
    return r.get("recall_heldout", r.get("recall_vs_exact_all_rows", r.get("report", {}).get("recall_at_k")))


def summarise(doc: dict[str, Any]) -> None:
    """Growth exponents, exact at 1M along its trend when not measured, and each CPU target met or not."""
    by = _by(doc)
    doc["exponents"] = {m: fit_exponent(sorted(rs), [rs[n]["seconds"] for n in sorted(rs)]) for m, rs in by.items()}
    ref, ex, fa = by.get("reference", {}), by.get("exact", {}), by.get("fast", {})
    extrap: dict[str, Any] = {}
    b = doc["exponents"].get("exact", float("nan"))
    if ex and 1_000_000 not in ex and b == b:
        n0 = max(ex)
        extrap["exact_1m_seconds"] = ex[n0]["seconds"] * (1_000_000 / n0) ** b
        extrap["from"] = f"exact at N={n0:,} x (1M/N)^{b:.2f} (fitted over N={sorted(ex)})"
    doc["extrapolated"] = extrap
    met: dict[str, Any] = {}
    both = sorted(set(ref) & set(ex))
    if both:
        ratio = {n: ref[n]["seconds"] / ex[n]["seconds"] for n in both}
        met["reference_over_exact"] = ratio
        met["exact_never_slower_than_reference"] = all(x >= 1.0 for x in ratio.values())
        big = [n for n in both if n >= 100_000]
        met["exact_faster_from_100k"] = all(ratio[n] > 1.0 for n in big) if big else None
    exact_1m = ex[1_000_000]["seconds"] if 1_000_000 in ex else extrap.get("exact_1m_seconds")
    if 1_000_000 in fa and exact_1m:
        met["fast_1m_speedup_vs_exact"] = exact_1m / fa[1_000_000]["seconds"]
        met["fast_1m_20x"] = met["fast_1m_speedup_vs_exact"] >= 20
    if fa:
        rec = {n: _recall(fa[n]) for n in sorted(fa)}
        met["fast_recall"] = rec
        met["fast_recall_queries"] = {n: fa[n].get("recall_queries") for n in sorted(fa)}
        met["fast_recall_99"] = all(x is not None and x >= 0.99 for x in rec.values())
    if ex:
        n_max = max(n for n in ex if not ex[n].get("extrapolated")) if any(
            not r.get("extrapolated") for r in ex.values()) else None
        if n_max:
            met["exact_working_mib_at_largest_full_n"] = ex[n_max]["working_mib"]
            met["exact_never_nxn"] = ex[n_max]["working_mib"] < 0.5 * n_max * n_max * 4 / 2**20
    doc["met"] = met


def _verdict(ok: bool | None) -> str:
    return "n/a (not measured)" if ok is None else ("met" if ok else "NOT met")


def target_lines(doc: dict[str, Any]) -> list[str]:
    """The CPU targets, one line each with its figures and met / NOT met."""
    met = doc.get("met", {})
    ratio = met.get("reference_over_exact", {})
    figs = ", ".join(f"{int(n):,}: {r:.2f}x" for n, r in sorted(ratio.items(), key=lambda x: int(x[0])))
    rec = met.get("fast_recall", {})
    q = met.get("fast_recall_queries", {})
    recs = ", ".join(f"{int(n):,}: {r:.4f} ({q.get(n, '?')} q)" for n, r in sorted(rec.items(), key=lambda x: int(x[0]))
                     if r is not None)
    speed = met.get("fast_1m_speedup_vs_exact")
    rec_1m = rec.get(1_000_000, rec.get("1000000"))
    fast_ok = None if speed is None or rec_1m is None else bool(speed >= 20 and rec_1m >= 0.99)
    return [f"- exact at least as fast as brute force at every N (reference / exact: {figs or '-'}): "
            f"{_verdict(met.get('exact_never_slower_than_reference'))}",
            f"- exact faster than brute force from 100k on: {_verdict(met.get('exact_faster_from_100k'))}",
            f"- fast recall@50 >= 0.99 on held-out queries ({recs or '-'}): {_verdict(met.get('fast_recall_99'))}",
            "- fast at 1M >= 20x faster than exact, recall >= 0.99: "
            + ("-" if speed is None else f"{speed:.1f}x, recall {rec_1m}") + f": {_verdict(fast_ok)}"]


def print_report(doc: dict[str, Any]) -> None:
    rows = []
    for r in sorted(doc["rows"], key=lambda r: (r["n"], r["method"])):
        rep = r.get("report", {})
        rec = _recall(r)
        rows.append({"N": f"{r['n']:,}", "method": r["method"],
                     "CPU s": f"{r['seconds']:.1f}" + (" (est.)" if r.get("extrapolated") else ""),
                     "peak RSS MiB": r["rss_peak_mib"], "working MiB": r["working_mib"],
                     "recall@k": "-" if rec is None else f"{rec:.4f} ({r.get('recall_queries', '?')} q)",
                     "notes": r.get("mode") or rep.get("index") or ""})
    print(table(rows, ["N", "method", "CPU s", "peak RSS MiB", "working MiB", "recall@k", "notes"]))
    print("growth exponents:", {m: round(b, 2) for m, b in doc.get("exponents", {}).items()})
    print("extrapolated:", doc.get("extrapolated"))
    print("targets (CPU):\n" + "\n".join(target_lines(doc)))


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Time and working memory against N, log-log; estimated / extrapolated points hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"reference": ("tab:gray", "s"), "exact": ("tab:blue", "o"), "fast": ("tab:orange", "^")}
    for m, (color, marker) in styles.items():
        rs = sorted((r for r in doc["rows"] if r["method"] == m), key=lambda r: r["n"])
        if not rs:
            continue
        ns = [r["n"] for r in rs]
        b = doc.get("exponents", {}).get(m, float("nan"))
        ax_t.loglog(ns, [r["seconds"] for r in rs], marker=marker, color=color,
                    label=f"{m} (~N^{b:.2f})" if b == b else m)
        est = [r for r in rs if r.get("extrapolated")]
        if est:
            ax_t.loglog([r["n"] for r in est], [r["seconds"] for r in est], ls="none", marker=marker, ms=10,
                        mfc="white", color=color)
        full = [r for r in rs if not r.get("extrapolated")]
        if full:
            ax_m.loglog([r["n"] for r in full], [max(r["working_mib"], 1.0) for r in full], marker=marker,
                        color=color, label=m)
    all_n = sorted({r["n"] for r in doc["rows"]})
    if all_n:
        ax_m.loglog(all_n, [n * n * 4 / 2**20 for n in all_n], ls="--", color="black", lw=1,
                    label="one N x N fp32 matrix")
    ax_t.set_xlabel("pairs N")
    ax_t.set_ylabel("CPU seconds (one thread)")
    ax_t.set_title("mining time (hollow: estimated / extrapolated)")
    ax_t.legend(fontsize=8)
    ax_m.set_xlabel("pairs N")
    ax_m.set_ylabel("MiB above the embeddings")
    ax_m.set_title("working memory (peak RSS - data), full runs")
    ax_m.legend(fontsize=8)
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
