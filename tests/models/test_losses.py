import math

import torch

from pancreas_gvae.training import losses as L


def test_kl_of_prior_is_zero_and_matches_closed_form():
    mu = torch.zeros(4, 3)
    logvar = torch.zeros(4, 3)
    assert torch.allclose(L.kl_per_sample(mu, logvar), torch.zeros(4))
    # KL(N(1, e^1) || N(0,1)) per dim = 0.5 * (1 + e - 1 - 1) = 0.5 * (e - 1)
    kl = L.kl_per_sample(torch.ones(1, 2), torch.ones(1, 2))
    assert math.isclose(kl.item(), 2 * 0.5 * (math.e - 1), rel_tol=1e-6)


def test_adversarial_losses_hand_values():
    real, fake = torch.tensor([0.0]), torch.tensor([0.0])
    # non-saturating: softplus(0) = log 2 for real and for fake
    assert math.isclose(L.d_adversarial(real, [fake], "nonsaturating").item(), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(L.g_adversarial([fake], "nonsaturating").item(), math.log(2), rel_tol=1e-6)
    # hinge: relu(1 - 0) + relu(1 + 0) = 2 ; G: -mean(fake)
    assert L.d_adversarial(real, [fake], "hinge").item() == 2.0
    assert L.g_adversarial([torch.tensor([2.0, 4.0])], "hinge").item() == -3.0


def test_bernoulli_nll_matches_manual():
    logits = torch.tensor([[[[0.0, 2.0]]]])
    x = torch.tensor([[[[1.0, 0.0]]]])
    expected = math.log(2) + math.log(1 + math.exp(2))
    assert math.isclose(L.bernoulli_nll(logits, x).item(), expected, rel_tol=1e-6)


def test_gaussian_nll_matches_manual():
    mean = torch.zeros(1, 1, 1, 2)
    x = torch.tensor([[[[0.1, -0.1]]]])
    sigma = 0.1
    expected = 2 * (0.5 * 1.0 + 0.5 * math.log(2 * math.pi * sigma**2))
    assert math.isclose(L.gaussian_nll(mean, x, sigma).item(), expected, rel_tol=1e-5)


def test_mask_loss_is_small_for_perfect_prediction():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    logits = (target * 2 - 1) * 20.0  # confident logits for the right mask
    perfect = L.mask_loss(logits, target, dice_weight=1, bce_weight=1)
    wrong = L.mask_loss(-logits, target, dice_weight=1, bce_weight=1)
    assert perfect.item() < 0.01 < wrong.item()


def test_mask_loss_is_fp32_and_finite_under_bf16_autocast():
    """Takes logits, runs outside autocast: finite for extreme logits, same value in and out of autocast."""
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    logits = torch.randn(2, 1, 8, 8) * 30  # saturated sigmoid: BCE on probabilities would need clamping
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = L.mask_loss(logits.bfloat16(), target, dice_weight=1, bce_weight=1)
    assert auto.dtype == torch.float32 and torch.isfinite(auto)
    assert torch.allclose(auto, L.mask_loss(logits.bfloat16().float(), target, dice_weight=1, bce_weight=1))


def test_r1_penalty_of_linear_critic():
    x = torch.randn(5, 1, 2, 2, requires_grad=True)
    w = torch.arange(4.0).view(1, 1, 2, 2)
    logit = (x * w).flatten(1).sum(1)
    # gradient w.r.t. each x is w, so ||grad||^2 = 0 + 1 + 4 + 9 = 14
    assert math.isclose(L.r1_penalty(logit, x).item(), 14.0, rel_tol=1e-6)
