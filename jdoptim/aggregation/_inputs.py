r"""What a method receives when it needs more than the Gramian: one input object.

Most methods are a :class:`~jdoptim.aggregation.Weighting` of the Gramian ``G = J Jᵀ`` alone.
Some need more: the loss values (GradNorm, IMTL, DB-MTL, MoCo), the Jacobian itself (DB-MTL and
MoCo keep moving averages of the gradients), the Gramian of a chosen layer (GradNorm), or the
product ``A = J₁ J₂ᵀ`` of the Jacobians of two independent mini-batches (MoDo, SDMGrad). Such a
method *declares* what it needs in ``needs`` and receives a :class:`MethodInputs` holding exactly
that; :class:`jdoptim.JDOptimizer` fills it for each step (:func:`bind_inputs`), so these methods
run through the same update computers as every other one, with no second code path.

* :class:`InputWeighting`: ``MethodInputs → w ∈ R^m``; its aggregator
  (:class:`InputWeightedAggregator`) is Gramian-weighted, ``d = wᵀ J``.
* :class:`InputAggregator`: ``MethodInputs → d ∈ R^n`` for methods that need ``J`` itself.
* :class:`CrossBatchWeighting`: an :class:`InputWeighting` of ``A = J₁ J₂ᵀ`` (square, not
  symmetric): it needs ``opt.step(losses, extra_batches=[...])`` (see
  :mod:`jdoptim.updates.cross_batch`).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from ..linalg.finite import is_finite
from ._bases import Aggregator, GramianWeightedAggregator, Weighting, check_gramian, check_matrix

__all__ = [
    "CrossBatchWeighting",
    "InputAggregator",
    "InputWeightedAggregator",
    "InputWeighting",
    "MethodInputs",
    "bind_inputs",
    "needs_of",
]

#: Every input a method may declare.
INPUT_NAMES = frozenset({"gramian", "jacobian", "losses", "layer_gramian", "cross"})


@dataclass(frozen=True)
class MethodInputs:
    """The inputs of one call; a field is ``None`` unless the method declared it.

    Attributes:
        gramian: ``G = J Jᵀ ∈ R^{m×m}`` over the shared parameters (or over the features with
            ``opt.step(losses, features=z)``).
        jacobian: ``J ∈ R^{m×n}``, one row per loss.
        losses: the ``m`` loss values, detached.
        layer_gramian: the Gramian over the parameters the method named (GradNorm's layer).
        cross: ``A = J₁ J₂ᵀ ∈ R^{m×m}`` for two independent mini-batches' Jacobians.
    """

    gramian: Tensor | None = None
    jacobian: Tensor | None = None
    losses: Tensor | None = None
    layer_gramian: Tensor | None = None
    cross: Tensor | None = None

    def require(self, owner: object, needs: frozenset[str]) -> None:
        """Raise a clear error naming what ``owner`` needs and was not given."""
        missing = sorted(name for name in needs if getattr(self, name) is None)
        if missing:
            raise ValueError(
                f"{type(owner).__name__} needs {', '.join(missing)} (it declares "
                f"needs={sorted(needs)}): call it with MethodInputs(...) holding them, or let "
                "JDOptimizer fill them (opt.step(losses) gives the loss values; cross-batch "
                "methods need opt.step(losses, extra_batches=[...]))."
            )
        if self.losses is not None and not is_finite(self.losses):
            raise ValueError("The loss values given to the method contain NaN or inf.")


def _check_inputs(inputs: MethodInputs) -> None:
    if inputs.gramian is not None:
        check_gramian(inputs.gramian)
    if inputs.layer_gramian is not None:
        check_gramian(inputs.layer_gramian)
    if inputs.jacobian is not None:
        check_matrix(inputs.jacobian)
    if inputs.cross is not None:
        check_cross(inputs.cross)


def check_cross(cross: Tensor) -> None:
    """Raise unless ``cross`` is a finite square floating-point matrix (``J₁ J₂ᵀ``)."""
    if not isinstance(cross, Tensor) or cross.dim() != 2 or cross.shape[0] != cross.shape[1]:
        shape = tuple(cross.shape) if isinstance(cross, Tensor) else type(cross).__name__
        raise ValueError(
            f"Expected the square matrix A = J₁ J₂ᵀ of shape [m, m] (the Jacobians of two "
            f"independent mini-batches of the same m losses), got {shape}."
        )
    if not cross.is_floating_point() or not is_finite(cross):
        raise ValueError("A = J₁ J₂ᵀ must be a finite floating-point matrix.")


class InputWeighting(Weighting[MethodInputs]):
    """A weighting that needs more than the Gramian: ``forward(inputs: MethodInputs) → w``.

    Subclasses set ``needs`` (a subset of ``{"gramian", "jacobian", "losses",
    "layer_gramian", "cross"}``). Called with a bare tensor, the tensor is taken as the Gramian.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"gramian"})

    def __call__(self, inputs: MethodInputs | Tensor) -> Tensor:
        if isinstance(inputs, Tensor):
            inputs = MethodInputs(gramian=inputs)
        inputs.require(self, self.needs)
        _check_inputs(inputs)
        return nn.Module.__call__(self, inputs)

    @abstractmethod
    def forward(self, inputs: MethodInputs) -> Tensor:
        """Return the weights ``w ∈ R^m``."""


class CrossBatchWeighting(InputWeighting):
    """A weighting of ``A = J₁ J₂ᵀ``, the product of two independent mini-batches' Jacobians.

    Called with a bare tensor, the tensor is taken as ``A`` (as in TorchJD). Under
    :class:`jdoptim.JDOptimizer` it needs ``opt.step(losses, extra_batches=[...])``.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"cross"})

    def __call__(self, inputs: MethodInputs | Tensor) -> Tensor:
        if isinstance(inputs, Tensor):
            inputs = MethodInputs(cross=inputs)
        return super().__call__(inputs)


class InputWeightedAggregator(GramianWeightedAggregator):
    """``d = wᵀ J`` with ``w`` from an :class:`InputWeighting`.

    Standalone (``aggregator(J)``) it can only give the weighting ``G = J Jᵀ`` and ``J``; a
    method that needs the loss values is called through :class:`jdoptim.JDOptimizer` or with
    :meth:`aggregate`.
    """

    weighting: InputWeighting

    def __init__(self, weighting: InputWeighting) -> None:
        super().__init__(weighting)

    def forward(self, matrix: Tensor) -> Tensor:
        return self.aggregate(MethodInputs(gramian=matrix @ matrix.T, jacobian=matrix))

    def aggregate(self, inputs: MethodInputs) -> Tensor:
        """``d = W(inputs)ᵀ J`` (``inputs.jacobian`` is required)."""
        if inputs.jacobian is None:
            raise ValueError("aggregate() needs inputs.jacobian.")
        return self.weighting(inputs) @ inputs.jacobian


class InputAggregator(Aggregator[MethodInputs]):
    """An aggregator that needs more than the Jacobian: ``forward(inputs: MethodInputs) → d``."""

    needs: ClassVar[frozenset[str]] = frozenset({"jacobian"})

    def __call__(self, inputs: MethodInputs | Tensor) -> Tensor:
        if isinstance(inputs, Tensor):
            inputs = MethodInputs(jacobian=inputs)
        inputs.require(self, self.needs)
        _check_inputs(inputs)
        return nn.Module.__call__(self, inputs)

    @abstractmethod
    def forward(self, inputs: MethodInputs) -> Tensor:
        """Return the update ``d ∈ R^n``."""


def needs_of(aggregator: Aggregator) -> frozenset[str]:
    """What ``aggregator`` needs beyond the Gramian or the Jacobian (empty for most methods)."""
    if isinstance(aggregator, InputAggregator):
        return aggregator.needs - {"jacobian"}
    weighting = getattr(aggregator, "weighting", None)
    if isinstance(aggregator, GramianWeightedAggregator) and isinstance(weighting, InputWeighting):
        return weighting.needs - {"gramian"}
    return frozenset()


class _BoundWeighting(Weighting):
    """``G ↦ W(MethodInputs(gramian=G, **extra))``: one step's view of an InputWeighting."""

    def __init__(self, inner: InputWeighting, extra: dict[str, Tensor]) -> None:
        super().__init__()
        self.inner = inner
        self.extra = extra

    def forward(self, gramian: Tensor) -> Tensor:
        return self.inner(MethodInputs(gramian=gramian, **self.extra))


class _BoundAggregator(Aggregator):
    """``J ↦ A(MethodInputs(jacobian=J, **extra))``: one step's view of an InputAggregator."""

    def __init__(self, inner: InputAggregator, extra: dict[str, Tensor]) -> None:
        super().__init__()
        self.inner = inner
        self.extra = extra

    def forward(self, matrix: Tensor) -> Tensor:
        return self.inner(MethodInputs(jacobian=matrix, **self.extra))


def bind_inputs(aggregator: Aggregator, extra: dict[str, Tensor]) -> Aggregator:
    """An aggregator of the plain Gramian/Jacobian interface that passes ``extra`` along.

    ``extra`` holds the step's inputs other than the Gramian or the Jacobian (e.g.
    ``{"losses": values}``). The state stays in ``aggregator``: the returned object lives for
    one step.
    """
    if isinstance(aggregator, InputAggregator):
        return _BoundAggregator(aggregator, extra)
    weighting = getattr(aggregator, "weighting", None)
    if isinstance(aggregator, GramianWeightedAggregator) and isinstance(weighting, InputWeighting):
        return GramianWeightedAggregator(_BoundWeighting(weighting, extra))
    return aggregator
