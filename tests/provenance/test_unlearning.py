"""The unlearning core on models small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from provenance import unlearning


class SquaredError:
    """ℓ_n = (f(x_n + σ·ε_n) − y_n)², ε from the global RNG (like diffusion noise)."""

    def __init__(self, noise_std: float = 0.0) -> None:
        self.noise_std = noise_std

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if self.noise_std:
            x = x + self.noise_std * torch.randn_like(x)
        return (model(x).squeeze(-1) - y) ** 2


def _linear_problem(n: int = 24, dim: int = 96, seed: int = 0, train_steps: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen) / dim ** 0.5
    y = torch.randn(n, generator=gen)
    torch.manual_seed(seed)
    model = nn.Linear(dim, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(train_steps):  # deliberately not converged: every example keeps a gradient
        opt.zero_grad()
        SquaredError()(model, (x, y)).mean().backward()
        opt.step()
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, n, 4)]
    return model, x, y, batches


def test_per_example_gradients_match_one_example_at_a_time() -> None:
    model, x, y, _ = _linear_problem()
    loss = SquaredError()
    rows = unlearning.per_example_gradients(model, loss, (x[:5], y[:5]))
    assert rows.shape == (5, sum(p.numel() for p in model.parameters()))
    for i in range(5):
        model.zero_grad()
        loss(model, (x[i:i + 1], y[i:i + 1])).sum().backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(rows[i], expected)


def test_diagonal_fisher_is_mean_squared_per_example_gradient() -> None:
    model, x, y, batches = _linear_problem()
    fisher = unlearning.diagonal_fisher(model, SquaredError(), batches)
    rows = unlearning.per_example_gradients(model, SquaredError(), (x, y))
    flat = torch.cat([f.reshape(-1) for f in fisher])
    torch.testing.assert_close(flat, (rows ** 2).mean(dim=0))
    assert all(f.shape == p.shape for f, p in zip(fisher, model.parameters()))
    assert (flat >= 0).all()
    with pytest.raises(ValueError, match="at least one"):
        unlearning.diagonal_fisher(model, SquaredError(), [])


def test_noise_is_identical_before_and_after() -> None:
    model, _, _, batches = _linear_problem()
    noisy = SquaredError(noise_std=0.5)
    first = unlearning.per_example_losses(model, noisy, batches, seed=7)
    again = unlearning.per_example_losses(model, noisy, batches, seed=7)
    other = unlearning.per_example_losses(model, noisy, batches, seed=8)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    np.testing.assert_array_equal(unlearning.loss_deltas(model, model, noisy, batches, seed=3), np.zeros(24))
    # the caller's RNG stream is not disturbed
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    unlearning.per_example_losses(model, noisy, batches)
    torch.testing.assert_close(torch.rand(3), expected)


def test_unlearn_raises_forget_loss_by_the_requested_relative_step_and_leaves_model_alone() -> None:
    model, x, y, batches = _linear_problem()
    before = [p.detach().clone() for p in model.parameters()]
    fisher = unlearning.diagonal_fisher(model, SquaredError(), batches)
    forget = [(x[3:4], y[3:4])]
    moved = unlearning.unlearn(model, SquaredError(), forget, fisher, step_size=0.05)
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b)
    theta = torch.cat([b.reshape(-1) for b in before])
    delta = torch.cat([m.detach().reshape(-1) for m in moved.parameters()]) - theta
    assert float(delta.norm() / theta.norm()) == pytest.approx(0.05, rel=1e-4)
    loss_before = unlearning.per_example_losses(model, SquaredError(), forget)[0]
    loss_after = unlearning.per_example_losses(moved, SquaredError(), forget)[0]
    assert loss_after > loss_before
    with pytest.raises(ValueError, match="step_size"):
        unlearning.unlearn(model, SquaredError(), forget, fisher, step_size=0.0)
    with pytest.raises(ValueError, match="does not match"):
        unlearning.unlearn(model, SquaredError(), forget, fisher[:1])


def test_unlearning_a_training_example_ranks_it_first() -> None:
    """Self-retrieval: unlearning example k raises k's loss more than any other example's."""
    model, x, y, batches = _linear_problem(n=24, dim=512)
    noisy = SquaredError(noise_std=0.01)
    fisher = unlearning.diagonal_fisher(model, noisy, batches)
    hits = 0
    for k in range(24):
        scores = unlearning.unlearning_scores(model, noisy, forget_batches=[(x[k:k + 1], y[k:k + 1])],
                                              score_batches=batches, fisher=fisher, step_size=1e-2)
        assert scores.deltas.shape == (24,)
        assert scores.forget_loss_after > scores.forget_loss_before
        np.testing.assert_allclose(scores.deltas, scores.losses_after - scores.losses_before)
        hits += int(np.argmax(scores.deltas) == k)
    assert hits >= 23


def test_bad_loss_shape_is_named() -> None:
    model, x, y, _ = _linear_problem()
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        unlearning.per_example_losses(model, lambda m, b: m(b[0]), [(x, y)])


def test_contrastive_unlearn_moves_along_the_preconditioned_gradient_difference() -> None:
    model, x, y, batches = _linear_problem()
    fisher = unlearning.diagonal_fisher(model, SquaredError(), batches)
    forget, contrast = [(x[3:4], y[3:4])], batches
    moved = unlearning.unlearn(model, SquaredError(), forget, fisher, step_size=0.05, contrast_batches=contrast,
                               contrast_weight=0.7)
    params = list(model.parameters())

    def mean_grad(data):
        xs, ys = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(SquaredError()(model, (xs, ys)).mean(), params)])

    f = torch.cat([v.reshape(-1) for v in fisher])
    expected = (mean_grad(forget) - 0.7 * mean_grad(contrast)) / (f + 0.1 * f.mean())
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    step = torch.cat([p.detach().reshape(-1) for p in moved.parameters()]) - theta
    assert float(step.norm() / theta.norm()) == pytest.approx(0.05, rel=1e-4)
    assert float(torch.nn.functional.cosine_similarity(step, expected, dim=0)) > 0.9999
    plain = unlearning.unlearn(model, SquaredError(), forget, fisher, step_size=0.05)
    plain_step = torch.cat([p.detach().reshape(-1) for p in plain.parameters()]) - theta
    assert float(torch.nn.functional.cosine_similarity(step, plain_step, dim=0)) < 0.999  # the contrast matters
    same = unlearning.unlearn(model, SquaredError(), forget, fisher, contrast_batches=forget)  # gradient cancels
    for p, q in zip(same.parameters(), params):
        torch.testing.assert_close(p.detach(), q.detach())
    with pytest.raises(ValueError, match="contrast"):
        unlearning.unlearn(model, SquaredError(), forget, fisher, contrast_batches=[])
