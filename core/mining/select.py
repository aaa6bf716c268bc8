"""Top-k by threshold: emitted (row, column, score) triples kept in a buffer, cut to each row's k best.

The tie rule everywhere in mining: score descending, then the lower column index first. A row's
threshold is a lower bound of its final k-th score; a tile emits only the pairs at or above it, and
every cut of the buffer raises it to the k-th best score seen so far (a valid bound too: the final
k-th can only be higher). Everything stays on the device until `result`.
"""

from __future__ import annotations

import torch

LOWEST = torch.finfo(torch.float32).min  # "no bound yet": every finite score passes, -inf never does


def ordered_key(rows: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """int64 key whose ascending order is (row ascending, score descending) for fp32 scores."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into 0.0: they tie
    # Monotone int32 image of the floats: negative floats have their value bits flipped.
    mono = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    desc = (~mono).to(torch.int64) + 2**31  # in [0, 2^32), larger score -> smaller key
    return rows.to(torch.int64) * 2**32 + desc


def sort_triples(rows: torch.Tensor, cols: torch.Tensor, scores: torch.Tensor, *,
                 col_ordered: bool = False) -> torch.Tensor:
    """The permutation that orders triples by (row asc, score desc, column asc): two stable sorts, or
    one when each row's triples already come in increasing column order (`col_ordered`)."""
    if col_ordered:
        return torch.sort(ordered_key(rows, scores), stable=True).indices
    by_col = torch.sort(cols, stable=True).indices
    key = ordered_key(rows[by_col], scores[by_col])
    return by_col[torch.sort(key, stable=True).indices]


def rank_in_row(rows_sorted: torch.Tensor, n: int) -> torch.Tensor:
    """Position of each triple inside its row, for triples already grouped by row."""
    counts = torch.bincount(rows_sorted, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(rows_sorted.numel(), device=rows_sorted.device) - starts[rows_sorted]


class TopK:
    """Each row's k best (score, column) pairs over everything `add`ed, with per-row thresholds."""

    def __init__(self, n: int, k: int, device: torch.device, *, bound: torch.Tensor | None = None,
                 buffer: int | None = None, col_ordered: bool = False):
        """col_ordered: the caller promises that, per row, every `add` brings columns larger than all
        earlier ones for that row, in increasing order (then one sort suffices)."""
        self.n, self.k, self.device = n, k, device
        self.col_ordered = col_ordered
        self.threshold = bound.float().clone() if bound is not None else torch.full((n,), LOWEST, device=device)
        # Pairs held before a cut: as many as the kept lists, so memory stays near 2 n k pairs (12 bytes each).
        self.buffer = buffer or max(n * k, 1 << 20)
        self.index_dtype = torch.int32 if n < 2**31 else torch.int64
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.pending = 0
        self.emitted = 0
        self.cuts = 0

    def add(self, rows: torch.Tensor, cols: torch.Tensor, scores: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        self.parts.append((rows.to(self.index_dtype), cols.to(self.index_dtype), scores.float()))
        self.pending += rows.numel()
        self.emitted += rows.numel()
        if self.pending > self.buffer:
            self.cut()

    def cut(self) -> None:
        """Keep each row's k best, then raise the thresholds of the rows that hold k."""
        if not self.parts:
            empty = torch.zeros(0, dtype=self.index_dtype, device=self.device)
            self.parts = [(empty, empty, torch.zeros(0, device=self.device))]
        if self.cuts and not self.pending:
            return
        rows, cols, scores = (torch.cat(x) for x in zip(*self.parts, strict=True))
        self.parts = []
        order = sort_triples(rows, cols, scores, col_ordered=self.col_ordered)
        rows, cols, scores = rows[order], cols[order], scores[order]
        del order
        keep = rank_in_row(rows, self.n) < self.k
        rows, cols, scores = rows[keep], cols[keep], scores[keep]
        self.parts = [(rows, cols, scores)]
        self.pending = 0
        self.cuts += 1
        full = rank_in_row(rows, self.n) == self.k - 1
        self.threshold[rows[full]] = torch.maximum(self.threshold[rows[full]], scores[full])

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, k] columns (-1 pads) and fp32 scores (NaN pads), each row best first; still on the device."""
        self.cut()
        rows, cols, scores = self.parts[0]
        pos = rank_in_row(rows, self.n)
        idx = torch.full((self.n, self.k), -1, dtype=torch.int64, device=self.device)
        val = torch.full((self.n, self.k), float("nan"), dtype=torch.float32, device=self.device)
        idx[rows.long(), pos] = cols.long()
        val[rows.long(), pos] = scores
        return idx, val
