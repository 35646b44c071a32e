r"""A hand-fused JD step for the benchmark MLP: the engine's arithmetic without its bookkeeping.

The engine benchmark compares ``JDOptimizer(modules=model)`` with a plain step. This step is the
third point that splits that ratio in two: what the Jacobian-descent arithmetic itself costs on
this model, and what jdoptim's general-purpose step adds around it (parsing and checking the
losses, the graph walks that find the shared and specific parameters and the hooked calls, the
per-layer rule objects, the finiteness checks, the ``.grad`` bookkeeping).

It does the same products as the engine and nothing else. It knows the model (every layer an
``nn.Linear`` on ``[batch, d]`` inputs ``A``, output gradients ``D``):

* **per-sample losses** ``ℓᵢ``: one backward of ``Σᵢ ℓᵢ`` to the layers' outputs gives ``D``
  (``b × o``); ``G = Σ_layers (A Aᵀ + 1) ⊙ (D Dᵀ)`` (the ``+ 1`` is the bias);
  ``w = W(G)``; each layer gets ``∇W = (w ⊙ D)ᵀ A`` and ``∇β = Σᵢ wᵢ Dᵢ``;
* **task losses** ``ℓ_k`` (a head each): one vmapped backward with rows ``e_k`` gives ``D_k``
  (``S × o``) at every layer; ``G_kl = Σ_trunk ⟨(A Aᵀ + 1) D_l, D_k⟩``; ``w = W(G)``; a trunk
  layer gets ``∇W = (Σ_k w_k D_k)ᵀ A``, head ``k`` its own loss's gradient ``D_kᵀ A``.

It checks nothing and only works on this model; :func:`check_against_jdoptim` verifies that it
makes the same update as ``JDOptimizer`` before its time is reported.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import GramianWeightedAggregator
from jdoptim.updates.base import weigh

Losses = Callable[[nn.Module], Tensor | list[Tensor]]


class HandFusedStep:
    """``step(losses)`` for a model whose parameterised layers are all ``nn.Linear``.

    Args:
        model: the model (its ``heads`` attribute, if any, lists the task-specific layers).
        optimizer: the ``torch.optim`` optimizer of ``model``'s parameters.
        aggregator: a Gramian-weighted aggregator (its weighting gives ``w = W(G)``).
        per_sample: ``step`` gets a ``[batch]`` vector of per-sample losses (else a list of
            task losses, one per head).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        aggregator: GramianWeightedAggregator,
        per_sample: bool,
    ) -> None:
        self.optimizer = optimizer
        self.weighting = aggregator.weighting
        self.per_sample = per_sample
        self.heads = set(getattr(model, "heads", []))
        self.calls: list[tuple[nn.Linear, Tensor, Tensor]] = []
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if torch.is_grad_enabled():
            self.calls.append((module, args[0], output))  # type: ignore[arg-type]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()
        self.calls.clear()

    def step(self, losses: Tensor | list[Tensor]) -> None:
        if self.per_sample:
            self._per_sample_step(losses)  # type: ignore[arg-type]
        else:
            self._task_step(torch.stack(losses))  # type: ignore[arg-type]
        self.optimizer.step()

    def _per_sample_step(self, losses: Tensor) -> None:
        outputs = [output for _, _, output in self.calls]
        grads = torch.autograd.grad(losses, outputs, torch.ones_like(losses))
        with torch.no_grad():
            gramian = None
            for (_, inputs, _), d in zip(self.calls, grads):
                products = d @ d.T
                term = torch.addcmul(products, inputs @ inputs.T, products)
                gramian = term if gramian is None else gramian + term
            weights = weigh(self.weighting, gramian)
            for (layer, inputs, _), d in zip(self.calls, grads):
                weighted = d * weights[:, None]
                layer.weight.grad = weighted.T @ inputs
                layer.bias.grad = weighted.sum(0)

    def _task_step(self, losses: Tensor) -> None:
        m = losses.shape[0]
        outputs = [output for _, _, output in self.calls]
        rows = torch.eye(m, dtype=losses.dtype)
        grads = torch.autograd.grad(losses, outputs, rows, is_grads_batched=True)
        with torch.no_grad():
            trunk = [(c, d) for c, d in zip(self.calls, grads) if c[0] not in self.heads]
            gramian = None
            for (_, inputs, _), d in trunk:
                kernel = torch.addmm(torch.ones(()), inputs, inputs.T)
                mixed = torch.matmul(kernel, d)  # [m, S, o]
                term = d.reshape(m, -1) @ mixed.reshape(m, -1).T
                gramian = term if gramian is None else gramian + term
            weights = weigh(self.weighting, gramian)
            for (layer, inputs, _), d in trunk:
                weighted = torch.tensordot(weights, d, dims=1)
                layer.weight.grad = weighted.T @ inputs
                layer.bias.grad = weighted.sum(0)
            heads = [(c, d) for c, d in zip(self.calls, grads) if c[0] in self.heads]
            for task, ((layer, inputs, _), d) in enumerate(heads):
                layer.weight.grad = d[task].T @ inputs
                layer.bias.grad = d[task].sum(0)


def check_against_jdoptim(
    model: nn.Module, aggregator: GramianWeightedAggregator, losses: Losses, per_sample: bool
) -> None:
    """Two SGD steps of :class:`HandFusedStep` and of ``JDOptimizer(modules=model)``, each from
    its own copy of ``model``, must leave the same ``.grad`` in every parameter (compared before
    the optimizer's update is applied, so that no normalisation hides a difference); raises
    ``AssertionError`` otherwise."""
    fused_model, jd_model = copy.deepcopy(model), copy.deepcopy(model)
    fused_sgd = torch.optim.SGD(fused_model.parameters(), lr=0.1)
    fused = HandFusedStep(fused_model, fused_sgd, aggregator, per_sample)
    jd_sgd = torch.optim.SGD(jd_model.parameters(), lr=0.1)
    jd = JDOptimizer(jd_sgd, aggregator, modules=jd_model, batch_dim=0 if per_sample else None)
    for _ in range(2):
        fused.zero_grad()
        fused.step(losses(fused_model))
        jd.zero_grad()
        jd.step(losses(jd_model))
        for (name, a), b in zip(fused_model.named_parameters(), jd_model.parameters()):
            assert a.grad is not None and b.grad is not None, name
            scale = b.grad.abs().max().item()
            if not torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5 * scale):
                raise AssertionError(f"The hand-fused step and JDOptimizer disagree on {name}.")
