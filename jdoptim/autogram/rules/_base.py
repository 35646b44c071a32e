"""The interface of a layer rule, and the registry that maps module types to rules."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from ._call import Call


class LayerRule(ABC):
    """How to differentiate one call of a module type (see :mod:`._call` for the notation)."""

    def __init__(self, call: Call) -> None:
        self.call = call

    @classmethod
    def applies(cls, call: Call) -> bool:
        """Whether this call has the form the rule handles (else the generic rule is used)."""
        return True

    @abstractmethod
    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        """Rows ``∂ℓ_{ik}/∂p``, one ``[b, T, *p.shape]`` tensor per parameter."""

    def gramian(self, params: list[Tensor]) -> Tensor:
        """``Σ_p J_p J_pᵀ`` over ``params`` as ``[b, T, b, T]``; by default from the rows."""
        call = self.call
        total = None
        for rows in self.jacobians(params):
            flat = rows.reshape(call.b * call.T, -1)
            term = flat @ flat.T
            total = term if total is None else total + term
        assert total is not None
        return total.view(call.b, call.T, call.b, call.T)

    @abstractmethod
    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        """``Σ_{i,k} w_{ik} ∂ℓ_{ik}/∂p`` for each parameter (``weights`` is ``[b, T]``)."""


_RULES: dict[type[nn.Module], type[LayerRule]] = {}


def register_rule(*module_types: type[nn.Module]):
    """Class decorator: use the rule for these module types (and subclasses that keep their
    ``forward``)."""

    def decorate(rule: type[LayerRule]) -> type[LayerRule]:
        for module_type in module_types:
            _RULES[module_type] = rule
        return rule

    return decorate


def registered_rule(module: nn.Module) -> type[LayerRule] | None:
    """The rule registered for ``module``'s type, if its ``forward`` is the registered type's."""
    kind = type(module)
    for base in kind.__mro__:
        rule = _RULES.get(base)
        if rule is not None:
            return rule if kind.forward is base.forward else None
    return None
