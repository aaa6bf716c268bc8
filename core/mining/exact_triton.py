"""Exact mining's fused tile kernel (Triton, CUDA): both products, the filters, the clamp, the product
score, the bound test and the emission of passing pairs in one kernel, so no [rows, N] block is ever
written. Tested against the torch path in Triton's interpreter (TRITON_INTERPRET=1) on CPU.
"""

from __future__ import annotations

import torch

from core.mining.scores import Filters
from core.mining.select import TopK

try:  # Triton ships with CUDA builds of torch; without it the torch path is used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BM, BN, BK = 64, 64, 32


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _emit(hit, rows, cols, s, counter, out_rows, out_cols, out_vals, cap, BM: tl.constexpr, BN: tl.constexpr):
        """Append the tile's passing pairs: one atomic reserves their slots, a prefix sum places them."""
        flat = tl.reshape(hit, [BM * BN])
        total = tl.sum(flat, axis=0)
        if total > 0:
            base = tl.atomic_add(counter, total)
            pos = base + tl.cumsum(flat, axis=0) - flat
            ok = (flat > 0) & (pos < cap)
            rr = tl.reshape(tl.broadcast_to(rows[:, None], [BM, BN]), [BM * BN])
            cc = tl.reshape(tl.broadcast_to(cols[None, :], [BM, BN]), [BM * BN])
            tl.store(out_rows + pos, rr.to(tl.int64), mask=ok)
            tl.store(out_cols + pos, cc.to(tl.int64), mask=ok)
            tl.store(out_vals + pos, tl.reshape(s, [BM * BN]), mask=ok)

    @triton.jit
    def _tile_kernel(T, V, thr, n, d, a, b, counter, counts, out_rows, out_cols, out_vals, cap,
                     same_thr, dup_thr, CLAMP: tl.constexpr, IEEE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_n = tl.program_id(0)  # columns on the axis without CUDA's 65,535 limit
        pid_m = tl.program_id(1)
        r0 = a + pid_m * BM
        c0 = a + pid_n * BN
        if c0 + BN - 1 > r0:  # a tile wholly on or below the diagonal holds no pair j > i
            rows = r0 + tl.arange(0, BM)
            cols = c0 + tl.arange(0, BN)
            rmask = rows < b
            cmask = cols < n
            acc_t = tl.zeros((BM, BN), dtype=tl.float32)
            acc_v = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, d, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < d
                qm = rmask[:, None] & kmask[None, :]
                cm = kmask[:, None] & cmask[None, :]
                tq = tl.load(T + rows[:, None] * d + ks[None, :], mask=qm, other=0.0)
                tc = tl.load(T + cols[None, :] * d + ks[:, None], mask=cm, other=0.0)
                vq = tl.load(V + rows[:, None] * d + ks[None, :], mask=qm, other=0.0)
                vc = tl.load(V + cols[None, :] * d + ks[:, None], mask=cm, other=0.0)
                if IEEE:
                    acc_t += tl.dot(tq, tc, input_precision="ieee")
                    acc_v += tl.dot(vq, vc, input_precision="ieee")
                else:
                    acc_t += tl.dot(tq, tc)
                    acc_v += tl.dot(vq, vc)
            pair = rmask[:, None] & cmask[None, :] & (cols[None, :] > rows[:, None])
            same = acc_t > same_thr
            t_dup = acc_t > dup_thr
            v_dup = acc_v > dup_thr
            t2 = tl.where(t_dup, 0.0, acc_t)
            v2 = tl.where(v_dup, 0.0, acc_v)
            if CLAMP:
                t2 = tl.maximum(t2, 0.0)
                v2 = tl.maximum(v2, 0.0)
            s = t2 * v2
            keep = pair & ~same
            tl.atomic_add(counts, tl.sum(tl.sum((pair & same).to(tl.int64), axis=1), axis=0))
            tl.atomic_add(counts + 1, tl.sum(tl.sum((keep & (t_dup | v_dup)).to(tl.int64), axis=1), axis=0))
            thr_r = tl.load(thr + rows, mask=rmask, other=float("inf"))
            thr_c = tl.load(thr + cols, mask=cmask, other=float("inf"))
            hit_r = (keep & (s >= thr_r[:, None])).to(tl.int32)
            hit_c = (keep & (s >= thr_c[None, :])).to(tl.int32)
            _emit(hit_r, rows, cols, s, counter, out_rows, out_cols, out_vals, cap, BM, BN)
            # the same pairs for the column's row: (j, i), its score identical by construction
            _emit(tl.trans(hit_c), cols, rows, tl.trans(s), counter, out_rows, out_cols, out_vals, cap, BN, BM)


def stripe(t: torch.Tensor, v: torch.Tensor, a: int, b: int, f: Filters, sel: TopK, counts: list) -> None:
    """Rows [a, b) against every column j > i in one launch; the passing pairs go to `sel`."""
    n, d = t.shape
    dev = t.device
    cap = max(1 << 16, 4 * (b - a) * sel.k)
    grid = (triton.cdiv(n - a, BN), triton.cdiv(b - a, BM))
    while True:
        counter = torch.zeros(1, dtype=torch.int64, device=dev)
        tile_counts = torch.zeros(2, dtype=torch.int64, device=dev)
        rows = torch.empty(cap, dtype=torch.int64, device=dev)
        cols = torch.empty(cap, dtype=torch.int64, device=dev)
        vals = torch.empty(cap, dtype=torch.float32, device=dev)
        _tile_kernel[grid](t, v, sel.threshold, n, d, a, b, counter, tile_counts, rows, cols, vals, cap,
                           float(f.same), float(f.dup), CLAMP=f.clamp, IEEE=t.dtype == torch.float32,
                           BM=BM, BN=BN, BK=BK)
        used = int(counter.item())
        if used <= cap:
            break
        cap = used  # the buffer was too small: run the stripe again with room for every pair
    counts[0] += int(tile_counts[0])
    counts[1] += int(tile_counts[1])
    sel.add(rows[:used], cols[:used], vals[:used])
