"""The unlearning core: Fisher-preconditioned unlearning and the loss change it causes, per example.

One implementation, two callers (DESIGN.md, "Attribution" and "Blind cleaning"):

- **attribution** (Choi et al. 2025, "Large-Scale Training Data Attribution for Music Generative Models via
  Unlearning", arXiv 2506.18312; after Wang et al., NeurIPS 2024, "Data Attribution for Text-to-Image Models by
  Unlearning Synthesized Images"): the *forget set* is the generated track, the *scored set* the training
  segments; a segment whose loss rises most when the model unlearns the generation influenced it most.
- **blind cleaning** (Gui et al., ICASSP 2026, arXiv 2510.15409): the forget set is the trusted clean reference
  set, the scored set the candidate stem windows of the separator's training data; stems whose loss rises least
  contribute least to clean outputs and are the drop candidates.

The model reaches this module only through the ``PerExampleLoss`` protocol (model, batch → loss per example), so
``provenance`` stays free of ``cleaning`` and ``training``. Randomness inside a loss (diffusion noise and
timesteps, random crops) must come from torch's global RNG: every evaluation of batch ``i`` runs under
``torch.random.fork_rng`` seeded with ``seed + i``, so the loss before and after unlearning sees the same noise.

The unlearning update is one (or a few) steps of gradient *ascent* on the forget set's loss, preconditioned by the
inverse of the diagonal empirical Fisher estimated on the scored set (the elastic-weight-consolidation view of
Wang et al.: move most along directions the rest of the data does not pin down)::

    d = ∇θ L_forget / (F + λ·mean(F))          F: diagonal empirical Fisher, λ: ``damping``
    θ ← θ + step_size · ‖θ‖ · d / ‖d‖           ``step_size`` is the relative parameter change

Optionally the ascent is *contrastive*: ``∇θ L_forget − w·∇θ L_contrast`` (mean gradients; blind cleaning passes
the candidate windows as the contrast set), so that the update unlearns what the forget set teaches beyond the
average training example rather than the task as a whole (see ``unlearn``).

Pure torch and numpy; no model classes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn


@runtime_checkable
class PerExampleLoss(Protocol):
    """Model, batch → loss per example: the one interface through which models reach the unlearning core.

    Implementations: the separator's per-window separation loss (blind cleaning) and the diffusion model's
    denoising loss (attribution, D-TRAK).
    """

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Loss of each example of ``batch`` under ``model``.

        Args:
            model: the network (its parameters are what the core differentiates and moves).
            batch: whatever the implementation needs; opaque to the core.

        Returns:
            float32 ``(B,)``, differentiable with respect to ``model``'s parameters. Any randomness must be drawn
            from torch's global RNG (the core seeds it per batch).
        """
        ...


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the core differentiates and moves: those with ``requires_grad``, in module order."""
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block under torch's global RNG seeded with ``seed``, restoring the caller's RNG state after."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_losses(losses: torch.Tensor, where: str) -> torch.Tensor:
    if losses.ndim != 1:
        raise ValueError(f"{where}: a PerExampleLoss must return shape (B,), got {tuple(losses.shape)}")
    return losses


def per_example_gradients(model: nn.Module, loss_fn: PerExampleLoss, batch: Any, *,
                          params: Sequence[nn.Parameter] | None = None, seed: int = 0) -> torch.Tensor:
    """Gradient of each example's loss, flattened over ``params``.

    One forward pass, then one backward pass per example (``retain_graph``), so it works for any model whose
    examples do not interact in the forward pass (no batch norm in training mode).

    Args:
        model: the network.
        loss_fn: the per-example loss.
        batch: one batch for ``loss_fn``.
        params: parameters to differentiate (default: ``trainable_parameters(model)``).
        seed: seeds the global RNG for this evaluation.

    Returns:
        float32 ``(B, P)`` on the parameters' device, ``P`` = total element count of ``params``.

    Raises:
        ValueError: ``loss_fn`` does not return shape ``(B,)``.
    """
    params = list(params) if params is not None else trainable_parameters(model)
    with _seeded(seed):
        losses = _check_losses(loss_fn(model, batch), "per_example_gradients")
    rows = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=i + 1 < losses.shape[0], allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                               for g, p in zip(grads, params, strict=True)]))
    return torch.stack(rows)


def diagonal_fisher(model: nn.Module, loss_fn: PerExampleLoss, batches: Iterable[Any], *,
                    params: Sequence[nn.Parameter] | None = None, seed: int = 0) -> list[torch.Tensor]:
    """Diagonal empirical Fisher: the mean over examples of the squared per-example loss gradient.

    ``F_j = (1/N) Σ_n (∂ℓ_n/∂θ_j)²`` (Kirkpatrick et al. 2017, EWC; the empirical Fisher of Martens 2020 §11).

    Args:
        model: the network.
        loss_fn: the per-example loss.
        batches: the examples to average over (batch ``i`` evaluated with seed ``seed + i``).
        params: parameters (default: ``trainable_parameters(model)``).
        seed: base seed.

    Returns:
        One float32 tensor per parameter, shaped like it, non-negative.

    Raises:
        ValueError: ``batches`` is empty.
    """
    params = list(params) if params is not None else trainable_parameters(model)
    totals = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    for i, batch in enumerate(batches):
        with _seeded(seed + i):
            losses = _check_losses(loss_fn(model, batch), "diagonal_fisher")
        for n in range(losses.shape[0]):
            grads = torch.autograd.grad(losses[n], params, retain_graph=n + 1 < losses.shape[0], allow_unused=True)
            for total, grad in zip(totals, grads, strict=True):
                if grad is not None:
                    total += grad.detach().float() ** 2
        count += losses.shape[0]
    if count == 0:
        raise ValueError("diagonal_fisher needs at least one example")
    return [total / count for total in totals]


@torch.no_grad()
def per_example_losses(model: nn.Module, loss_fn: PerExampleLoss, batches: Iterable[Any], *,
                       seed: int = 0) -> np.ndarray:
    """Loss of every example, batch ``i`` evaluated under seed ``seed + i``.

    Returns:
        float64 ``(N,)`` in the order of ``batches``.
    """
    out = []
    for i, batch in enumerate(batches):
        with _seeded(seed + i):
            out.append(_check_losses(loss_fn(model, batch), "per_example_losses").detach().double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float64)


def unlearn(model: nn.Module, loss_fn: PerExampleLoss, forget_batches: Sequence[Any],
            fisher: Sequence[torch.Tensor], *, step_size: float = 1e-3, damping: float = 0.1,
            num_steps: int = 1, seed: int = 0, contrast_batches: Sequence[Any] | None = None,
            contrast_weight: float = 1.0) -> nn.Module:
    """A copy of ``model`` after Fisher-preconditioned gradient ascent on the forget set's loss.

    ``d = ∇θ L_forget / (F + damping·mean(F))``, ``θ ← θ + step_size·‖θ‖·d/‖d‖`` per step, where ``L_forget`` is
    the mean per-example loss over ``forget_batches`` (each evaluated with seed ``seed + i``, so every step sees
    the same noise) and norms run over all trainable parameters.

    With ``contrast_batches`` the ascent direction is ``∇θ L_forget − contrast_weight·∇θ L_contrast`` (both mean
    per-example losses; contrast batch ``i`` under seed ``seed + 3_000_017 + i``): the part of the gradient that
    every example shares (for a separator: "separate better") cancels, and the step unlearns what distinguishes
    the forget set from the contrast set. In first order the loss change of an example ``n`` is then
    ``η·∇ℓ_n·F⁻¹(∇L_forget − w·∇L_contrast)``: its alignment with the forget set relative to the contrast set's
    (the mean-centred influence; cf. the influence-function view of Koh & Liang 2017).

    Args:
        model: the trained network; left untouched.
        loss_fn: the per-example loss.
        forget_batches: what to unlearn (a generated track's windows; the clean reference set).
        fisher: ``diagonal_fisher`` output for ``trainable_parameters(model)``.
        step_size: relative parameter change per step (``‖Δθ‖ / ‖θ‖``), > 0.
        damping: λ, relative to the Fisher's mean, > 0.
        num_steps: ascent steps, ≥ 1.
        seed: base seed of the forget batches.
        contrast_batches: examples whose mean loss gradient is subtracted (None: plain ascent).
        contrast_weight: ``w`` ≥ 0, the weight of the contrast gradient.

    Returns:
        A deep copy of ``model`` with moved parameters, in the same train/eval mode.

    Raises:
        ValueError: a non-positive ``step_size``/``damping``, ``num_steps`` < 1, no forget batches, an empty
            ``contrast_batches`` or negative ``contrast_weight``, or a Fisher that does not match the parameters.
    """
    if step_size <= 0 or damping <= 0 or num_steps < 1:
        raise ValueError(f"unlearn needs step_size > 0, damping > 0, num_steps >= 1; got {step_size}, {damping}, "
                         f"{num_steps}")
    if len(forget_batches) == 0:
        raise ValueError("unlearn needs at least one forget batch")
    if contrast_batches is not None and (len(contrast_batches) == 0 or contrast_weight < 0):
        raise ValueError(f"unlearn needs a non-empty contrast set and contrast_weight >= 0; got "
                         f"{len(contrast_batches)} batches, weight {contrast_weight}")
    moved = copy.deepcopy(model)
    params = trainable_parameters(moved)
    if len(params) != len(fisher) or any(p.shape != f.shape for p, f in zip(params, fisher, strict=False)):
        raise ValueError("fisher does not match the model's trainable parameters")
    fisher_mean = float(torch.stack([f.double().sum() for f in fisher]).sum()
                        / max(1, sum(f.numel() for f in fisher)))
    lam = damping * fisher_mean if fisher_mean > 0 else damping
    for _ in range(num_steps):
        grads = _mean_gradient(moved, loss_fn, forget_batches, params, seed)
        if contrast_batches is not None and contrast_weight > 0:
            contrast = _mean_gradient(moved, loss_fn, contrast_batches, params, seed + 3_000_017)
            grads = [g - contrast_weight * c for g, c in zip(grads, contrast, strict=True)]
        directions = [g / (f.to(g.device, g.dtype) + lam) for g, f in zip(grads, fisher, strict=True)]
        d_norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in directions))
        theta_norm = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in params))
        if d_norm == 0.0:
            break
        scale = step_size * theta_norm / d_norm
        with torch.no_grad():
            for p, d in zip(params, directions, strict=True):
                p.add_(d, alpha=scale)
    return moved


def _mean_gradient(model: nn.Module, loss_fn: PerExampleLoss, batches: Sequence[Any],
                   params: Sequence[nn.Parameter], seed: int) -> list[torch.Tensor]:
    """Gradient of the mean per-example loss over ``batches`` (batch ``i`` under seed ``seed + i``)."""
    grads = [torch.zeros_like(p) for p in params]
    count = 0
    for i, batch in enumerate(batches):
        with _seeded(seed + i):
            losses = _check_losses(loss_fn(model, batch), "unlearn")
        batch_grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
        for acc, grad in zip(grads, batch_grads, strict=True):
            if grad is not None:
                acc += grad.detach()
        count += losses.shape[0]
    return [g / count for g in grads]


def loss_deltas(before: nn.Module, after: nn.Module, loss_fn: PerExampleLoss, batches: Sequence[Any], *,
                seed: int = 0) -> np.ndarray:
    """Per-example loss change ``ℓ(after) − ℓ(before)`` with identical seeds: float64 ``(N,)``."""
    return (per_example_losses(after, loss_fn, batches, seed=seed)
            - per_example_losses(before, loss_fn, batches, seed=seed))


@dataclass(frozen=True)
class UnlearningScores:
    """Result of ``unlearning_scores``.

    Attributes:
        deltas: float64 ``(N,)``, loss after unlearning minus before, per scored example (the score).
        losses_before: float64 ``(N,)``.
        losses_after: float64 ``(N,)``.
        forget_loss_before: mean forget-set loss before unlearning.
        forget_loss_after: mean forget-set loss after (higher: the step unlearned).
        step_size, damping, num_steps: the update's settings.
    """

    deltas: np.ndarray
    losses_before: np.ndarray
    losses_after: np.ndarray
    forget_loss_before: float
    forget_loss_after: float
    step_size: float
    damping: float
    num_steps: int


def unlearning_scores(model: nn.Module, loss_fn: PerExampleLoss, *, forget_batches: Sequence[Any],
                      score_batches: Sequence[Any], fisher_batches: Sequence[Any] | None = None,
                      fisher: Sequence[torch.Tensor] | None = None, step_size: float = 1e-3,
                      damping: float = 0.1, num_steps: int = 1, seed: int = 0,
                      contrast_batches: Sequence[Any] | None = None, contrast_weight: float = 1.0
                      ) -> UnlearningScores:
    """Unlearn the forget set and measure every scored example's loss change.

    Args:
        model: the trained network (unchanged).
        loss_fn: the per-example loss.
        forget_batches: what to unlearn.
        score_batches: the examples to score (batch ``i`` always under seed ``seed + 1_000_003 + i``).
        fisher_batches: where to estimate the diagonal Fisher (default ``score_batches``); ignored if ``fisher``.
        fisher: a precomputed ``diagonal_fisher`` (reuse it across queries: it depends only on the model).
        step_size, damping, num_steps, contrast_batches, contrast_weight: see ``unlearn``.
        seed: base seed.

    Returns:
        ``UnlearningScores``; a high delta means the example shares what the forget set taught the model.

    Raises:
        ValueError: see ``unlearn``.
    """
    if fisher is None:
        fisher = diagonal_fisher(model, loss_fn, fisher_batches if fisher_batches is not None else score_batches,
                                 seed=seed + 2_000_003)
    after = unlearn(model, loss_fn, forget_batches, fisher, step_size=step_size, damping=damping,
                    num_steps=num_steps, seed=seed, contrast_batches=contrast_batches,
                    contrast_weight=contrast_weight)
    score_seed = seed + 1_000_003
    before_losses = per_example_losses(model, loss_fn, score_batches, seed=score_seed)
    after_losses = per_example_losses(after, loss_fn, score_batches, seed=score_seed)
    forget_before = float(per_example_losses(model, loss_fn, forget_batches, seed=seed).mean())
    forget_after = float(per_example_losses(after, loss_fn, forget_batches, seed=seed).mean())
    return UnlearningScores(deltas=after_losses - before_losses, losses_before=before_losses,
                            losses_after=after_losses, forget_loss_before=forget_before,
                            forget_loss_after=forget_after, step_size=step_size, damping=damping,
                            num_steps=num_steps)
