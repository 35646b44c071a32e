"""How each parameter is treated in one JD step, from the autograd graph of the losses.

* **shared**: owned by the wrapped optimizer and reached by two or more losses (or every reached
  owned parameter when ``scope="all"``): they receive the aggregated gradient;
* **specific**: owned and reached by exactly one loss (a task head): they receive that loss's own
  gradient, as ``mtl_backward`` does in TorchJD;
* **foreign**: reached, but not owned by the optimizer (e.g. a discriminator during a generator
  step): never touched;
* **unreached**: owned but reached by no loss: ``.grad`` is left as it was.

With a single loss (a list of one, a 0-D loss, a per-sample vector of length 1), every reached
owned parameter is shared: the aggregator applies to one loss as to many (``Constant([0.5])``
halves the gradient, Nash-MTL's ``max_norm`` clips it, ...), so that the last, one-sample batch
of an epoch is treated as the others.

Losses given separately that reach no owned parameter (only foreign ones, or none) are listed in
:attr:`ParameterPlan.idle_losses`: they cannot change the update.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from .introspection import HeadsMap, leaf_reach, leaf_reach_through
from .losses import LossBatch

Scope = Literal["shared", "all"]


@dataclass(frozen=True)
class ParameterPlan:
    shared: tuple[Tensor, ...]
    specific: tuple[tuple[Tensor, int], ...]  # (parameter, index of the one loss reaching it)
    foreign: tuple[Tensor, ...]
    unreached: tuple[Tensor, ...]
    #: Indices of the losses (given separately) that reach none of the owned parameters.
    idle_losses: tuple[int, ...] = ()
    #: With ``features=z``: the walk of the heads between the losses and ``z`` that gave the
    #: plan, reused by :class:`~jdoptim.updates.features.FeaturesUpdate`.
    heads: HeadsMap | None = field(default=None, compare=False)


def _owner_index(mask: int) -> int:
    return mask.bit_length() - 1


def plan_parameters(
    batch: LossBatch, owned: Iterable[Tensor], scope: Scope, features: Tensor | None = None
) -> ParameterPlan:
    """Sort the parameters reached by ``batch`` and those in ``owned`` into a plan.

    With ``features`` (the representation ``z`` of a ``features=`` step) and separate losses,
    the reach comes from one walk of the heads and one below ``z``
    (:func:`~jdoptim.introspection.leaf_reach_through`) instead of the general two-pass walk.
    """
    owned_list = list(owned)
    owned_ids = {id(p) for p in owned_list}
    heads = None
    if batch.separate is not None and features is not None:
        reach, heads = leaf_reach_through(batch.separate, features)
        if reach is None:  # heads shared by several losses: the general walk
            reach = leaf_reach(batch.separate)
    elif batch.separate is not None:
        reach = leaf_reach(batch.separate)
    else:
        everyone = (1 << batch.m) - 1
        reach = [(leaf, everyone) for leaf, _ in leaf_reach([batch.vector])]

    shared: list[Tensor] = []
    specific: list[tuple[Tensor, int]] = []
    foreign: list[Tensor] = []
    reached_ids: set[int] = set()
    owned_mask = 0  # bit i: loss i reaches an owned parameter
    every_loss_shares = scope == "all" or batch.m == 1
    for leaf, mask in reach:
        reached_ids.add(id(leaf))
        if id(leaf) not in owned_ids:
            foreign.append(leaf)
            continue
        owned_mask |= mask
        if every_loss_shares or mask & (mask - 1):
            shared.append(leaf)
        else:
            specific.append((leaf, _owner_index(mask)))
    unreached = [p for p in owned_list if id(p) not in reached_ids]
    idle = () if batch.separate is None or not owned_mask else _missing_bits(owned_mask, batch.m)
    return ParameterPlan(
        tuple(shared), tuple(specific), tuple(foreign), tuple(unreached), idle, heads
    )


def _missing_bits(mask: int, m: int) -> tuple[int, ...]:
    return tuple(i for i in range(m) if not mask >> i & 1)
