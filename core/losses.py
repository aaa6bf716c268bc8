"""HELIP's loss terms: open_clip's contrastive (or SigLIP sigmoid) loss plus the hard negative margin loss, and
SLIP's SimCLR term."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss, gather_features


def _margin_from_similarity(sim: torch.Tensor, hard_mask: torch.Tensor, margin: float) -> torch.Tensor:
    """Margin loss of one direction from a [B, B] similarity matrix (rows: anchors, columns: candidates).

    For every anchor i with a hard column, L(i) = mean over ordinary negatives j (not i, not hard) of
    relu(sim[i, j] - min_{h hard} sim[i, h] + margin); the result is the mean over those anchors.
    Everything is masked elementwise on the B x B matrix so it costs a few O(B^2) passes, no loops.
    """
    if sim.dtype in (torch.float16, torch.bfloat16):
        sim = sim.float()  # mixed precision: the hinge and the means in fp32
    hard = hard_mask.to(device=sim.device, dtype=torch.bool)
    has_hard = hard.any(dim=1)
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    hardest = torch.where(hard, sim, torch.full_like(sim, math.inf)).amin(dim=1, keepdim=True)
    negatives = ~(hard | eye)
    hinge = torch.relu(sim - hardest + margin) * negatives
    # An anchor whose whole batch is hard pairs has no negatives: its term is 0 (clamp avoids 0/0).
    per_anchor = hinge.sum(dim=1) / negatives.sum(dim=1).clamp_min(1)
    # Masked mean over anchors with hard pairs, without a host sync: a batch without any hard pair
    # gives a zero that is still part of the graph (anchors without one have an +inf "hardest": drop them).
    per_anchor = torch.where(has_hard, per_anchor, torch.zeros_like(per_anchor))
    return per_anchor.sum() / has_hard.sum().clamp_min(1)


def _check_mask(hard_mask: torch.Tensor, batch: int) -> None:
    if hard_mask.shape != (batch, batch):
        raise ValueError(f"hard_mask must be [{batch}, {batch}] (the local batch), got {tuple(hard_mask.shape)}")


def margin_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    hard_mask: torch.Tensor,
    *,
    margin: float = 0.0,
    symmetric: bool = False,
) -> torch.Tensor:
    """HELIP's hard negative margin loss on one (local) batch of L2-normalised features.

    hard_mask[i, j] True means text j (image j) is a hard pair of anchor i. Image-to-text always;
    with symmetric=True the text-to-image version (text anchor i against images) is averaged in.
    """
    _check_mask(hard_mask, image_features.shape[0])
    sim = image_features @ text_features.T
    return _margin_terms(sim, hard_mask, margin=margin, symmetric=symmetric)


def _margin_terms(sim: torch.Tensor, hard_mask: torch.Tensor, *, margin: float, symmetric: bool) -> torch.Tensor:
    loss = _margin_from_similarity(sim, hard_mask, margin)
    if symmetric:
        # sim.T[i, j] = s(t_i, v_j): the same mask read with texts as anchors.
        loss = (loss + _margin_from_similarity(sim.T, hard_mask, margin)) / 2
    return loss


def margin_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    hard_mask: torch.Tensor,
    *,
    margin: float = 0.0,
    symmetric: bool = False,
) -> float:
    """The margin loss with plain Python loops, straight from the formula (tests only)."""
    img = image_features.detach().double().cpu().tolist()
    txt = text_features.detach().double().cpu().tolist()
    mask = hard_mask.detach().cpu().bool().tolist()
    n = len(img)

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    def one_direction(anchors: list[list[float]], others: list[list[float]]) -> float:
        terms = []
        for i in range(n):
            hard = [j for j in range(n) if mask[i][j]]
            if not hard:
                continue
            hardest = min(dot(anchors[i], others[h]) for h in hard)
            negatives = [j for j in range(n) if j != i and j not in hard]
            values = [max(0.0, dot(anchors[i], others[j]) - hardest + margin) for j in negatives]
            terms.append(sum(values) / len(values) if values else 0.0)
        return sum(terms) / len(terms) if terms else 0.0

    loss = one_direction(img, txt)
    if symmetric:
        loss = (loss + one_direction(txt, img)) / 2
    return loss


class HelipLoss(torch.nn.Module):
    """L = ClipLoss (SigLipLoss for SigLIP models) + gamma * L_margin, as named terms (their sum is the loss).

    The margin term reads cosine similarities: for SigLIP that is (logits - logit_bias) / logit_scale, so
    gamma and margin mean the same thing for both families.
    """

    def __init__(
        self,
        *,
        gamma: float = 0.0,
        margin: float = 0.0,
        symmetric: bool = False,
        rank: int = 0,
        world_size: int = 1,
        gather_with_grad: bool = True,
        local_loss: bool = False,
        siglip: bool = False,
    ):
        super().__init__()
        # open_clip's SigLipLoss, exchanging text features between ranks the way open_clip does
        self.siglip = SigLipLoss(rank=rank, world_size=world_size) if siglip else None
        self.gamma = float(gamma)
        self.margin = float(margin)
        self.symmetric = bool(symmetric)
        self.world_size = int(world_size)
        self.clip = ClipLoss(
            local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
            rank=rank, world_size=world_size,
        )

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        hard_mask: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if self.siglip is not None:
            if logit_bias is None:
                raise ValueError("a SigLIP loss needs the model's logit_bias")
            contrastive = self.siglip(image_features, text_features, logit_scale, logit_bias)
            if self.gamma <= 0:
                return {"contrastive_loss": contrastive}
            if hard_mask is None:
                return {"contrastive_loss": contrastive, "margin_loss": contrastive * 0.0}
            _check_mask(hard_mask, image_features.shape[0])
            margin = _margin_terms(image_features @ text_features.T, hard_mask, margin=self.margin,
                                   symmetric=self.symmetric)
            return {"contrastive_loss": contrastive, "margin_loss": self.gamma * margin}
        if self.gamma <= 0:
            return {"contrastive_loss": self.clip(image_features, text_features, logit_scale)}
        # ClipLoss.forward, opened up so that the margin term can reuse its logits matrix.
        logits_per_image, logits_per_text = self.clip.get_logits(image_features, text_features, logit_scale)
        labels = self.clip.get_ground_truth(image_features.device, logits_per_image.shape[0])
        contrastive = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        if hard_mask is None:
            return {"contrastive_loss": contrastive, "margin_loss": logits_per_image.sum() * 0.0}
        _check_mask(hard_mask, image_features.shape[0])
        if self.world_size == 1:
            # Dividing by the scale keeps the graph exact: d/d(scale) of (scale * s) / scale is 0.
            sim = logits_per_image / logit_scale
        else:
            # Across ranks the gathered logits may hold this rank's features without their gradient
            # (gather_with_grad=False): one local B x B product is cheap and always differentiable.
            sim = image_features @ text_features.T
        margin = _margin_terms(sim, hard_mask, margin=self.margin, symmetric=self.symmetric)
        return {"contrastive_loss": contrastive, "margin_loss": self.gamma * margin}


def simclr_loss_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """NT-Xent with loops (tests only): anchor z1_i, positive z2_i, negatives every other view of every other i."""
    a = F.normalize(z1.detach().double(), dim=-1).cpu().tolist()
    b = F.normalize(z2.detach().double(), dim=-1).cpu().tolist()
    n = len(a)

    def sim(x: list[float], y: list[float]) -> float:
        return sum(p * q for p, q in zip(x, y, strict=True)) / temperature

    def one_view(anchors: list[list[float]], others: list[list[float]]) -> float:
        total = 0.0
        for i in range(n):
            positive = sim(anchors[i], others[i])
            denominator = sum(math.exp(sim(anchors[i], others[k])) for k in range(n))
            denominator += sum(math.exp(sim(anchors[i], anchors[k])) for k in range(n) if k != i)
            total += -(positive - math.log(denominator))
        return total / n

    return (one_view(a, b) + one_view(b, a)) / 2


class SimCLRLoss(torch.nn.Module):
    """SLIP's image-image term: NT-Xent over two augmented views, gathered across ranks like SLIP does."""

    def __init__(self, temperature: float = 0.1, *, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__()
        self.temperature = float(temperature)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.gather_with_grad = gather_with_grad

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        q1 = F.normalize(z1.float(), dim=-1)
        q2 = F.normalize(z2.float(), dim=-1)
        batch = q1.shape[0]
        if self.world_size > 1:
            k1, k2 = gather_features(
                q1, q2, local_loss=True, gather_with_grad=self.gather_with_grad,
                rank=self.rank, world_size=self.world_size,
            )
        else:
            k1, k2 = q1, q2
        labels = torch.arange(batch, device=q1.device) + batch * self.rank
        # A view is not its own negative: mask the same-view diagonal out of the softmax.
        self_mask = F.one_hot(labels, k1.shape[0]).to(torch.bool)
        logits_11 = (q1 @ k1.T / self.temperature).masked_fill(self_mask, -math.inf)
        logits_22 = (q2 @ k2.T / self.temperature).masked_fill(self_mask, -math.inf)
        logits_12 = q1 @ k2.T / self.temperature
        logits_21 = q2 @ k1.T / self.temperature
        loss_1 = F.cross_entropy(torch.cat([logits_12, logits_11], dim=1), labels)
        loss_2 = F.cross_entropy(torch.cat([logits_21, logits_22], dim=1), labels)
        return (loss_1 + loss_2) / 2
