"""core.losses: the margin loss and SimCLR against slow loop references, the contrastive term against open_clip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from core.losses import HelipLoss, SimCLRLoss, margin_loss, margin_loss_reference, simclr_loss_reference

torch.set_num_threads(1)


def _features(batch: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def _group_mask(batch: int, group: int) -> torch.Tensor:
    """The sampler's layout: the first row of each group is a target, the rest its hard pairs."""
    mask = torch.zeros(batch, batch, dtype=torch.bool)
    for start in range(0, batch, group):
        mask[start, start + 1:start + group] = True
    return mask


def _random_mask(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, batch, generator=g) < 0.15
    mask.fill_diagonal_(False)
    return mask


@pytest.mark.parametrize("margin", [0.0, 0.2, -0.1])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("mask_kind", ["groups", "random", "one_anchor"])
def test_margin_loss_matches_loops(margin: float, symmetric: bool, mask_kind: str) -> None:
    img, txt = _features(12, seed=3)
    if mask_kind == "groups":
        mask = _group_mask(12, 4)
    elif mask_kind == "random":
        mask = _random_mask(12, seed=5)
    else:
        mask = torch.zeros(12, 12, dtype=torch.bool)
        mask[7, [2, 9]] = True
    got = margin_loss(img, txt, mask, margin=margin, symmetric=symmetric)
    want = margin_loss_reference(img, txt, mask, margin=margin, symmetric=symmetric)
    assert want > 0.0  # random features: some negatives beat the hardest hard pair
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_margin_loss_hand_computed() -> None:
    # 3 pairs in 2-D. Anchor 0 has hard text 1; its only ordinary negative is text 2.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 1] = True
    # s(v0, t1) = 0.8, s(v0, t2) = 0.0: relu(0.0 - 0.8 + m)
    assert margin_loss(img, txt, mask, margin=0.0).item() == pytest.approx(0.0)
    assert margin_loss(img, txt, mask, margin=1.0).item() == pytest.approx(0.2)
    # symmetric: text anchor 0 vs images: hard v1 s=0.0, negative v2 s=0.6 -> relu(0.6 - 0 + 1) = 1.6
    assert margin_loss(img, txt, mask, margin=1.0, symmetric=True).item() == pytest.approx((0.2 + 1.6) / 2)


def test_margin_loss_zero_without_hard_pairs_and_still_differentiable() -> None:
    img, txt = _features(8)
    img = img.float().requires_grad_()
    loss = margin_loss(img, txt.float(), torch.zeros(8, 8, dtype=torch.bool), margin=0.5, symmetric=True)
    assert loss.item() == 0.0
    loss.backward()
    assert img.grad is not None and torch.count_nonzero(img.grad) == 0


def test_margin_loss_gradient_flows_to_both_towers() -> None:
    img, txt = _features(12, seed=1)
    img = img.clone().requires_grad_()
    txt = txt.clone().requires_grad_()
    loss = margin_loss(img, txt, _group_mask(12, 3), margin=0.3, symmetric=True)
    loss.backward()
    assert loss.item() > 0
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0
    # Against finite differences on one coordinate.
    eps = 1e-6
    with torch.no_grad():
        bumped = img.detach().clone()
        bumped[0, 0] += eps
        up = margin_loss(bumped, txt.detach(), _group_mask(12, 3), margin=0.3, symmetric=True)
    assert img.grad[0, 0].item() == pytest.approx((up.item() - loss.item()) / eps, rel=1e-4, abs=1e-6)


def test_contrastive_term_equals_open_clip() -> None:
    img, txt = _features(10, seed=7)
    img, txt = img.float(), txt.float()
    scale = torch.tensor(14.3)
    want = ClipLoss()(img, txt, scale)
    for gamma in (0.0, 0.5):
        terms = HelipLoss(gamma=gamma)(img, txt, scale, _group_mask(10, 2))
        assert terms["contrastive_loss"].item() == pytest.approx(want.item(), rel=1e-6)
        assert ("margin_loss" in terms) == (gamma > 0)


def test_helip_loss_margin_term_is_gamma_times_margin_loss() -> None:
    img, txt = _features(12, seed=9)
    img, txt = img.float().requires_grad_(), txt.float()
    scale = torch.tensor(30.0, requires_grad=True)
    mask = _group_mask(12, 4)
    terms = HelipLoss(gamma=0.7, margin=0.1, symmetric=True)(img, txt, scale, mask)
    want = 0.7 * margin_loss_reference(img, txt, mask, margin=0.1, symmetric=True)
    assert terms["margin_loss"].item() == pytest.approx(want, rel=1e-5)
    sum(terms.values()).backward()
    assert img.grad.abs().sum() > 0
    # The margin term uses the logits divided by the scale: it must not push the scale itself.
    only_margin_scale = torch.tensor(30.0, requires_grad=True)
    HelipLoss(gamma=0.7, margin=0.1)(img.detach(), txt, only_margin_scale, mask)["margin_loss"].backward()
    assert abs(only_margin_scale.grad.item()) < 1e-6


def test_helip_loss_zero_margin_without_mask() -> None:
    img, txt = _features(6)
    terms = HelipLoss(gamma=1.0)(img.float(), txt.float(), torch.tensor(10.0))
    assert terms["margin_loss"].item() == 0.0
    terms = HelipLoss(gamma=1.0)(img.float(), txt.float(), torch.tensor(10.0), torch.zeros(6, 6, dtype=torch.bool))
    assert terms["margin_loss"].item() == 0.0


def test_helip_loss_rejects_wrong_mask_shape() -> None:
    img, txt = _features(6)
    with pytest.raises(ValueError, match="hard_mask"):
        HelipLoss(gamma=1.0)(img.float(), txt.float(), torch.tensor(10.0), torch.zeros(5, 5, dtype=torch.bool))


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_simclr_matches_loops(temperature: float) -> None:
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(9, 8, generator=g, dtype=torch.float64)
    z2 = z1 + 0.3 * torch.randn(9, 8, generator=g, dtype=torch.float64)
    got = SimCLRLoss(temperature)(z1, z2)
    want = simclr_loss_reference(z1, z2, temperature)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_simclr_rewards_agreeing_views() -> None:
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(16, 8, generator=g)
    close = SimCLRLoss()(z1, z1 + 0.01 * torch.randn(16, 8, generator=g))
    far = SimCLRLoss()(z1, torch.randn(16, 8, generator=g))
    assert close.item() < far.item()
    z = z1.clone().requires_grad_()
    SimCLRLoss()(z, torch.randn(16, 8, generator=g)).backward()
    assert z.grad.abs().sum() > 0
