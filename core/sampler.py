"""Batches with hard pairs (HELIP section 2): the DDP-aware batch sampler and the mask of hard pairs it lays out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from core.errors import DataError, SpecError

# Random fills first try this many draws that avoid a caption already in the batch, then give up on captions.
_FILL_TRIES = 64


class HardPairBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches laid out as [t0, h0_1 .. h0_h, t1, h1_1, ...] (training-set rows).

    Rules, all deterministic in (seed, epoch, batch index):
    - Every epoch the valid rows are shuffled identically on every rank and cut into chunks of
      world_size * targets_per_batch targets (the last incomplete chunk is dropped); rank r gets the
      targets [r*T, (r+1)*T) of each chunk, so each row is a target at most once per epoch.
    - "The batch" is the global batch (the whole chunk, all ranks): every rank builds all of it and
      keeps its slice. So ranks never share a row, and world_size=2 yields exactly the halves of
      world_size=1 with 2 x targets_per_batch.
    - All of the chunk's targets are placed before any hard pair is drawn: a neighbour that is one of
      them counts as already in the batch, so a row is never both a hard pair and a later target.
    - Hard pairs are drawn uniformly without replacement from a target's first sample_from
      neighbours (-1 and invalid rows ignored), skipping rows already in the batch (skipped_in_batch)
      and, with dedupe_captions and captions given, rows whose caption (stripped, lower-cased) is
      already in the batch (skipped_same_caption). When a target runs out, random valid rows not in
      the batch fill its group (filled_random). stats count this rank's groups only.
    - hard_per_target == 0 is a plain shuffled batch sampler with the same slicing (the control run).
    """

    def __init__(
        self,
        neighbors: np.ndarray,
        *,
        targets_per_batch: int,
        hard_per_target: int,
        sample_from: int = 50,
        valid: np.ndarray | None = None,
        captions: Sequence[str] | None = None,
        dedupe_captions: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        neighbors = np.asarray(neighbors)
        if neighbors.ndim != 2:
            raise DataError(f"neighbors must be [N, k], got shape {neighbors.shape}")
        if targets_per_batch < 1:
            raise SpecError(f"targets per batch must be at least 1, got {targets_per_batch}", param="train.batch_size")
        if hard_per_target < 0:
            raise SpecError(f"helip.hard_per_target must be >= 0, got {hard_per_target}", param="helip.hard_per_target")
        if sample_from < 1:
            raise SpecError(f"helip.sample_from must be >= 1, got {sample_from}", param="helip.sample_from")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        n = neighbors.shape[0]
        self.valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        if self.valid.shape != (n,):
            raise DataError(f"valid must have length {n}, got shape {self.valid.shape}")
        self.neighbors = neighbors[:, :sample_from].astype(np.int64)
        self.valid_rows = np.flatnonzero(self.valid).astype(np.int64)
        self.targets_per_batch = int(targets_per_batch)
        self.hard_per_target = int(hard_per_target)
        self.group_size = 1 + self.hard_per_target
        self.sample_from = int(sample_from)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.chunk = self.world_size * self.targets_per_batch
        if len(self.valid_rows) < self.chunk * self.group_size:
            raise DataError(
                f"{len(self.valid_rows)} valid training pairs cannot fill one global batch of "
                f"{self.chunk * self.group_size}", param="train.batch_size",
            )
        self.caption_ids: np.ndarray | None = None
        if captions is not None and dedupe_captions:
            if len(captions) != n:
                raise DataError(f"{len(captions)} captions for {n} rows")
            ids: dict[str, int] = {}
            self.caption_ids = np.array([ids.setdefault(str(c).strip().lower(), len(ids)) for c in captions])
        self.batches_per_epoch = len(self.valid_rows) // self.chunk
        self.epoch = 0
        self.start_batch = 0
        self.stats: dict[str, int] = _zero_stats()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's shuffle; start_batch > 0 resumes mid-epoch (the earlier batches are skipped)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch: batches_per_epoch, less start_batch when resuming."""
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        self.stats = _zero_stats()
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.valid_rows)
        mine = slice(self.rank * self.targets_per_batch, (self.rank + 1) * self.targets_per_batch)
        for b in range(self.start_batch, self.batches_per_epoch):
            targets = order[b * self.chunk:(b + 1) * self.chunk]
            # Each batch has its own generator, so that resuming at batch b needs no replay of 0..b-1.
            rng = np.random.default_rng([self.seed, self.epoch, b])
            groups = self._global_batch(targets, rng)
            self.stats["batches"] += 1
            yield [row for group in groups[mine] for row in group]

    def _global_batch(self, targets: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        in_batch = set(targets.tolist())
        captions = self.caption_ids
        caps_in = set(captions[targets].tolist()) if captions is not None else set()
        groups = []
        for position, target in enumerate(targets.tolist()):
            counts = self.stats if position // self.targets_per_batch == self.rank else _zero_stats()
            group = [target]
            if self.hard_per_target:
                cands = self.neighbors[target]
                cands = cands[cands >= 0]
                cands = cands[self.valid[cands]].tolist()
                for pick in rng.permutation(len(cands)).tolist():
                    if len(group) == self.group_size:
                        break
                    row = cands[pick]
                    if row in in_batch:
                        counts["skipped_in_batch"] += 1
                    elif captions is not None and captions[row] in caps_in:
                        counts["skipped_same_caption"] += 1
                    else:
                        self._place(row, group, in_batch, caps_in)
                while len(group) < self.group_size:
                    self._place(self._random_fill(in_batch, caps_in, rng), group, in_batch, caps_in)
                    counts["filled_random"] += 1
            groups.append(group)
        return groups

    def _place(self, row: int, group: list[int], in_batch: set[int], caps_in: set[int]) -> None:
        group.append(row)
        in_batch.add(row)
        if self.caption_ids is not None:
            caps_in.add(int(self.caption_ids[row]))

    def _random_fill(self, taken: set[int], caps_in: set[int], rng: np.random.Generator) -> int:
        for _ in range(_FILL_TRIES):
            row = int(self.valid_rows[rng.integers(len(self.valid_rows))])
            if row not in taken and (self.caption_ids is None or int(self.caption_ids[row]) not in caps_in):
                return row
        # Nearly everything is taken: draw from what is left, captions or not (the batch always fits,
        # see the check in __init__).
        left = np.setdiff1d(self.valid_rows, np.fromiter(taken, dtype=np.int64), assume_unique=True)
        return int(left[rng.integers(len(left))])


def _zero_stats() -> dict[str, int]:
    return {"skipped_in_batch": 0, "skipped_same_caption": 0, "filled_random": 0, "batches": 0}


def hard_pair_mask(rows: torch.Tensor, neighbors: np.ndarray | torch.Tensor, group_size: int,
                   sample_from: int) -> torch.Tensor:
    """bool [B, B]: mask[i, j] when i is a target position (i % group_size == 0), j is later in its group
    and rows[j] is among the first sample_from neighbours of rows[i]. Random fills are therefore not hard.

    Built where `rows` is: pass `neighbors` as a tensor already on that device (see `mask_table`) and no
    byte crosses to the host (no wait on the GPU in the training step)."""
    batch = rows.shape[0]
    if group_size < 1 or batch % group_size:
        raise ValueError(f"a batch of {batch} rows is not made of groups of {group_size}")
    dev = rows.device
    mask = torch.zeros(batch, batch, dtype=torch.bool, device=dev)
    if group_size == 1 or batch == 0:
        return mask
    table = mask_table(neighbors, sample_from, dev)
    members = rows.detach().to(torch.int64).view(-1, group_size)  # [groups, group_size], target first
    lists = table[members[:, 0]]  # [groups, sample_from]
    hard = (members[:, 1:, None] == lists[:, None, :]).any(dim=-1)  # [groups, group_size - 1]
    targets = torch.arange(0, batch, group_size, device=dev)
    cols = targets[:, None] + torch.arange(1, group_size, device=dev)[None, :]
    # scatter, not boolean indexing: indexing by a mask needs its count on the host
    mask.view(-1)[(targets[:, None] * batch + cols).flatten()] = hard.flatten()
    return mask


def mask_table(neighbors: np.ndarray | torch.Tensor, sample_from: int, device: torch.device) -> torch.Tensor:
    """The first `sample_from` neighbours per row as int64 on `device` (once per run, not per step)."""
    if isinstance(neighbors, torch.Tensor) and neighbors.device == device and neighbors.dtype == torch.int64 \
            and neighbors.shape[1] <= sample_from:
        return neighbors
    return torch.as_tensor(neighbors)[:, :sample_from].to(device=device, dtype=torch.int64).contiguous()
